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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from .base import Knots, Solver
from .ddim import DDIM
from .expint import dpmpp_weights

__all__ = ["EulerCFGpp", "EulerAncestralCFGpp", "DPMpp2MCFGpp"]


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
            c = self.eta * s1 * math.sqrt(-math.expm1(-2.0 * h))
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
