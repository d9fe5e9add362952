"""PLMS: the pseudo linear multistep method of PNDM (Liu et al. 2022, "Pseudo Numerical Methods for
Diffusion Models on Manifolds", arXiv:2202.09778), as diffusers' ``PNDMScheduler(skip_prk_steps=True)``
and Stable Diffusion's original PLMS sampler run it.

Every step is DDIM's "transfer" ``x' = (alpha'/alpha) x + (sigma' - alpha' sigma / alpha) e`` with
``e`` a combination of past noise estimates: Adams-Bashforth's equal-step weights of order 2, 3, then 4
(``(55, -59, 37, -9) / 24``). The first step is the pseudo improved Euler step: a DDIM step with
``e_0``, a second evaluation there, and the step taken again with their mean (one extra network
evaluation per run). The weights are a table over the multistep engine, in the noise estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Knots
from .expint import data_step
from .multistep import LinearMultistep, MultistepState, StepPlan

__all__ = ["PLMS"]

_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _transfer(knots: Knots, i: int) -> tuple[float, float]:
    """``(A, B)`` of DDIM's step in the noise estimate: ``x' = A x + B e``."""
    a0, s0, a1, s1 = knots.alpha[i], knots.sigma[i], knots.alpha[i + 1], knots.sigma[i + 1]
    return a1 / a0, s1 - a1 * s0 / a0


@dataclass(frozen=True)
class PLMS(LinearMultistep):
    """PNDM's PLMS with the pseudo improved Euler first step. Order 4 in its steps on equal steps;
    its fixed weights lose a step-ratio term on uneven grids, so the run is globally second order
    (measured 1.8-1.9 on log-SNR and Karras grids). 1 NFE per step, plus one for the first step."""

    name = "plms"
    order = 4
    nfe_per_step = 1
    extra_nfe = 1
    paper = "Liu et al. 2022, arXiv:2202.09778 (PLMS; diffusers' PNDM with skip_prk_steps)"

    @property
    def global_order(self) -> int:
        return 2

    def plan(self, knots: Knots):
        # The noise estimates before the first knot with alpha > 0 (t = 1 of a flow) are not used:
        # the Adams-Bashforth warm-up starts again there.
        start = next((i for i in range(len(knots)) if knots.alpha[i] > 0.0), 0)
        for i in range(len(knots)):
            if knots.alpha[i] == 0.0:
                # From t = 1 of a flow the noise form divides by alpha = 0: take DDIM's data form there
                # (averaging the two data estimates in the first step instead of the noise estimates).
                A, B, _ = data_step(knots, i)
                yield StepPlan(knots.t[i], A, (B,))
                continue
            A, B = _transfer(knots, i)
            k = 1 if i <= start else min(i - start + 1, 4)
            yield StepPlan(knots.t[i], A, tuple(B * c for c in _AB[k]), kind="eps")

    def step(self, model, x, i, state, noise):
        if i > 0 or len(state.plans) < 2:
            return super().step(model, x, i, state, noise)
        # pseudo improved Euler: e0 at t0; a DDIM step; e1 there; the step again with (e0 + e1) / 2
        plan = state.plans[0]
        estimate = (lambda pred: pred.x0) if plan.kind == "x0" else (lambda pred: pred.eps)
        first = model(x, plan.t)
        guess = x * plan.A + estimate(first) * plan.P[0]
        second = model(guess, state.plans[1].t)
        out = x * plan.A + (estimate(first) + estimate(second)) * (0.5 * plan.P[0])
        return out, MultistepState(state.plans, state.keep, (first,), None)
