"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Knots
from .expint import data_step
from .multistep import LinearMultistep, StepPlan

__all__ = ["DDIM", "DDPM", "EulerAncestral", "LCM"]


@dataclass(frozen=True)
class DDIM(LinearMultistep):
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

    def plan(self, knots: Knots):
        for i in range(len(knots)):
            A, B, C = data_step(knots, i, self.eta)
            yield StepPlan(knots.t[i], A, (B,), C)


@dataclass(frozen=True)
class EulerAncestral(DDIM):
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``), ``eta = 1`` by default.

    In EDM coordinates k-diffusion steps down to ``sigma_down`` with Euler and adds
    noise ``sigma_up``; with ``sigma_up = eta sqrt(sigma'^2 (sigma^2 - sigma'^2) /
    sigma^2)`` that is exactly DDIM's stochastic step with the same ``eta``, so this
    is DDIM under the name users know. For flows it takes the DDPM-posterior form,
    which (unlike k-diffusion applied to a flow) keeps the flow's marginals.
    Order 1, 1 NFE per step.
    """

    eta: float = 1.0

    name = "euler_ancestral"
    paper = "Karras et al. 2022 (k-diffusion); the step is DDIM's, Song et al. 2021"


@dataclass(frozen=True)
class DDPM(DDIM):
    """DDPM ancestral sampling (Ho et al. 2020): each step samples the posterior ``q(x_{t'} | x_t, x0_hat)``.

    That is DDIM with ``eta = 1``, on any grid (ComfyUI's ``ddpm``). Weak order 1, 1 NFE per step.
    """

    eta: float = 1.0

    name = "ddpm"
    paper = "Ho, Jain & Abbeel 2020, arXiv:2006.11239"


@dataclass(frozen=True)
class LCM(LinearMultistep):
    """Consistency-model multistep sampling (Song et al. 2023, arXiv:2303.01469, Algorithm 1; LCM's sampler).

    Each step jumps to the model's data estimate and re-noises it afresh to the
    next time: ``x' = alpha' x0_hat + sigma' z``. Exact at any step count when the
    model is a consistency function (its x0 is the probability-flow ODE's endpoint);
    with an ordinary denoiser it is not a consistent solver. 1 NFE per step.
    """

    name = "lcm"
    order = 0
    nfe_per_step = 1
    paper = "Song et al. 2023, arXiv:2303.01469; Luo et al. 2023, arXiv:2310.04378"

    @property
    def stochastic(self) -> bool:
        return True

    def plan(self, knots: Knots):
        for i in range(len(knots)):
            yield StepPlan(knots.t[i], 0.0, (knots.alpha[i + 1],), knots.sigma[i + 1])
