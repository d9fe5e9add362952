"""PNDM and PLMS: the pseudo linear multistep method of PNDM (Liu et al. 2022, "Pseudo Numerical Methods for
Diffusion Models on Manifolds", arXiv:2202.09778), as diffusers' ``PNDMScheduler(skip_prk_steps=True)``
and Stable Diffusion's original PLMS sampler run it.

Every step is DDIM's "transfer" ``x' = (alpha'/alpha) x + (sigma' - alpha' sigma / alpha) e`` with
``e`` a combination of past noise estimates: Adams-Bashforth's equal-step weights of order 2, 3, then 4
(``(55, -59, 37, -9) / 24``). The first step is the pseudo improved Euler step: a DDIM step with
``e_0``, a second evaluation there, and the step taken again with their mean (one extra network
evaluation per run). The weights are a table over the multistep engine, in the noise estimate.

F-PNDM (``pndm``, diffusers' ``PNDMScheduler`` with its default ``skip_prk_steps=False``) starts instead
with three pseudo Runge-Kutta steps: classical RK4 on the transfer, with the noise estimate taken at the
step's start, twice at its midpoint in time and at its end (4 evaluations); their start estimates seed
the fourth-order Adams-Bashforth steps that follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

from .base import Knots
from .expint import data_move, data_step, noise_move
from .lms import AB_EQUAL_STEPS
from .multistep import LinearMultistep, MultistepState, StepPlan, estimate

__all__ = ["PLMS", "PNDM"]

def _transfer(knots: Knots, i: int) -> tuple[float, float]:
    return noise_move(knots.alpha[i], knots.sigma[i], knots.alpha[i + 1], knots.sigma[i + 1])


def _first_finite(knots: Knots) -> int:
    """The first knot with alpha > 0: noise estimates before it (t = 1 of a flow) are not used."""
    return next((i for i in range(len(knots)) if knots.alpha[i] > 0.0), 0)


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
        # The Adams-Bashforth warm-up starts at the first knot with alpha > 0.
        start = _first_finite(knots)
        for i in range(len(knots)):
            if knots.alpha[i] == 0.0:
                # From t = 1 of a flow the noise form divides by alpha = 0: take DDIM's data form there
                # (averaging the two data estimates in the first step instead of the noise estimates).
                A, B, _ = data_step(knots, i)
                yield StepPlan(knots.t[i], A, (B,))
                continue
            A, B = _transfer(knots, i)
            k = 1 if i <= start else min(i - start + 1, 4)
            yield StepPlan(knots.t[i], A, tuple(B * c for c in AB_EQUAL_STEPS[k]), kind="eps")

    def step(self, model, x, i, state, noise):
        if i > 0 or len(state.plans) < 2:
            return super().step(model, x, i, state, noise)
        # pseudo improved Euler: e0 at t0; a DDIM step; e1 there; the step again with (e0 + e1) / 2
        plan = state.plans[0]
        first = model(x, plan.t)
        guess = x * plan.A + estimate(first, plan.kind) * plan.P[0]
        second = model(guess, state.plans[1].t)
        out = x * plan.A + (estimate(first, plan.kind) + estimate(second, plan.kind)) * (0.5 * plan.P[0])
        return out, state._replace(history=(first,), x_base=None)


class RungeKuttaStep(NamedTuple):
    """One pseudo Runge-Kutta step: the midpoint time and the transfers to the midpoint and to the end."""

    t: float
    t_mid: float
    t_next: float
    half: tuple[float, float]
    whole: tuple[float, float]
    kind: str       # the estimate transferred: "eps", or "x0" from t = 1 of a flow (alpha = 0)


class PNDMState(NamedTuple):
    multistep: MultistepState
    runge_kutta: tuple[Optional[RungeKuttaStep], ...]


@dataclass(frozen=True)
class PNDM(PLMS):
    """F-PNDM: three pseudo Runge-Kutta steps, then PLMS's fourth-order steps (diffusers' ``PNDMScheduler``).
    1 NFE per step plus 9 for the three Runge-Kutta steps (fewer steps: all of them Runge-Kutta, 4 NFE
    each; a Runge-Kutta step into t = 0, where the noise estimate is undefined, is a DDIM step)."""

    name = "pndm"
    extra_nfe = 9
    paper = "Liu et al. 2022, arXiv:2202.09778 (F-PNDM; diffusers' PNDM)"

    @classmethod
    def run_nfe(cls, steps: int, into_zero: bool = False) -> int:
        rk = min(3, steps) - (1 if into_zero and steps <= 3 else 0)
        return 4 * rk + (steps - rk)

    def init(self, knots: Knots, x) -> PNDMState:
        proc = knots.process
        rk = []
        for i in range(len(knots)):
            if i < 3 and knots.sigma[i + 1] > 0.0:
                t_mid = 0.5 * (knots.t[i] + knots.t[i + 1])
                a, s, a_mid, s_mid = knots.alpha[i], knots.sigma[i], float(proc.alpha(t_mid)), float(proc.sigma(t_mid))
                # From alpha = 0 the noise form divides by zero: the same scheme on the data estimate.
                move, kind = (noise_move, "eps") if a > 0.0 else (data_move, "x0")
                rk.append(RungeKuttaStep(knots.t[i], t_mid, knots.t[i + 1], move(a, s, a_mid, s_mid),
                                         move(a, s, knots.alpha[i + 1], knots.sigma[i + 1]), kind))
            else:
                rk.append(None)
        return PNDMState(LinearMultistep.init(self, knots, x), tuple(rk))

    def step(self, model, x, i, state, noise):
        inner = state.multistep
        st = state.runge_kutta[i]
        if st is None:
            x, inner = LinearMultistep.step(self, model, x, i, inner, noise)
            return x, state._replace(multistep=inner)
        (a_half, b_half), (a, b) = st.half, st.whole
        first = model(x, st.t)
        e1 = estimate(first, st.kind)
        e2 = estimate(model(x * a_half + e1 * b_half, st.t_mid), st.kind)
        e3 = estimate(model(x * a_half + e2 * b_half, st.t_mid), st.kind)
        e4 = estimate(model(x * a + e3 * b, st.t_next), st.kind)
        out = x * a + (e1 + 2.0 * e2 + 2.0 * e3 + e4) * (b / 6.0)
        history = ((first,) + inner.history)[:inner.keep]
        return out, state._replace(multistep=inner._replace(history=history))
