"""DPM-Solver++ SDE singlestep (k-diffusion's ``sample_dpmpp_sde``), on a Brownian path.

Lu et al. 2022b (arXiv:2211.01095) second-order singlestep with ``r = 1/2``,
made stochastic as in k-diffusion: each of the two stages is an ancestral step
(:func:`.expint.ancestral_split_times`) whose noise is the increment of one
Brownian path per sample over the stage's interval of noise levels. The two
increments share their start, so they are correlated as the path dictates; the
loop therefore always gives this solver a Brownian noise source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .base import Knots, Solver
from .expint import ancestral_split_times, data_move

__all__ = ["DPMppSDE"]


class SDEStep(NamedTuple):
    t: float
    t_mid: float
    s: tuple[float, float, float]           # ode_sigma at t, t_mid, t_next (the Brownian time)
    first: tuple[float, float, float, float]   # x_2 = keep (A x + B m) + c z:  (A, B, keep, c)
    second: tuple[float, float, float, float]  # x' = keep (A x + B m2) + c z'
    final: bool                             # into t = 0: x' = alpha' m


class SDEState(NamedTuple):
    steps: tuple[SDEStep, ...]


@dataclass(frozen=True)
class DPMppSDE(Solver):
    """DPM-Solver++ SDE singlestep (``r = 1/2``), stochastic strength ``eta``, noise scale ``s_noise``.

    2 NFE per step (1 into ``t = 0``); weak order 1. Noise always comes from one
    Brownian path per sample, so a run with more steps refines the same path.
    """

    eta: float = 1.0
    s_noise: float = 1.0

    name = "dpmpp_sde"
    order = 1
    nfe_per_step = 2
    paper = "Lu et al. 2022, arXiv:2211.01095 (SDE singlestep as in k-diffusion)"
    brownian = True

    def __post_init__(self):
        self._require_finite_nonneg("eta")
        self._require_finite_nonneg("s_noise")

    @property
    def stochastic(self) -> bool:
        return True

    def init(self, knots: Knots, x) -> SDEState:
        p = knots.process
        steps = []
        for i in range(len(knots)):
            t, t_next = knots.t[i], knots.t[i + 1]
            if knots.sigma[i + 1] == 0.0:
                steps.append(SDEStep(t, t, (0.0, 0.0, 0.0), (0, 0, 0, 0), (0.0, knots.alpha[i + 1], 1.0, 0.0), True))
                continue
            if math.isfinite(knots.lam[i]):
                t_mid = float(p.t_of_lambda(0.5 * (knots.lam[i] + knots.lam[i + 1])))
            else:  # from t = 1 of a flow the log-SNR midpoint does not exist: halve log sigma instead
                t_mid = float(p.t_of_ode_sigma(math.sqrt(knots.s[i] * knots.s[i + 1])))
            stages = []
            for target in (t_mid, t_next):
                t_down, keep, c = ancestral_split_times(p, t, target, self.eta)
                A, B = data_move(knots.alpha[i], knots.sigma[i], float(p.alpha(t_down)),
                                 abs(float(p.sigma(t_down))))
                stages.append((A, B, keep, c * self.s_noise))
            steps.append(SDEStep(t, t_mid, (knots.s[i], float(p.ode_sigma(t_mid)), knots.s[i + 1]),
                                 stages[0], stages[1], False))
        return SDEState(tuple(steps))

    def step(self, model, x, i, state, noise):
        st = state.steps[i]
        m = model(x, st.t).x0
        if st.final:
            return m * st.second[1], state
        A, B, keep, c = st.first
        x2 = torch.mul(x, A).add_(m, alpha=B).mul_(keep)
        if c != 0.0:
            x2.add_(noise.between(st.s[0], st.s[1]), alpha=c)
        m2 = model(x2, st.t_mid).x0
        A, B, keep, c = st.second
        out = torch.mul(x, A).add_(m2, alpha=B).mul_(keep)
        if c != 0.0:
            out.add_(noise.between(st.s[0], st.s[2]), alpha=c)
        return out, state
