"""Euler and Heun in the k-diffusion coordinates, with EDM's stochastic churn.

Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithms 1 and 2. The solvers integrate
``dy/ds = (y - x0_hat) / s`` in the process's coordinates ``y = x / ode_scale(t)``,
``s = ode_sigma(t)`` (EDM variables for VP and EDM, ``(x, t)`` for flows), so on
VP models they agree with k-diffusion's ``sample_euler``/``sample_heun`` and on
EDM models with the EDM paper.

Churn ("S_churn"): before step ``i``, when ``s_tmin <= s_i <= s_tmax``, the noise
level is raised to ``s_hat = s_i (1 + gamma)`` with ``gamma = min(s_churn / steps,
sqrt(2) - 1)`` by adding fresh noise. We add it with the process's exact forward
kernel from ``t`` to ``t_hat``, ``x_hat = (alpha_hat / alpha) x + sqrt(sigma_hat^2 -
(alpha_hat sigma / alpha)^2) s_noise z``, which is Algorithm 2's ``x + sqrt(s_hat^2
- s^2) z`` in EDM coordinates and stays correct for flows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .base import Knots, Solver, combine

__all__ = ["Euler", "Heun", "DPM2", "frame_point", "frame_euler", "dpm2_plan", "dpm2_move"]


def frame_point(process, t: float) -> tuple[float, float, float]:
    """``(t, ode_scale, ode_sigma)`` at ``t``: a point of the k-diffusion coordinates."""
    return t, float(process.ode_scale(t)), float(process.ode_sigma(t))


def frame_euler(scale_a: float, s_a: float, scale_b: float, s_b: float) -> tuple[float, float]:
    """Weights ``(w_x, w_m)`` of one Euler step ``x_b = w_x x_a + w_m x0_hat`` in the k-diffusion coordinates.

    ``y' = y + (s_b - s_a)(y - x0) / s_a`` with ``y = x / scale``.
    """
    ratio = s_b / s_a
    return scale_b * ratio / scale_a, scale_b * (1.0 - ratio)


class KarrasStep(NamedTuple):
    """Precomputed quantities of one step: where the model is evaluated and how x moves."""

    t_hat: float        # time of the (first) model evaluation
    churn_keep: float   # x_hat = churn_keep * x + churn_noise * z
    churn_noise: float
    scale_hat: float    # ode_scale and ode_sigma at t_hat
    s_hat: float
    scale_next: float   # ode_scale and ode_sigma at t_{i+1}
    s_next: float
    t_next: float
    euler: tuple[float, float]                 # x_next = w_x x_hat + w_m x0 (Euler)
    heun: tuple[float, float, float, float]    # Heun's weights of x_hat, x0, x_euler, x0_next


class KarrasState(NamedTuple):
    steps: tuple[KarrasStep, ...]


@dataclass(frozen=True)
class _ChurnedSolver(Solver):
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self):
        self._require_finite_nonneg("s_churn")
        self._require_finite_nonneg("s_noise")
        self._require(isinstance(self.s_tmin, (int, float)) and isinstance(self.s_tmax, (int, float))
                      and 0 <= self.s_tmin <= self.s_tmax, "s_tmin", "0 <= s_tmin <= s_tmax")

    @property
    def stochastic(self) -> bool:
        return self.s_churn > 0

    def init(self, knots: Knots, x: torch.Tensor) -> KarrasState:
        proc, n = knots.process, len(knots)
        steps = []
        for i in range(n):
            t, s = knots.t[i], knots.s[i]
            gamma = min(self.s_churn / n, math.sqrt(2.0) - 1.0) if self.s_tmin <= s <= self.s_tmax else 0.0
            keep, noise = 1.0, 0.0
            t_hat = t
            if gamma > 0:
                t_hat = min(float(proc.t_of_ode_sigma(s * (1.0 + gamma))), proc.t_max)
                if t_hat > t:
                    a, sg = knots.alpha[i], knots.sigma[i]
                    a_hat, sg_hat = float(proc.alpha(t_hat)), float(proc.sigma(t_hat))
                    keep = a_hat / a
                    noise = self.s_noise * math.sqrt(max(0.0, sg_hat ** 2 - (keep * sg) ** 2))
                else:
                    t_hat = t
            scale_hat, s_hat = ((knots.scale[i], s) if t_hat == t else
                                (float(proc.ode_scale(t_hat)), float(proc.ode_sigma(t_hat))))
            c1, s1 = knots.scale[i + 1], knots.s[i + 1]
            # Heun: y' = y + (s' - s)(d1 + d2) / 2 with y = x / scale and d = (y - x0) / s,
            # written as weights of x_hat, x0, the Euler point and the model's x0 there.
            half = 0.5 * (s1 - s_hat)
            heun = ((c1 / scale_hat * (1.0 + half / s_hat), -c1 * half / s_hat, half / s1, -c1 * half / s1)
                    if s1 > 0 else (0.0, 0.0, 0.0, 0.0))
            steps.append(KarrasStep(t_hat, keep, noise, scale_hat, s_hat, c1, s1, knots.t[i + 1],
                                    frame_euler(scale_hat, s_hat, c1, s1), heun))
        return KarrasState(tuple(steps))

    @staticmethod
    def _churn(x: torch.Tensor, i: int, st: KarrasStep, noise) -> torch.Tensor:
        if st.churn_noise == 0.0:
            return x
        return x * st.churn_keep + noise.draw(i) * st.churn_noise


@dataclass(frozen=True)
class Euler(_ChurnedSolver):
    """Euler's method (Karras et al. 2022, Algorithm 2 without the correction).

    Order 1, 1 NFE per step; stochastic when ``s_churn > 0``. Without churn it is
    the same map as DDIM with ``eta = 0``, for every process.
    """

    name = "euler"
    order = 1
    nfe_per_step = 1
    paper = "Karras et al. 2022, arXiv:2206.00364"

    def step(self, model, x, i, state, noise):
        st = state.steps[i]
        if st.churn_noise != 0.0:
            x = self._churn(x, i, st, noise)
        return combine(x, st.euler[0], ((st.euler[1], model(x, st.t_hat)),)), state


@dataclass(frozen=True)
class Heun(_ChurnedSolver):
    """Heun's second-order method, EDM's deterministic/stochastic sampler (Karras et al. 2022, Alg. 2).

    Order 2, 2 NFE per step (1 on a final step to ``t = 0``, which is an Euler
    step); stochastic when ``s_churn > 0``.
    """

    name = "heun"
    order = 2
    nfe_per_step = 2
    paper = "Karras et al. 2022, arXiv:2206.00364"

    def step(self, model, x, i, state, noise):
        st = state.steps[i]
        if st.churn_noise != 0.0:
            x = self._churn(x, i, st, noise)
        pred = model(x, st.t_hat)
        x_euler = combine(x, st.euler[0], ((st.euler[1], pred),))
        if st.s_next == 0.0:
            return x_euler, state
        w_x, w_m, w_e, w_n = st.heun
        return combine(x, w_x, ((w_m, pred), (w_e, x_euler), (w_n, model(x_euler, st.t_next)))), state


class DPM2Move(NamedTuple):
    """Precomputed DPM-Solver-2 move from point ``a`` to ``b`` via ``mid`` (see :func:`dpm2_move`)."""

    t_a: float
    t_mid: float
    to_mid: tuple[float, float]            # x_mid = w_x x + w_m x0 (or the whole Euler step into s_b = 0)
    final: tuple[float, float, float]      # x_b = w_x x + w_mid x_mid + w_m x0_mid (zeros for a step into 0)
    into_zero: bool


def dpm2_plan(a: tuple, mid: tuple, b: tuple) -> DPM2Move:
    """Weights of one DPM-Solver-2 step (k-diffusion's ``sample_dpm_2``) between ``(t, ode_scale, ode_sigma)`` points.

    Euler to the midpoint, then the whole step with the midpoint's derivative:
    ``y_b = y_a + (s_b - s_a)(y_mid - x0_mid) / s_mid``. Into ``s_b = 0`` it is a plain Euler step.
    """
    (t_a, c_a, s_a), (t_m, c_m, s_m), (_, c_b, s_b) = a, mid, b
    if s_b == 0.0:
        return DPM2Move(t_a, t_m, frame_euler(c_a, s_a, c_b, s_b), (0.0, 0.0, 0.0), True)
    k = c_b * (s_b - s_a) / s_m
    return DPM2Move(t_a, t_m, frame_euler(c_a, s_a, c_m, s_m), (c_b / c_a, k / c_m, -k), False)


def dpm2_move(model, x: torch.Tensor, move: DPM2Move) -> torch.Tensor:
    wx, wm = move.to_mid
    x_mid = combine(x, wx, ((wm, model(x, move.t_a)),))
    if move.into_zero:
        return x_mid
    w_x, w_mid, w_m = move.final
    return combine(x, w_x, ((w_mid, x_mid), (w_m, model(x_mid, move.t_mid))))


class DPM2State(NamedTuple):
    steps: tuple[KarrasStep, ...]
    moves: tuple[DPM2Move, ...]


@dataclass(frozen=True)
class DPM2(_ChurnedSolver):
    """DPM-Solver-2 in the k-diffusion coordinates (k-diffusion's ``sample_dpm_2``), with churn.

    Lu et al. 2022a (DPM-Solver, arXiv:2206.00927) second-order singlestep, in the
    form of Karras et al.'s k-diffusion: midpoint in log sigma. Order 2, 2 NFE per
    step (1 on a final step into ``t = 0``).
    """

    name = "dpm_2"
    order = 2
    nfe_per_step = 2
    paper = "Lu et al. 2022, arXiv:2206.00927 (as in k-diffusion)"

    def init(self, knots: Knots, x: torch.Tensor) -> DPM2State:
        base = super().init(knots, x)
        proc = knots.process
        moves = []
        for st in base.steps:
            a, b = (st.t_hat, st.scale_hat, st.s_hat), (st.t_next, st.scale_next, st.s_next)
            # the midpoint of log sigma
            mid = frame_point(proc, float(proc.t_of_ode_sigma(math.sqrt(st.s_hat * st.s_next)))) if st.s_next else b
            moves.append(dpm2_plan(a, mid, b))
        return DPM2State(base.steps, tuple(moves))

    def step(self, model, x, i, state, noise):
        x = self._churn(x, i, state.steps[i], noise)
        return dpm2_move(model, x, state.moves[i]), state
