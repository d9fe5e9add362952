"""SEEDS-2: Stochastic Explicit Exponential Derivative-free Solver, two stages (Gonzalez et al. 2023,
"SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from Diffusion Models",
arXiv:2305.14267), in the data-prediction form ComfyUI ships as ``seeds_2``.

With ``h`` the log-SNR step and ``eta`` the stochasticity (0: the probability-flow
ODE, 1: the reverse SDE), a stage from ``s`` to ``u`` with data estimate ``D`` is
``x_u = (sigma_u / sigma_s) e^{-eta h_su} x - alpha_u expm1(-(1 + eta) h_su) D + sigma_u
sqrt(1 - e^{-2 eta h_su}) z``: the exact solution of the linear part of the SDE with
``D`` frozen, and its exact noise. The first stage goes to ``lambda_s + r h``; the
second goes the whole step from ``x`` with ``D`` and the stage's ``D_2`` combined as
``D + (D_2 - D) / (2 r)`` (``phi_1``) or with phi_2 weights (``phi_2``), and its
noise is the first stage's carried forward plus fresh noise for the rest of the
step, so the two stages see one consistent noise path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .base import Knots, Solver

__all__ = ["SEEDS2"]


def _ei1(x: float) -> float:
    """``x phi_1(x) = e^x - 1`` (``-1`` at ``x = -inf``)."""
    return math.expm1(x)


def _ei2(x: float) -> float:
    """``x phi_2(x) = (e^x - 1 - x) / x`` (``-1`` at ``x = -inf``)."""
    if x == -math.inf:
        return -1.0
    if abs(x) < 1e-6:
        return x / 2
    return (math.expm1(x) - x) / x


class SeedsStep(NamedTuple):
    t: float
    t_mid: float
    s: tuple[float, float, float]            # ode_sigma at t, t_mid, t_next (Brownian times)
    first: tuple[float, float, float]        # x_2 = A x + B D + C z1
    second: tuple[float, float, float, float, float, float]  # x' = A x + B1 D + B2 D2 + C1 z1 + C2 z2
    final: bool                              # into t = 0: x' = alpha' D


class SeedsState(NamedTuple):
    steps: tuple[SeedsStep, ...]


def _decay(eta: float, h: float) -> float:
    """``e^{-eta h}``, 1 for ``eta = 0`` even over an infinite log-SNR step."""
    return 1.0 if eta == 0 else math.exp(-eta * h)


def _stage_noise(noise, i: int, stream: int, a: float, b: float) -> torch.Tensor:
    """A stage's standard normal: an increment of the Brownian path when there is one, else keyed noise."""
    between = getattr(noise, "between", None)
    return between(a, b) if between is not None else noise.draw(i, stream)


@dataclass(frozen=True)
class SEEDS2(Solver):
    """SEEDS-2 (``eta`` 1 by default, ``s_noise``, stage position ``r`` in (0, 1], ``solver_type``
    ``"phi_1"`` or ``"phi_2"``). 2 NFE per step (1 into ``t = 0``). With ``eta = 0`` it is
    DPM-Solver++(2S) (order 2); otherwise weak order 1."""

    eta: float = 1.0
    s_noise: float = 1.0
    r: float = 0.5
    solver_type: str = "phi_1"

    name = "seeds_2"
    nfe_per_step = 2
    paper = "Gonzalez et al. 2023, arXiv:2305.14267 (SEEDS-2, ComfyUI's data-prediction form)"

    def __post_init__(self):
        self._require_finite_nonneg("eta")
        self._require_finite_nonneg("s_noise")
        self._require(isinstance(self.r, (int, float)) and 0 < self.r <= 1, "r", "a number in (0, 1]")
        self._require(self.solver_type in ("phi_1", "phi_2"), "solver_type", "'phi_1' or 'phi_2'")

    @property
    def order(self) -> int:  # type: ignore[override]
        return 2 if self.eta == 0 else 1

    @property
    def stochastic(self) -> bool:
        return self.eta > 0 and self.s_noise > 0

    def init(self, knots: Knots, x) -> SeedsState:
        p = knots.process
        eta, steps = self.eta, []
        for i in range(len(knots)):
            if knots.sigma[i + 1] == 0.0:
                steps.append(SeedsStep(knots.t[i], knots.t[i], (0, 0, 0), (0, 0, 0),
                                       (0.0, knots.alpha[i + 1], 0.0, 0.0, 0.0, 0.0), True))
                continue
            lam_s, lam_t = knots.lam[i], knots.lam[i + 1]
            if math.isfinite(lam_s):
                r = self.r
                t_mid = float(p.t_of_lambda(lam_s + r * (lam_t - lam_s)))
            else:  # from t = 1 of a flow: no log-SNR midpoint; halve log sigma, as the limit r = 1/2
                r = 0.5
                t_mid = float(p.t_of_ode_sigma(math.sqrt(knots.s[i] * knots.s[i + 1])))
            a_m, s_m = float(p.alpha(t_mid)), abs(float(p.sigma(t_mid)))
            h1 = float(p.lambda_(t_mid)) - lam_s
            h2 = lam_t - float(p.lambda_(t_mid))
            h = h1 + h2
            s_s, a_t, s_t = knots.sigma[i], knots.alpha[i + 1], knots.sigma[i + 1]
            noise1 = math.sqrt(-math.expm1(-2 * eta * h1)) * self.s_noise if eta > 0 else 0.0
            first = ((s_m / s_s) * _decay(eta, h1), -a_m * _ei1(-(1 + eta) * h1), s_m * noise1)
            decay = (s_t / s_s) * _decay(eta, h)
            if self.solver_type == "phi_1":
                e1 = -a_t * _ei1(-(1 + eta) * h)
                w = 1.0 / (2.0 * r)
                b1, b2 = e1 * (1 - w), e1 * w
            else:
                c2 = _ei2(-(1 + eta) * h) / r
                c1 = _ei1(-(1 + eta) * h) - c2
                b1, b2 = -a_t * c1, -a_t * c2
            carry = s_t * noise1 * _decay(eta, h2)
            fresh = s_t * math.sqrt(-math.expm1(-2 * eta * h2)) * self.s_noise if eta > 0 else 0.0
            steps.append(SeedsStep(knots.t[i], t_mid, (knots.s[i], float(p.ode_sigma(t_mid)), knots.s[i + 1]),
                                   first, (decay, b1, b2, carry, fresh, 0.0), False))
        return SeedsState(tuple(steps))

    def step(self, model, x, i, state, noise):
        st = state.steps[i]
        d = model(x, st.t).x0
        if st.final:
            return d * st.second[1], state
        A, B, C = st.first
        x2 = torch.mul(x, A).add_(d, alpha=B)
        z1 = None
        if C != 0.0:
            z1 = _stage_noise(noise, i, 0, st.s[0], st.s[1])
            x2.add_(z1, alpha=C)
        d2 = model(x2, st.t_mid).x0
        A, B1, B2, carry, fresh, _ = st.second
        out = torch.mul(x, A).add_(d, alpha=B1).add_(d2, alpha=B2)
        if z1 is not None:
            out.add_(z1, alpha=carry)
        if fresh != 0.0:
            out.add_(_stage_noise(noise, i, 1, st.s[1], st.s[2]), alpha=fresh)
        return out, state
