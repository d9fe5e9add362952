"""The CFG++ samplers (Chung et al., 2024, "CFG++: Manifold-constrained Classifier Free Guidance
for Diffusion Models", arXiv:2406.08070, Algorithm 1 for DDIM; ComfyUI's ``euler_cfg_pp`` and
``euler_ancestral_cfg_pp``).

A CFG++ step denoises with the guided data estimate and re-noises with the
unconditional noise estimate: ``x' = alpha' x0_guided + sqrt(sigma'^2 - c^2) eps_uncond
+ c z``, ``c`` the ancestral noise of DDIM's ``eta``. The unconditional noise comes in
``Prediction.renoise`` from ``ds.guidance.cfg(model, scale, plus_plus=True)``; for any
other model these steps are DDIM's (Euler's) exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from .base import Knots
from .ddim import DDIM

__all__ = ["EulerCFGpp", "EulerAncestralCFGpp"]


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
        pred = model(x, state.t[i])
        eps = pred.eps if pred.renoise is None else pred.renoise
        out = pred.x0 * state.data[i]
        if state.noise[i] != 0.0:
            out.add_(eps, alpha=state.noise[i])
        if state.fresh[i] != 0.0:
            out.add_(noise.draw(i), alpha=state.fresh[i])
        return out, state


@dataclass(frozen=True)
class EulerAncestralCFGpp(EulerCFGpp):
    """Euler ancestral with CFG++ re-noising (``eta = 1``). Weak order 1, 1 NFE per step."""

    eta: float = 1.0

    name = "euler_ancestral_cfg_pp"
    paper = "Chung et al. 2024, arXiv:2406.08070 (CFG++; ComfyUI's euler_ancestral_cfg_pp)"
