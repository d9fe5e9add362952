"""Feynman-Kac steering (Singhal, Horvitz, Teehan, Ren, Yu, McKeown & Ranganath 2025, "A General
Framework for Inference-time Scaling and Steering of Diffusion Models", arXiv:2501.06848), and
best-of-N, the baseline it is measured against.

Particles follow the model's stochastic kernel; at the steps of a resampling schedule each is
weighted by a potential built from the reward of its data estimate, and each population is
resampled by those weights. Whatever the potentials, the product of those applied along a
particle's lineage is made ``exp(lam r(x_final))`` (``"diff"`` telescopes to it; ``"max"``, ``"add"``
and ``"immediate"`` get a final correction, their code's ``exp(lam r_0) / prod G``), so the weighted
final particles target ``p(x) exp(lam r(x))`` for any schedule and any stochastic solver.

Where we differ from the authors' code (Fk-Diffusion-Steering, ``fkd_class.py``):

* the reward at a step is that of the data estimate of the sample being weighted, ``x0(x_k)``
  (their code scores the estimate from the step that produced ``x_k``, at ``x_{k+1}``); the
  evaluation at ``x_k`` is the next step's own, kept and reused, so this costs nothing more, and at
  the last step the reward is that of the final sample itself, which is what the target tilts;
* with an ESS threshold, log-weights accumulate over the candidate steps at which a population is
  not resampled (their adaptive branch drops them, their issue #12, and no longer targets the
  tilt: ``keep_weights=False`` reproduces it, for comparison only; a test shows its bias);
* populations resample with their own generators, so one prompt's particles do not depend on the
  others in the batch.
"""

from __future__ import annotations

import math

import torch

from .. import solvers as _solvers
from ..loop import Run
from .particles import Population, SteeringResult, require_stochastic
from .resample import get_resampler

__all__ = ["fk", "best_of_n", "POTENTIALS", "schedule_steps"]

POTENTIALS = ("diff", "max", "add", "immediate")


def schedule_steps(steps: int, every=None, window=None) -> list[int]:
    """The candidate steps of a resampling schedule: after how many completed steps (1 to ``steps``).

    Every ``every`` steps from ``window[0]`` to ``window[1]``, plus the last step. The default is the
    authors' script (every 5 steps from step 5 to step 30 of 100) scaled to ``steps``.
    """
    if every is None:
        every = max(1, round(5 * steps / 100))
    if window is None:
        window = (max(1, round(5 * steps / 100)), round(30 * steps / 100))
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"fk: resample_every must be an integer >= 1, got {every!r}")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in window)
            or not 1 <= window[0] <= window[1] <= steps):
        raise ValueError(f"fk: resample_window must be (first_step, last_step) with 1 <= first <= last <= {steps} "
                         f"(the grid's steps), got {window!r}")
    return sorted(set(range(window[0], window[1] + 1, every)) | {steps})


@torch.no_grad()  # gradient-free: no graph through the network over the steps
def fk(model, x: torch.Tensor, grid, solver, reward, *, particles: int, generator=None, lam: float = 10.0,
       potential: str = "diff", resample_every: int | None = None, resample_window=None,
       ess_threshold: float | None = None, resampler="multinomial", reward_min_value: float = 0.0,
       keep_weights: bool = True, brownian: bool = False, **cond) -> SteeringResult:
    """Feynman-Kac steering of ``model`` toward ``reward`` with ``particles`` particles per population.

    Parameters
    ----------
    model, x, grid, solver:
        As for :func:`diffsampler.sample`; ``solver`` must be stochastic (its kernel moves the particles).
    reward:
        ``reward(x0, **cond) -> (batch,)``, scored on data estimates (see :func:`latent_reward`).
    particles:
        Population size; groups of that many consecutive samples of ``x`` are one population.
    lam:
        Inverse temperature of the target ``p(x) exp(lam r(x))``.
    potential:
        ``"diff"`` ``exp(lam (r_k - r_prev))``, ``"max"`` ``exp(lam max(r_k, r_prev))`` (running
        maximum), ``"add"`` ``exp(lam (r_k + r_prev))`` (running sum) or ``"immediate"``
        ``exp(lam r_k)``; all but ``"diff"`` with the final correction.
    resample_every, resample_window:
        Candidate steps: every ``resample_every`` steps from ``resample_window[0]`` to
        ``resample_window[1]`` (counted in completed steps of the grid), plus the last step.
        Default: the authors' every 5 steps from 5 to 30 of 100, scaled to the grid.
    ess_threshold:
        ``None`` resamples at every candidate step; a number in (0, 1] resamples a population only
        when its ESS falls below ``ess_threshold * particles``, its log-weights accumulating between.
    resampler:
        ``"multinomial"`` (the authors'), ``"systematic"``, ``"stratified"``, ``"residual"`` or a
        callable ``(generator, log_w, n) -> indices``.
    reward_min_value:
        The ``r_prev`` of the first potential (the authors' default 0).
    keep_weights:
        ``False`` drops the weights of a candidate step at which a population is not resampled, as
        the authors' adaptive branch does: biased, kept only to show it.
    generator:
        Every random draw (the solver's noise, the resampling) comes from it.

    The network is evaluated once per step per particle (the data estimates the potentials score
    are the next step's own evaluations), so ``nfe`` equals that of an unsteered run.
    """
    solver = _solvers.resolve(solver)
    require_stochastic(solver, "fk")
    if potential not in POTENTIALS:
        raise ValueError(f"fk: potential must be one of {', '.join(POTENTIALS)}, got {potential!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"fk: lam must be a finite number, got {lam!r}")
    if ess_threshold is not None and not (isinstance(ess_threshold, (int, float)) and 0 < ess_threshold <= 1):
        raise ValueError(f"fk: ess_threshold must be None or a number in (0, 1], got {ess_threshold!r}")
    resampler = get_resampler(resampler)
    run = Run(model, x, grid, solver, generator=generator, brownian=brownian, **cond).watch()
    pop = Population("fk", run, reward, particles, generator)
    candidates = set(schedule_steps(len(run), resample_every, resample_window))
    batch = x.shape[0]
    log_w = torch.zeros(batch, dtype=torch.float64)
    r_prev = torch.full((batch,), float(reward_min_value), dtype=torch.float64)
    log_applied = torch.zeros(batch, dtype=torch.float64)  # log of the potentials applied along each lineage
    rewards = None
    while not run.done:
        run.step()
        k = run.i
        if k not in candidates:
            continue
        r = rewards = pop.current_reward()
        final = run.done
        if potential == "diff":
            log_g = lam * (r - r_prev)
            r_prev = r
        elif final:
            log_g = lam * r - log_applied  # the final correction: the lineage's product becomes exp(lam r)
        elif potential == "max":
            r_prev = torch.maximum(r, r_prev)
            log_g = lam * r_prev
        elif potential == "add":
            r_prev = r + r_prev
            log_g = lam * r_prev
        else:
            log_g = lam * r
        log_applied = log_applied + log_g
        log_w = log_w + log_g
        indices, chosen = pop.resample(resampler, log_w, ess_threshold)
        if indices is None:
            if not keep_weights:
                log_w = torch.zeros_like(log_w)
            continue
        run.take(indices)
        log_w = torch.where(chosen, 0.0, log_w)[indices]
        r_prev, log_applied, rewards = r_prev[indices], log_applied[indices], rewards[indices]
    return pop.result(log_w, rewards, run.sample_evaluations)


@torch.no_grad()  # gradient-free: no graph through the network over the steps
def best_of_n(model, x: torch.Tensor, grid, solver, reward, *, particles: int, generator=None,
              brownian: bool = False, **cond) -> SteeringResult:
    """Best-of-N: sample every particle unsteered and keep, per population, the one of highest reward.

    Any solver (the initial noise alone makes particles differ). ``log_weights`` are uniform:
    nothing reweights the particles; ``best`` is the selection.
    """
    run = Run(model, x, grid, solver, generator=generator, brownian=brownian, **cond).watch()
    pop = Population("best_of_n", run, reward, particles, generator)
    while not run.done:
        run.step()
    rewards = pop.current_reward()
    return pop.result(torch.zeros(x.shape[0], dtype=torch.float64), rewards, run.sample_evaluations)
