"""ER-SDE-Solver-3 (Cui et al. 2023, "Elucidating the Solution Space of Extended Reverse-Time SDEs
for Diffusion Models", arXiv:2309.06169; ComfyUI's ``er_sde``).

In the noise level ``l = sigma / alpha``, the extended reverse SDE
with noise scale function ``phi`` has the first-order step
``x' = (alpha'/alpha) r x + alpha' (1 - r) D + alpha' sqrt(l'^2 - l^2 r^2) z`` with
``r = phi(l') / phi(l)``, and the second and third stages add the first and second
divided differences of past data estimates ``D`` in ``l``, weighted by
``dl + phi(l') int dl / phi`` and ``dl^2 / 2 + phi(l') int (l - l_s) dl / phi``
over the step. ``phi(l) = l (e^{l^0.3} + 10)`` is the paper's default. The
integrals are computed here by 24-point Gauss-Legendre quadrature, to round-off,
where the authors' code and ComfyUI take a 200-point left Riemann sum (a relative
error of about 1e-3 in those two weights). Every weight is a number per grid, so
the solver is one more table over the linear multistep engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import Knots
from .lms import gauss_legendre
from .multistep import LinearMultistep, StepPlan

__all__ = ["ERSDE", "default_noise_scale"]

def default_noise_scale(level):
    """The paper's noise scale function ``phi(l) = l (e^{l^0.3} + 10)`` (floats or numpy arrays)."""
    return level * (np.exp(level ** 0.3) + 10.0)


@dataclass(frozen=True)
class ERSDE(LinearMultistep):
    """ER-SDE-Solver with ``max_stage`` 1 to 3 (3: ER-SDE-Solver-3) and the injected noise scaled
    by ``s_noise`` (1 samples the extended reverse SDE; other values trade diversity for detail,
    as in ComfyUI). Weak order 1, 1 NFE per step."""

    max_stage: int = 3
    s_noise: float = 1.0

    name = "er_sde"
    order = 1
    nfe_per_step = 1
    paper = "Cui et al. 2023, arXiv:2309.06169 (ER-SDE-Solver-3, VP form as in ComfyUI)"

    def __post_init__(self):
        self._require(self.max_stage in (1, 2, 3), "max_stage", "1, 2 or 3")
        self._require_finite_nonneg("s_noise")

    @property
    def stochastic(self) -> bool:
        return self.s_noise > 0

    def plan(self, knots: Knots):
        phi = default_noise_scale
        # l = sigma / alpha at every knot (inf at t = 1 of a flow, where alpha = 0)
        lev = [s / a if a > 0 else math.inf for s, a in zip(knots.sigma, knots.alpha)]
        for i in range(len(knots)):
            a_t, l_s, l_t = knots.alpha[i + 1], lev[i], lev[i + 1]
            if knots.sigma[i + 1] == 0.0:  # into t = 0: the data estimate
                yield StepPlan(knots.t[i], 0.0, (a_t,))
                continue
            if not math.isfinite(l_s):  # from pure noise: r = 0, the data estimate re-noised afresh
                yield StepPlan(knots.t[i], 0.0, (a_t,), knots.sigma[i + 1] * self.s_noise)
                continue
            phi_t = float(phi(l_t))
            r = phi_t / float(phi(l_s))
            A = a_t / knots.alpha[i] * r
            P = [a_t * (1.0 - r), 0.0, 0.0]
            stage = min(self.max_stage, i + 1)
            if stage >= 2 and not math.isfinite(lev[i - 1]):
                stage = 1
            if stage >= 3 and not math.isfinite(lev[i - 2]):
                stage = 2
            dl = l_t - l_s
            if stage >= 2:
                w2 = a_t * (dl + phi_t * gauss_legendre(lambda v: 1.0 / phi(v), l_t, l_s))
                d1 = 1.0 / (l_s - lev[i - 1])            # D_d = d1 (D_i - D_{i-1})
                P[0] += w2 * d1
                P[1] -= w2 * d1
            if stage >= 3:
                w3 = a_t * (dl * dl / 2 + phi_t * gauss_legendre(lambda v: (v - l_s) / phi(v), l_t, l_s))
                d1_prev = 1.0 / (lev[i - 1] - lev[i - 2])  # D_d at i-1
                scale = 2.0 / (l_s - lev[i - 2])           # D_u = scale (D_d(i) - D_d(i-1))
                P[0] += w3 * scale * d1
                P[1] -= w3 * scale * (d1 + d1_prev)
                P[2] += w3 * scale * d1_prev
            noise = a_t * math.sqrt(max(0.0, l_t * l_t - l_s * l_s * r * r)) * self.s_noise
            while len(P) > 1 and P[-1] == 0.0:
                P.pop()
            yield StepPlan(knots.t[i], A, tuple(P), noise)
