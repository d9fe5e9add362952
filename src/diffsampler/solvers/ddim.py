"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .base import Knots, Solver
from .expint import data_step

__all__ = ["DDIM"]


class DDIMState(NamedTuple):
    t: tuple[float, ...]
    coef: tuple[tuple[float, float, float], ...]  # (A, B, C) per step: x' = A x + B x0 + C z


@dataclass(frozen=True)
class DDIM(Solver):
    """DDIM with stochasticity ``eta`` in [0, 1].

    ``eta = 0`` is the deterministic first-order exponential integrator (equal to
    DPM-Solver-1 and to Euler in EDM coordinates); ``eta = 1`` samples the DDPM
    posterior at each step (ancestral sampling). Order 1, 1 NFE per step.
    """

    eta: float = 0.0

    name = "ddim"
    order = 1
    nfe_per_step = 1
    paper = "Song, Meng & Ermon 2021, arXiv:2010.02502"

    def __post_init__(self):
        self._require_finite_nonneg("eta")
        self._require(self.eta <= 1, "eta", "0 <= eta <= 1")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def init(self, knots: Knots, x) -> DDIMState:
        return DDIMState(knots.t, tuple(data_step(knots, i, self.eta) for i in range(len(knots))))

    def step(self, model, x, i, state, noise):
        A, B, C = state.coef[i]
        out = torch.mul(x, A).add_(model(x, state.t[i]).x0, alpha=B)
        if C != 0.0:
            out.add_(noise.draw(i), alpha=C)
        return out, state
