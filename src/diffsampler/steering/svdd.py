"""SVDD: soft value-based decoding (Li, Zhao, Venkataramanan, Uehara et al. 2024, "Derivative-Free
Guidance in Continuous and Discrete Diffusion Models with Soft Value-Based Decoding",
arXiv:2408.08252), with the posterior-mean value (SVDD-PM).

At every step each particle draws ``candidates`` next states from the model's stochastic kernel;
each candidate's value is the reward of its data estimate; one candidate is kept, drawn with
probability proportional to ``exp(value / alpha)`` (the best at ``alpha = 0``, what the authors'
code does). The target is the soft-optimal policy under that value approximation: not the exact
tilt, but the mean reward grows with ``candidates`` and with ``1 / alpha``.

NFE. The kept candidate's evaluation is the next step's own (the authors' code evaluates it again:
``1 + M`` evaluations a step), and the candidates of one particle share its evaluation at the
current point. So a run of ``N`` steps costs ``1 + M (N - 1)`` evaluations per particle: one at the
start, ``M`` at the candidates of every step but the last, whose candidates are final samples and
are scored by the reward itself (the authors take candidate 0 there; we keep the best).
"""

from __future__ import annotations

import math

import torch

from .. import solvers as _solvers
from ..loop import Run
from .particles import Population, SteeringResult, require_stochastic

__all__ = ["svdd"]


@torch.no_grad()  # gradient-free: no graph through the network over the steps
def svdd(model, x: torch.Tensor, grid, solver, reward, *, particles: int = 1, candidates: int = 20,
         alpha: float = 0.0, generator=None, brownian: bool = False, **cond) -> SteeringResult:
    """SVDD-PM over any stochastic solver.

    Parameters
    ----------
    particles:
        Population size; each particle is steered on its own (no resampling between them), and
        ``best`` is the highest-reward particle of each population.
    candidates:
        ``M``, the draws from the kernel per particle and step.
    alpha:
        Selection temperature: ``0`` keeps the best candidate, larger values draw from
        ``softmax(value / alpha)``.
    """
    solver = _solvers.resolve(solver)
    require_stochastic(solver, "svdd")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"svdd: candidates must be an integer >= 1, got {candidates!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"svdd: alpha must be a finite number >= 0, got {alpha!r}")
    run = Run(model, x, grid, solver, generator=generator, brownian=brownian, **cond).watch()
    pop = Population("svdd", run, reward, particles, generator)
    batch, m = x.shape[0], candidates
    spread = torch.arange(batch).repeat_interleave(m)
    rewards = None
    run.evaluate()  # the first step's evaluation, shared by each particle's candidates
    while not run.done:
        run.take(spread)
        run.step()
        values = pop.current_reward().reshape(batch, m)
        if alpha == 0.0:
            pick = values.argmax(dim=1)
        else:
            # one draw per particle, from its population's generator (particle j of group g: row j)
            probs = torch.softmax(values / alpha, dim=1).reshape(pop.groups, particles, m)
            pick = torch.cat([torch.multinomial(p, 1, generator=gen).flatten()
                              for p, gen in zip(probs, pop.generators())])
        chosen = torch.arange(batch) * m + pick
        rewards = values.flatten()[chosen]
        run.take(chosen)
    return pop.result(torch.zeros(batch, dtype=torch.float64), rewards, run.sample_evaluations)
