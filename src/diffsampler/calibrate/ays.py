"""AYS: the grid minimising the KL upper bound of a frozen-denoiser sampler (Sabour, Fidler & Kreis 2024).

"Align Your Steps: Optimizing Sampling Schedules in Diffusion Models", arXiv:2404.14507 (no optimiser code
is public). In EDM's coordinates (``y = x / alpha``, noise level ``s = sigma / alpha``) the reverse SDE is
``dy = -(2 / s)(D(y, s) - y) ds + sqrt(2 s) dw``; a sampler that keeps the denoiser of the interval's top
``s_i`` over ``[s_{i-1}, s_i]`` (the linear part solved exactly, as DDIM / DPM-Solver do) differs from it in
drift by ``(2 / s)(D(y_s, s) - D(y_{s_i}, s_i))``, so Girsanov's theorem bounds the KL divergence of the two
path measures by

    KLUB = sum_i int_{s_{i-1}}^{s_i} E || D(y_s, s) - D(y_{s_i}, s_i) ||^2 / s^3 ds,

the expectation over the true process (data ``x0``, then the forward chain ``y_{s'} = y_s + sqrt(s'^2 - s^2) xi``).
The bound is a sum over intervals, so on a lattice of noise levels its minimum over grids is a shortest path:
the lattice is uniform in ``log s`` from ``s(t_min)`` to ``s(t_max)``, the data are the endpoints of the
reference solve from the calibration points, the denoiser is evaluated once per lattice level, the integral is
the trapezoid rule in ``log s``, and :func:`~diffsampler.calibrate.dp.shortest_path` finds the grid. As in the
published tables the lowest level is then replaced by 0 where the process reaches data.

For Gaussian data ``N(mu, c^2 I)`` in ``d`` dimensions, ``D(y, s) = mu + a(s)(y - mu)`` with
``a = c^2 / (c^2 + s^2)`` and the expectation is ``d c^2 (a(s) - a(s_i))``: the bound is closed form, and so
is the condition its optimum satisfies (the tests check the optimiser against it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import GridMethod, finish_grid, into_zero, teacher_trajectory
from .dp import shortest_path

__all__ = ["AYS", "klub_costs"]


def klub_costs(model, x0: torch.Tensor, levels: torch.Tensor, generator: torch.Generator, cond: dict) -> torch.Tensor:
    """The KLUB of every interval between two lattice levels, as a cost matrix for the shortest path.

    ``levels`` are increasing EDM noise levels. The matrix is indexed as a grid runs (index 0 is the highest
    level): ``cost[a, b]``, ``a < b``, is the bound of the interval from ``levels[-1 - a]`` down to
    ``levels[-1 - b]``; ``x0`` are the data, ``generator`` draws the forward chain.
    """
    process = model.process
    s = levels.tolist()
    lam = [-math.log(v) for v in s]
    times = process.t_of_lambda(torch.tensor(lam, dtype=torch.float64)).tolist()
    # one draw of the forward chain per data point, from the lowest level up
    y = x0.to(torch.float64) + s[0] * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    denoised = []
    for k, (v, t) in enumerate(zip(s, times)):
        if k > 0:
            y = y + math.sqrt(v * v - s[k - 1] * s[k - 1]) * torch.randn(x0.shape, generator=generator,
                                                                          dtype=torch.float64)
        scale = float(process.alpha(t))
        denoised.append(model((scale * y).to(x0.dtype), t, **cond).x0.to(torch.float64).reshape(len(x0), -1))
    d = torch.stack(denoised)                                      # (L, batch, dim)
    n = len(s)
    du = math.log(s[1]) - math.log(s[0])
    sq = torch.tensor(s, dtype=torch.float64) ** 2
    up = torch.full((n, n), float("inf"), dtype=torch.float64)     # up[top, bottom] with levels increasing
    for top in range(1, n):
        gap = (d[:top + 1] - d[top]).pow(2).sum(-1).mean(-1) / sq[:top + 1]   # E||D_m - D_top||^2 / s_m^2
        seg = 0.5 * du * (gap[:-1] + gap[1:])                                  # trapezoid per lattice segment
        tail = seg.flip(0).cumsum(0).flip(0)                                   # integral from level m to top
        up[top, :top] = tail
    # reorder so that index 0 is the top level (a grid's first knot)
    return up.flip(0).flip(1)


@dataclass(frozen=True)
class AYS(GridMethod):
    """Options of the AYS optimiser.

    ``lattice``: noise levels the grid is chosen from (uniform in ``log s``); ``teacher_steps``,
    ``teacher_grid``, ``substeps``, ``reference``: the reference solve whose endpoints are the data;
    ``seed``: the forward-chain noise (the bound's Monte Carlo draws, fixed so the result is reproducible).
    """

    lattice: int = 96
    teacher_steps: int = 24
    teacher_grid: str = "karras"
    substeps: int = 4
    reference: str = "dpmpp_3m"
    seed: int = 0

    name = "ays"
    deterministic_only = False
    paper = "Sabour, Fidler & Kreis 2024, arXiv:2404.14507"

    def __post_init__(self):
        self._require_int("lattice", 3)
        self._require_int("teacher_steps", 1)
        self._require_int("substeps", 1)
        self._require_int("seed", 0)

    def optimise(self, model, x, solver, steps, cond):
        process = model.process
        s_hi, s_lo = (math.exp(-float(process.lambda_(t))) for t in (process.t_max, process.t_min))
        if not (math.isfinite(s_hi) and s_lo > 0):
            raise ValueError(f"calibrate method 'ays': the noise level sigma/alpha must be finite at t_max and > 0 "
                             f"at t_min of {process!r} (got {s_hi} and {s_lo}); allowed: a process with alpha > 0 "
                             f"at t_max (a flow with t_max < 1), or method='gits' / 'oss'")
        self._require(self.lattice > steps, "lattice", f"more than the grid's {steps} steps")
        teacher = teacher_trajectory(model, x, self.teacher_steps, self.teacher_grid, self.substeps,
                                     self.reference, cond)
        x0 = teacher.states[-1]
        return grid_from_data(model, x0, steps, self.lattice, self.seed, cond)


def grid_from_data(model, x0: torch.Tensor, steps: int, lattice: int, seed: int, cond: dict) -> torch.Tensor:
    """The AYS grid of ``steps`` intervals for data samples ``x0`` (the step after the reference solve)."""
    process = model.process
    s_hi, s_lo = (math.exp(-float(process.lambda_(t))) for t in (process.t_max, process.t_min))
    levels = torch.logspace(math.log10(s_lo), math.log10(s_hi), lattice, dtype=torch.float64)
    levels[0], levels[-1] = s_lo, s_hi
    generator = torch.Generator().manual_seed(seed)
    path = shortest_path(klub_costs(model, x0, levels, generator, cond), steps)
    chosen = levels.flip(0)[path]
    times = process.t_of_lambda(-chosen.log())
    times[0], times[-1] = process.t_max, process.t_min
    if into_zero(process):
        times[-1] = 0.0
    return finish_grid(process, times)
