"""Stochastic samplers against the exact target: sliced Wasserstein distance and NLL gap per NFE.

Every sampler starts from exact samples of the noisy marginal at ``t_max`` and
its output is compared with as many exact data samples: the sliced
Wasserstein-2 distance over random directions, and the gap between the mean
exact negative log-likelihood of its samples and that of exact samples.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import grids as _grids
from .. import solvers as _solvers
from ..loop import sample
from ..noise import StepNoise
from ..process import Flow
from . import peers
from .accuracy import Problem, budget_steps, problems

__all__ = ["DistResult", "run_distribution", "sliced_wasserstein"]

NFES = [10, 20, 50]
QUICK_NFES = [10, 20]
KD_STOCHASTIC = [("euler_ancestral", 1), ("dpm_2_ancestral", 2), ("dpmpp_2s_ancestral", 2), ("dpmpp_2m_sde", 1),
                 ("dpmpp_3m_sde", 1)]


@dataclass
class DistResult:
    testbed: str
    process: str
    family: str
    config: str
    target_nfe: int
    nfe: int
    swd: float
    nll_gap: float


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = 64, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size samples (rows), over random unit directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], directions, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a.to(torch.float64) @ dirs, dim=0)
    pb, _ = torch.sort(b.to(torch.float64) @ dirs, dim=0)
    return math.sqrt(((pa - pb) ** 2).mean().item())


def _our_stochastic():
    for name in _solvers.names():
        cls = _solvers.REGISTRY[name]
        if cls().stochastic:
            yield name, cls


def run_distribution(quick: bool = False, n: int = 2000,
                     log: Callable[[str], None] = print) -> list[DistResult]:
    warnings.filterwarnings("ignore", module="diffusers")
    nfes = QUICK_NFES if quick else NFES
    out: list[DistResult] = []
    for prob in problems(quick, 1):
        log(f"distribution: {prob.testbed} / {prob.process_name}")
        out += _run_problem(prob, nfes, n)
    return out


def _run_problem(prob: Problem, nfes: list[int], n: int) -> list[DistResult]:
    g = torch.Generator().manual_seed(1)
    x_T = prob.gmm.sample_marginal(prob.process, prob.process.t_max, n, generator=g)
    exact, _ = prob.gmm.sample(n, generator=g)
    base_nll = -prob.gmm.log_prob(exact).mean().item()
    model = prob.gmm.denoiser(prob.process, prob.prediction)
    grid_name = "uniform" if isinstance(prob.process, Flow) else "karras"
    results = []

    def record(family, config, target, x):
        if not math.isfinite(float(x.sum())):
            return
        results.append(DistResult(prob.testbed, prob.process_name, family, config, target, model.nfe,
                                  sliced_wasserstein(x, exact), -prob.gmm.log_prob(x).mean().item() - base_nll))

    for target in nfes:
        for name, cls in _our_stochastic():
            grid = _grids.get(grid_name, prob.process, budget_steps(cls, target))
            model.nfe = 0
            x = sample(model, x_T, grid, cls(), generator=torch.Generator().manual_seed(2))
            record("diffsampler", f"{name} {grid_name}", target, x)
        if isinstance(prob.process, Flow):
            continue  # k-diffusion's ancestral steps assume EDM coordinates, which a flow is not
        for name, per_step in KD_STOCHASTIC:
            steps = max(1, (target + 1) // 2) if per_step == 2 else target
            grid = _grids.karras(prob.process, steps)
            noise = StepNoise.from_generator(torch.Generator().manual_seed(2), x_T.shape, x_T.dtype, x_T.device)
            model.nfe = 0
            x = peers.run_kdiffusion(name, model, x_T, grid, noise=noise)
            record("k-diffusion", f"{name} karras", target, x)
    return results
