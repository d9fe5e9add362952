"""SEEDS: Stochastic Explicit Exponential Derivative-free Solvers (Gonzalez et al. 2023, "SEEDS:
Exponential SDE Solvers for Fast High-Quality Sampling from Diffusion Models", arXiv:2305.14267),
two- and three-stage, in the data-prediction form ComfyUI ships as ``seeds_2`` and ``seeds_3``.

With ``eta`` the stochasticity (0: the probability-flow ODE, 1: the reverse SDE), a
stage from ``s`` to ``u`` (log-SNR step ``h_u``) is
``x_u = (sigma_u / sigma_s) e^{-eta h_u} x_s - alpha_u sum_j c_j D_j + sigma_u nu_u``:
the exact solution of the SDE's linear part with the data estimates ``D_j`` of the
earlier stages held fixed, weighted by ``e^z - 1`` and ``(e^z - 1 - z) / z`` at
``z = -(1 + eta) h_u`` (``h phi_1`` and ``h phi_2``). The noise ``nu`` is one
Ornstein-Uhlenbeck path through the stages: each stage carries the previous
stage's noise forward by ``e^{-eta (h_u - h_prev)}`` and adds fresh noise of
variance ``1 - e^{-2 eta (h_u - h_prev)}``, so every stage sees exact SDE noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .base import Knots, NoiseOptions, Solver

__all__ = ["SEEDS2", "SEEDS3"]


def _ei1(z: float) -> float:
    """``z phi_1(z) = e^z - 1`` (``-1`` at ``z = -inf``)."""
    return math.expm1(z)


def _ei2(z: float) -> float:
    """``z phi_2(z) = (e^z - 1 - z) / z`` (``-1`` at ``z = -inf``)."""
    if z == -math.inf:
        return -1.0
    if abs(z) < 1e-6:
        return z / 2
    return (math.expm1(z) - z) / z


def _decay(eta: float, h: float) -> float:
    """``e^{-eta h}``, 1 for ``eta = 0`` even over an infinite log-SNR step."""
    return 1.0 if eta == 0 else math.exp(-eta * h)


class Stage(NamedTuple):
    t: float                     # where the stage's end point is evaluated (unused for the last)
    brownian: tuple[float, float]  # ode_sigma interval of the stage's fresh noise
    decay: float                 # weight of x_s
    weights: tuple[float, ...]   # weights of D_0, D_1, ... (the data estimates of earlier stages)
    carry: float                 # weight of the previous stage's noise nu (already scaled by sigma_u)
    fresh: float                 # weight of the stage's fresh standard normal


class SeedsStep(NamedTuple):
    t: float
    stages: tuple[Stage, ...]    # the last one lands on the next knot
    final: float | None          # into t = 0: x' = alpha' D_0 (the coefficient), else None


class SeedsState(NamedTuple):
    steps: tuple[SeedsStep, ...]


def _stage_noise(noise, i: int, stream: int, a: float, b: float) -> torch.Tensor:
    """A stage's standard normal: an increment of the Brownian path when there is one, else keyed noise."""
    between = getattr(noise, "between", None)
    return between(a, b) if between is not None else noise.draw(i, stream)


@dataclass(frozen=True)
class _Seeds(NoiseOptions, Solver):
    """Stage tables over the shared SEEDS step. Subclasses give the stage positions ``r_k`` in (0, 1)
    and, per stage, the data-estimate weights as a function of ``(z, r)``."""

    def _positions(self) -> tuple[float, ...]:
        raise NotImplementedError

    def _weights(self, k: int, z: float, r: tuple[float, ...]) -> tuple[float, ...]:
        raise NotImplementedError

    def init(self, knots: Knots, x) -> SeedsState:
        p, eta = knots.process, self.eta
        steps = []
        for i in range(len(knots)):
            if knots.sigma[i + 1] == 0.0:
                steps.append(SeedsStep(knots.t[i], (), knots.alpha[i + 1]))
                continue
            lam_s, lam_t, s_s = knots.lam[i], knots.lam[i + 1], knots.sigma[i]
            r = self._positions() + (1.0,)
            times = []
            for rk in r[:-1]:
                if math.isfinite(lam_s):
                    times.append(float(p.t_of_lambda(lam_s + rk * (lam_t - lam_s))))
                else:  # from t = 1 of a flow there is no log-SNR to interpolate: space log sigma instead
                    times.append(float(p.t_of_ode_sigma(knots.s[i] ** (1 - rk) * knots.s[i + 1] ** rk)))
            times.append(knots.t[i + 1])
            stages, lam_prev, b_prev, sigma_prev = [], lam_s, knots.s[i], s_s
            for k, tk in enumerate(times):
                a_u, s_u = float(p.alpha(tk)), abs(float(p.sigma(tk)))
                lam_u = float(p.lambda_(tk))
                h, dh = lam_u - lam_s, lam_u - lam_prev  # dh finite after the first stage, even from t = 1
                fresh = s_u * math.sqrt(-math.expm1(-2 * eta * dh)) * self.s_noise if eta > 0 else 0.0
                # the noise added so far is sigma_prev * nu: carried to this stage as sigma_u e^{-eta dh} nu
                carry = (s_u / sigma_prev) * _decay(eta, dh) if k > 0 else 0.0
                weights = tuple(-a_u * w for w in self._weights(k, -(1 + eta) * h, r))
                b_next = float(p.ode_sigma(tk))
                stages.append(Stage(tk, (b_prev, b_next), (s_u / s_s) * _decay(eta, h), weights, carry, fresh))
                lam_prev, b_prev, sigma_prev = lam_u, b_next, s_u
            steps.append(SeedsStep(knots.t[i], tuple(stages), None))
        return SeedsState(tuple(steps))

    def step(self, model, x, i, state, noise):
        st = state.steps[i]
        d = [model(x, st.t).x0]
        if st.final is not None:
            return d[0] * st.final, state
        nu = None
        for k, stage in enumerate(st.stages):
            out = torch.mul(x, stage.decay)
            for w, dj in zip(stage.weights, d):
                if w != 0.0:
                    out.add_(dj, alpha=w)
            if stage.fresh != 0.0:
                z = _stage_noise(noise, i, k, *stage.brownian).mul_(stage.fresh)
                nu = z if nu is None else z.add_(nu, alpha=stage.carry)
                out.add_(nu)
            if k + 1 < len(st.stages):
                d.append(model(out, stage.t).x0)
        return out, state


@dataclass(frozen=True)
class SEEDS2(_Seeds):
    """SEEDS-2 (``eta`` 1 by default, ``s_noise``, stage position ``r`` in (0, 1], ``solver_type``
    ``"phi_1"`` or ``"phi_2"``). 2 NFE per step (1 into ``t = 0``). With ``eta = 0`` and
    ``r = 1/2`` it is DPM-Solver++(2S) (order 2); otherwise weak order 1."""

    r: float = 0.5
    solver_type: str = "phi_1"

    name = "seeds_2"
    nfe_per_step = 2
    paper = "Gonzalez et al. 2023, arXiv:2305.14267 (SEEDS-2, ComfyUI's data-prediction form)"

    def __post_init__(self):
        super().__post_init__()
        self._require(isinstance(self.r, (int, float)) and 0 < self.r <= 1, "r", "a number in (0, 1]")
        self._require(self.solver_type in ("phi_1", "phi_2"), "solver_type", "'phi_1' or 'phi_2'")

    @property
    def order(self) -> int:  # type: ignore[override]
        return 2 if self.eta == 0 else 1

    def _positions(self):
        return (float(self.r),)

    def _weights(self, k, z, r):
        if k == 0:
            return (_ei1(z),)
        if self.solver_type == "phi_1":  # D + (D_2 - D) / (2 r), through the whole-step phi_1
            w = 1.0 / (2.0 * r[0])
            return (_ei1(z) * (1 - w), _ei1(z) * w)
        c = _ei2(z) / r[0]
        return (_ei1(z) - c, c)


@dataclass(frozen=True)
class SEEDS3(_Seeds):
    """SEEDS-3 (``eta`` 1 by default, ``s_noise``, stage positions ``r_1 < r_2`` in (0, 1)).
    3 NFE per step (1 into ``t = 0``). With ``eta = 0`` a third-order exponential Runge-Kutta
    method (Hochbruck & Ostermann's phi_2 tableau); otherwise weak order 1."""

    r_1: float = 1.0 / 3.0
    r_2: float = 2.0 / 3.0

    name = "seeds_3"
    nfe_per_step = 3
    paper = "Gonzalez et al. 2023, arXiv:2305.14267 (SEEDS-3, ComfyUI's data-prediction form)"

    def __post_init__(self):
        super().__post_init__()
        self._require(isinstance(self.r_1, (int, float)) and isinstance(self.r_2, (int, float))
                      and 0 < self.r_1 < self.r_2 < 1, "r_1, r_2", "numbers with 0 < r_1 < r_2 < 1")

    @property
    def order(self) -> int:  # type: ignore[override]
        return 3 if self.eta == 0 else 1

    def _positions(self):
        return (float(self.r_1), float(self.r_2))

    def _weights(self, k, z, r):
        if k == 0:
            return (_ei1(z),)
        if k == 1:  # stage 2 at r_2 from D_0 and D_1 (at r_1)
            c = r[1] / r[0] * _ei2(z)
            return (_ei1(z) - c, c)
        c = _ei2(z) / r[1]  # the whole step from D_0 and D_2 (at r_2)
        return (_ei1(z) - c, 0.0, c)
