"""Ancestral two-stage samplers of k-diffusion: DPM-Solver-2 ancestral and DPM-Solver++(2S) ancestral.

Each step moves deterministically from ``t`` to ``t_down`` with a second-order
singlestep method, then adds fresh noise to land at ``t'``
(:func:`.expint.ancestral_split`). With ``eta = 0`` there is no noise and
``t_down = t'``: the deterministic DPM-Solver-2 and DPM-Solver++(2S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .base import Knots, NoiseOptions, Solver
from .expint import ancestral_split, data_move
from .karras import dpm2_move, dpm2_plan, frame_point

__all__ = ["DPM2Ancestral", "DPMpp2SAncestral"]


class AncestralStep(NamedTuple):
    move: Any                          # the deterministic move to t_down, precomputed by the subclass
    keep: float                        # x' = keep * x_down + c z
    c: float


class AncestralState(NamedTuple):
    steps: tuple[AncestralStep, ...]


@dataclass(frozen=True)
class _Ancestral(NoiseOptions, Solver):
    nfe_per_step = 2

    def _midpoint(self, process, a_t: float, down_t: float) -> float:
        raise NotImplementedError

    def init(self, knots: Knots, x: torch.Tensor) -> AncestralState:
        p = knots.process
        steps = []
        for i in range(len(knots)):
            t_down, keep, c = ancestral_split(knots, i, self.eta)
            a, down = frame_point(p, knots.t[i]), frame_point(p, t_down)
            mid = frame_point(p, self._midpoint(p, knots.t[i], t_down)) if t_down > 0 else down
            steps.append(AncestralStep(self._plan_move(p, a, mid, down), keep, c * self.s_noise))
        return AncestralState(tuple(steps))

    def _plan_move(self, process, a, mid, down):
        raise NotImplementedError

    def _move(self, model, x, move) -> torch.Tensor:
        raise NotImplementedError

    def step(self, model, x, i, state, noise):
        st = state.steps[i]
        x = self._move(model, x, st.move)  # always a fresh tensor, so in-place updates are safe
        if st.keep != 1.0:
            x.mul_(st.keep)
        if st.c != 0.0:
            x.add_(noise.draw(i), alpha=st.c)
        return x, state


@dataclass(frozen=True)
class DPM2Ancestral(_Ancestral):
    """DPM-Solver-2 ancestral (k-diffusion's ``sample_dpm_2_ancestral``).

    The deterministic move is :class:`~.karras.DPM2` (midpoint in log sigma of the
    k-diffusion coordinates) down to ``t_down``. 2 NFE per step; weak order 1.
    """

    name = "dpm_2_ancestral"
    order = 1
    paper = "Lu et al. 2022, arXiv:2206.00927 (ancestral form of k-diffusion)"

    def _midpoint(self, process, a_t, down_t):
        s = math.sqrt(float(process.ode_sigma(a_t)) * float(process.ode_sigma(down_t)))
        return float(process.t_of_ode_sigma(s))

    def _plan_move(self, process, a, mid, down):
        return dpm2_plan(a, mid, down)

    def _move(self, model, x, move):
        return dpm2_move(model, x, move)


@dataclass(frozen=True)
class DPMpp2SAncestral(_Ancestral):
    """DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``); ``eta = 0`` is DPM-Solver++(2S).

    Lu et al. 2022b (arXiv:2211.01095), Algorithm 1 with ``r = 1/2``: a first-order
    data-prediction step to the log-SNR midpoint, then the whole step with the
    midpoint's data estimate. 2 NFE per step; order 2 for ``eta = 0``, weak order 1 otherwise.
    """

    name = "dpmpp_2s_ancestral"
    paper = "Lu et al. 2022, arXiv:2211.01095 (ancestral form of k-diffusion)"

    @property
    def order(self) -> int:  # type: ignore[override]
        return 2 if self.eta == 0 else 1

    def _midpoint(self, process, a_t, down_t):
        return float(process.t_of_lambda(0.5 * (float(process.lambda_(a_t)) + float(process.lambda_(down_t)))))

    def _plan_move(self, process, a, mid, down):
        alpha = lambda t: float(process.alpha(t))  # noqa: E731
        sigma = lambda t: abs(float(process.sigma(t)))  # noqa: E731
        (t_a, _, _), (t_m, _, _), (t_d, _, _) = a, mid, down
        if sigma(t_d) == 0.0:
            return (t_a, t_m, None, (0.0, alpha(t_d)))
        # first-order step to the log-SNR midpoint, then the whole step with the midpoint's estimate
        return (t_a, t_m, data_move(alpha(t_a), sigma(t_a), alpha(t_m), sigma(t_m)),
                data_move(alpha(t_a), sigma(t_a), alpha(t_d), sigma(t_d)))

    def _move(self, model, x, move):
        t_a, t_m, to_mid, whole = move
        x0 = model(x, t_a).x0
        if to_mid is None:
            return x0 * whole[1]
        x0_mid = model(torch.mul(x, to_mid[0]).add_(x0, alpha=to_mid[1]), t_m).x0
        return torch.mul(x, whole[0]).add_(x0_mid, alpha=whole[1])


@dataclass(frozen=True)
class DPMpp2S(DPMpp2SAncestral):
    """DPM-Solver++(2S) (Lu et al. 2022b, arXiv:2211.01095, Algorithm 1 with ``r = 1/2``): the
    deterministic singlestep solver, which is ``dpmpp_2s_ancestral`` with ``eta = 0`` under the name
    ComfyUI users know. Order 2, 2 NFE per step."""

    eta: float = 0.0

    name = "dpmpp_2s"
    paper = "Lu et al. 2022, arXiv:2211.01095 (DPM-Solver++(2S))"
