"""The CFG++ samplers (Chung et al., 2024, "CFG++: Manifold-constrained Classifier Free Guidance
for Diffusion Models", arXiv:2406.08070, Algorithm 1 for DDIM; ComfyUI's ``euler_cfg_pp``,
``euler_ancestral_cfg_pp`` and ``dpmpp_2m_cfg_pp``).

A CFG++ step denoises with the guided data estimate and re-noises with the
unconditional noise estimate: ``x' = alpha' x0_guided + sqrt(sigma'^2 - c^2) eps_uncond
+ c z``, ``c`` the ancestral noise of DDIM's ``eta``. The unconditional noise comes in
``Prediction.renoise`` from ``ds.guidance.cfg(model, scale, plus_plus=True)``; for any
other model these steps are DDIM's (Euler's) exactly.

``dpmpp_2m_cfg_pp`` adds DPM-Solver++(2M)'s second-order term to that step, with ComfyUI's choice of
history: the difference between the guided data estimate now and the *unconditional* one at the
previous knot, ``x' += alpha' (1 - e^{-h}) / (2 r) (x0_guided - x0_uncond_prev)``, ``r = h_prev / h``.
For an unguided model it is DPM-Solver++(2M) (without ``lower_order_final``).

ComfyUI's other CFG++ samplers, each the unguided method run on the unconditional data estimate
``u`` plus a multiple of the guidance vector ``c - u`` (``c`` the guided estimate), and each exactly its
unguided method for a model without ``renoise``:

* ``dpmpp_2s_ancestral_cfg_pp``: DPM-Solver++(2S) ancestral on ``u`` (the midpoint's guided estimate is
  not used), then ``+ alpha' (c - u)`` after the noise;
* ``res_multistep_cfg_pp`` / ``res_multistep_ancestral_cfg_pp``: RES multistep (``eta`` 0 / 1) on ``u``
  with ``u`` as history; the guidance vector is added before the step's decay, so it enters as
  ``alpha' (c - u)`` on first-order steps and as ``alpha' e^{-h} (c - u)`` on second-order ones (ComfyUI
  adds it to ``x`` before the exponential move);
* ``gradient_estimation_cfg_pp``: gradient estimation with the derivative from ``u``, ``+ scale' (c - u)``
  in the k-diffusion coordinates (``scale = ode_scale``).

Where ``alpha = 0`` (``t = 1`` of a flow) ``u`` is not defined by the noise estimate: the step is unguided
by CFG++ there (it uses the guided estimate alone), as for ``dpmpp_2m_cfg_pp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .ancestral import DPMpp2SAncestral
from .base import Knots, Solver, combine
from .ddim import DDIM
from .dpmpp import RESMultistepAncestral, res_ancestral_plans
from .expint import dpmpp_weights
from .lms import GradientEstimation, LMSState

__all__ = ["EulerCFGpp", "EulerAncestralCFGpp", "DPMpp2MCFGpp", "DPMpp2SAncestralCFGpp", "RESMultistepCFGpp",
           "RESMultistepAncestralCFGpp", "GradientEstimationCFGpp", "uncond_x0"]


class CFGppState(NamedTuple):
    t: tuple[float, ...]
    data: tuple[float, ...]     # alpha' per step
    noise: tuple[float, ...]    # sqrt(sigma'^2 - c^2) per step
    fresh: tuple[float, ...]    # c per step


@dataclass(frozen=True)
class EulerCFGpp(DDIM):
    """DDIM / Euler with CFG++ re-noising (``eta = 0``; ``eta > 0`` adds DDIM's ancestral noise).

    Order 1, 1 NFE per step (the guided model's calls count as it counts them).
    """

    name = "euler_cfg_pp"
    paper = "Chung et al. 2024, arXiv:2406.08070 (CFG++; ComfyUI's euler_cfg_pp)"

    def init(self, knots: Knots, x) -> CFGppState:
        data, noise, fresh = [], [], []
        for i in range(len(knots)):
            s1 = knots.sigma[i + 1]
            h = knots.h(i)
            # (eta = 0 draws no noise; run backward, h < 0 would put a negative number under the root)
            c = self.eta * s1 * math.sqrt(-math.expm1(-2.0 * h)) if self.eta > 0 else 0.0
            data.append(knots.alpha[i + 1])
            noise.append(math.sqrt(max(0.0, s1 * s1 - c * c)))
            fresh.append(c)
        return CFGppState(knots.t, tuple(data), tuple(noise), tuple(fresh))

    def step(self, model, x, i, state, noise):
        return _cfgpp_move(model(x, state.t[i]), i, state, noise)[0], state


def _cfgpp_move(pred, i: int, st: CFGppState, noise):
    """CFG++'s DDIM step from the model's answer at knot ``i``: ``(x', eps_uncond)``."""
    eps = pred.eps if pred.renoise is None else pred.renoise
    out = pred.x0 * st.data[i]
    if st.noise[i] != 0.0:
        out.add_(eps, alpha=st.noise[i])
    if st.fresh[i] != 0.0:
        out.add_(noise.draw(i), alpha=st.fresh[i])
    return out, eps


@dataclass(frozen=True)
class EulerAncestralCFGpp(EulerCFGpp):
    """Euler ancestral with CFG++ re-noising (``eta = 1``). Weak order 1, 1 NFE per step."""

    eta: float = 1.0

    name = "euler_ancestral_cfg_pp"
    paper = "Chung et al. 2024, arXiv:2406.08070 (CFG++; ComfyUI's euler_ancestral_cfg_pp)"


class DPMpp2MCFGppState(NamedTuple):
    first: CFGppState           # the CFG++ DDIM step
    second: tuple[float, ...]   # per step, alpha' (1 - e^{-h}) / (2 r); 0 for a first-order step
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    uncond_prev: object         # the unconditional data estimate at the previous knot (None: not known)


@dataclass(frozen=True)
class DPMpp2MCFGpp(Solver):
    """DPM-Solver++(2M) with CFG++ re-noising (ComfyUI's ``dpmpp_2m_cfg_pp``). Order 2 (global 2) for
    an unguided model, 1 NFE per step."""

    name = "dpmpp_2m_cfg_pp"
    order = 2
    nfe_per_step = 1
    paper = "Chung et al. 2024, arXiv:2406.08070 (CFG++; ComfyUI's dpmpp_2m_cfg_pp), Lu et al. 2022"

    def init(self, knots: Knots, x) -> DPMpp2MCFGppState:
        first = EulerCFGpp().init(knots, x)
        second = []
        for i in range(len(knots)):
            # first order: the first step, a step into t = 0, or no unconditional estimate at the last knot
            if i == 0 or knots.sigma[i + 1] == 0.0 or knots.alpha[i - 1] == 0.0:
                second.append(0.0)
                continue
            # DPM-Solver++(2M)'s weight of the previous estimate is -alpha' (1 - e^{-h}) / (2r)
            P = dpmpp_weights(knots, i, 2)[1]
            second.append(-P[1] if len(P) > 1 else 0.0)
        return DPMpp2MCFGppState(first, tuple(second), knots.alpha, knots.sigma, None)

    def step(self, model, x, i, state, noise):
        pred = model(x, state.first.t[i])
        out, eps_u = _cfgpp_move(pred, i, state.first, noise)
        if state.second[i] != 0.0:
            out.add_(pred.x0 - state.uncond_prev, alpha=state.second[i])
        if pred.renoise is None or state.alpha[i] == 0.0:
            uncond = pred.x0
        else:
            uncond = (x - eps_u * state.sigma[i]) / state.alpha[i]
        return out, state._replace(uncond_prev=uncond)


def uncond_x0(pred, x, alpha: float, sigma: float):
    """The unconditional data estimate ``(x - sigma eps_uncond) / alpha`` of a CFG++ answer at ``x``, or the
    answer's own data estimate when it carries no unconditional noise (unguided) or ``alpha = 0``."""
    if pred.renoise is None or alpha == 0.0:
        return pred.x0
    return (x - pred.renoise * sigma) / alpha


@dataclass(frozen=True)
class DPMpp2SAncestralCFGpp(DPMpp2SAncestral):
    """DPM-Solver++(2S) ancestral with CFG++ (ComfyUI's ``dpmpp_2s_ancestral_cfg_pp``): both stages move
    with the unconditional data estimate, and the step adds ``alpha' (c - u)`` of its first evaluation
    after the noise. ``eta = 0`` is deterministic. 2 NFE per step; order 2 for ``eta = 0`` and an
    unguided model, weak order 1 otherwise."""

    name = "dpmpp_2s_ancestral_cfg_pp"
    paper = "Chung et al. 2024, arXiv:2406.08070 (CFG++; ComfyUI's dpmpp_2s_ancestral_cfg_pp), Lu et al. 2022"

    def _plan_move(self, process, a, mid, down):
        at = lambda t: (float(process.alpha(t)), abs(float(process.sigma(t))))  # noqa: E731
        return super()._plan_move(process, a, mid, down), at(a[0]), at(mid[0]), at(down[0])[0]

    def step(self, model, x, i, state, noise):
        st = state.steps[i]
        (t_a, t_m, to_mid, whole), (a_a, s_a), (a_m, s_m), a_down = st.move
        pred = model(x, t_a)
        u = uncond_x0(pred, x, a_a, s_a)
        if to_mid is None:
            out = u * whole[1]
        else:
            x_mid = torch.mul(x, to_mid[0]).add_(u, alpha=to_mid[1])
            u_mid = uncond_x0(model(x_mid, t_m), x_mid, a_m, s_m)
            out = torch.mul(x, whole[0]).add_(u_mid, alpha=whole[1])
        if st.keep != 1.0:
            out.mul_(st.keep)
        if st.c != 0.0:
            out.add_(noise.draw(i), alpha=st.c)
        if u is not pred.x0:
            out.add_(pred.x0 - u, alpha=st.keep * a_down)  # keep * alpha_down = alpha'
        return out, state


class RESCFGppState(NamedTuple):
    plans: tuple            # StepPlan per step (res_ancestral_plans), over unconditional data estimates
    guide: tuple[float, ...]  # weight of the guidance vector c - u per step
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    uncond_prev: object     # u at the previous knot (None before the first step)


@dataclass(frozen=True)
class RESMultistepCFGpp(RESMultistepAncestral):
    """RES multistep with CFG++ (ComfyUI's ``res_multistep_cfg_pp``; ``eta > 0`` its ancestral form).

    Order 2 for an unguided model (it is then ``res_multistep``), 1 NFE per step."""

    eta: float = 0.0

    name = "res_multistep_cfg_pp"
    paper = "Chung et al. 2024, arXiv:2406.08070 (CFG++), Zhang et al. 2023 (ComfyUI's res_multistep_cfg_pp)"

    def init(self, knots: Knots, x) -> RESCFGppState:
        plans = tuple(res_ancestral_plans(knots, self.eta, self.s_noise))
        guide = tuple(knots.alpha[i + 1] if len(p.P) == 1 else p.A * knots.alpha[i] for i, p in enumerate(plans))
        return RESCFGppState(plans, guide, knots.alpha, knots.sigma, None)

    def step(self, model, x, i, state, noise):
        plan = state.plans[i]
        pred = model(x, plan.t)
        u = uncond_x0(pred, x, state.alpha[i], state.sigma[i])
        terms = [(plan.P[0], u)]
        if len(plan.P) > 1:
            terms.append((plan.P[1], state.uncond_prev))
        if u is not pred.x0:
            terms.append((state.guide[i], pred.x0 - u))
        if plan.C != 0.0:
            terms.append((plan.C, noise.draw(i)))
        return combine(x, plan.A, terms), state._replace(uncond_prev=u)


@dataclass(frozen=True)
class RESMultistepAncestralCFGpp(RESMultistepCFGpp):
    """Ancestral RES multistep with CFG++ (ComfyUI's ``res_multistep_ancestral_cfg_pp``): ``eta = 1``.
    Weak order 1, 1 NFE per step."""

    eta: float = 1.0

    name = "res_multistep_ancestral_cfg_pp"
    paper = ("Chung et al. 2024, arXiv:2406.08070 (CFG++), Zhang et al. 2023 "
             "(ComfyUI's res_multistep_ancestral_cfg_pp)")


class GECFGppState(NamedTuple):
    base: LMSState
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    guide: tuple[float, ...]   # ode_scale at the step's end: the weight of c - u


@dataclass(frozen=True)
class GradientEstimationCFGpp(GradientEstimation):
    """Gradient estimation with CFG++ (ComfyUI's ``gradient_estimation_cfg_pp``): the derivative is taken
    from the unconditional data estimate, and the guidance vector is added as ``scale' (c - u)``. Order 1
    (as ``gradient_estimation``, which it is for an unguided model), 1 NFE per step."""

    name = "gradient_estimation_cfg_pp"
    paper = "Permenter & Yuan 2024, arXiv:2306.04848, Chung et al. 2024 (ComfyUI's gradient_estimation_cfg_pp)"

    def init(self, knots: Knots, x) -> GECFGppState:
        return GECFGppState(super().init(knots, x), knots.alpha, knots.sigma, knots.scale[1:])

    def step(self, model, x, i, state, noise):
        st = state.base
        pred = model(x, st.t[i])
        u = uncond_x0(pred, x, state.alpha[i], state.sigma[i])
        w_x, w_m = st.slope[i]
        history = (combine(x, w_x, ((w_m, u),)),) + st.history
        terms = list(zip(st.coef[i], history))
        if u is not pred.x0:
            terms.append((state.guide[i], pred.x0 - u))
        out = combine(x, st.keep_x[i], terms)
        return out, state._replace(base=st._replace(history=history[:st.keep]))
