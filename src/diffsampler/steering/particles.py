"""What every particle method shares: populations, the result type, rewards and their checks.

Particles are the batch: groups of ``particles`` consecutive samples of ``x`` are one population
each (one prompt, one class), and populations never mix. A driver builds one
:class:`~diffsampler.Run`, steps it, reads data estimates between steps with ``run.evaluate()``
(kept and reused by the next step, so reading them costs no evaluation) and reindexes with
``run.take``. Every random draw of a driver comes from the caller's generator, through one key per
population, so a population's result does not depend on how many other populations the batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import solvers as _solvers
from ..loop import Run
from ..noise import _mix, _wrap, _GOLDEN, sample_keys

__all__ = ["SteeringResult", "Population", "Reward", "latent_reward", "stochastic_solvers", "require_stochastic"]

Reward = Callable[..., torch.Tensor]  # reward(x0, **cond) -> (batch,)


@dataclass
class SteeringResult:
    """What every steering driver returns.

    ``x``: the final particles, shaped like the input. ``log_weights``: shape ``(batch,)``, each
    population's logsumexp 0 (uniform after a final resampling). ``rewards``: the reward of each
    final particle, ``(batch,)``. ``best``: the highest-reward final particle of each population,
    ``(groups, ...)``. ``nfe``: network evaluations per output sample, all included: a batched
    call on ``b`` samples counts ``b``, so a method that evaluates candidates it discards shows it.
    """

    x: torch.Tensor
    log_weights: torch.Tensor
    rewards: torch.Tensor
    best: torch.Tensor
    nfe: float


def stochastic_solvers() -> list[str]:
    """The registered solvers that draw noise at their default options."""
    return [n for n in _solvers.names() if _solvers.get(n).stochastic]


def require_stochastic(solver, method: str) -> None:
    if not solver.stochastic:
        raise ValueError(f"{method}: solver {solver.name!r} (with these options) draws no noise, and {method} "
                         f"needs a stochastic kernel; use one of {', '.join(stochastic_solvers())}, or give a "
                         f"deterministic one noise (ddim with eta > 0, euler or heun with s_churn > 0)")


class Population:
    """The bookkeeping of one steered batch: groups, the reward and its checks, the generators.

    ``Population(method, run, reward, particles, generator, cond)``; ``reward_of(x0, step)`` calls the
    reward and checks its answer; ``generators(event)`` gives one fresh generator per group for a
    draw (a resampling, a selection), derived from the group's key and the event's number.
    """

    def __init__(self, method: str, run: Run, reward: Reward, particles, generator):
        self.method, self.run = method, run
        if not callable(reward):
            raise TypeError(f"{method}: reward must be callable as reward(x0, **cond) -> (batch,), "
                            f"got {type(reward).__name__}")
        batch = run.x.shape[0]
        if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
            raise ValueError(f"{method}: particles must be an integer >= 1, got {particles!r}")
        if batch % particles:
            raise ValueError(f"{method}: particles = {particles} must divide the batch ({batch}): groups of "
                             f"`particles` consecutive samples are one population each")
        self.reward, self.particles, self.groups = reward, particles, batch // particles
        # One key per population (one draw from the generator, whatever the number of groups).
        self._keys = sample_keys(self.groups, generator)
        self._events = 0

    def generators(self) -> list[torch.Generator]:
        """One generator per group for the next draw; each draw (event) gets new ones."""
        self._events += 1
        seeds = _mix(self._keys + _wrap(self._events * _GOLDEN * 7))
        return [torch.Generator().manual_seed(int(s) & ((1 << 63) - 1)) for s in seeds.tolist()]

    def reward_of(self, x0: torch.Tensor, step: int) -> torch.Tensor:
        """The reward of data estimates ``x0`` (the run's current particles), checked."""
        with torch.no_grad():
            r = self.reward(x0, **self.run.cond)
        n = x0.shape[0]
        where = f"at step {step} (t = {self.run.knots.t[min(step, len(self.run.knots))]:.6g})"
        if not isinstance(r, torch.Tensor) or r.shape != (n,):
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"{self.method}: the reward returned {got} {where} for {n} samples; it must return "
                             f"one number per sample, shape ({n},)")
        if not bool(torch.isfinite(r).all()):
            bad = torch.nonzero(~torch.isfinite(r)).flatten().tolist()
            raise ValueError(f"{self.method}: the reward is not finite {where} for samples {bad[:8]}; rewards "
                             f"must be finite numbers")
        return r.detach().to(torch.float64)

    def current_reward(self) -> torch.Tensor:
        """The reward of the run's current particles: of their data estimate, or of the samples once done."""
        run = self.run
        x0 = run.x if run.done else run.evaluate().x0
        return self.reward_of(x0, run.i)

    def grouped(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(self.groups, -1)

    def normalised(self, log_w: torch.Tensor) -> torch.Tensor:
        """Log-weights with each population's logsumexp 0."""
        g = self.grouped(log_w)
        return (g - torch.logsumexp(g, dim=1, keepdim=True)).reshape(-1)

    def result(self, log_w: torch.Tensor, rewards: torch.Tensor, evaluations: int) -> SteeringResult:
        x = self.run.x
        best = self.grouped(rewards).argmax(dim=1) + torch.arange(self.groups) * self.particles
        return SteeringResult(x=x, log_weights=self.normalised(log_w), rewards=rewards,
                              best=x[best.to(x.device)], nfe=evaluations / x.shape[0])


def latent_reward(reward: Reward, decode: Callable[[torch.Tensor], torch.Tensor]) -> Reward:
    """A reward on decoded data estimates, for latent models: ``reward(decode(z0), **cond)``.

    ``decode`` maps the model's data estimate (a latent) to what the reward scores (an image),
    as a VAE's decoder does; it runs without gradients.
    """
    def on_latents(z0: torch.Tensor, **cond) -> torch.Tensor:
        with torch.no_grad():
            return reward(decode(z0), **cond)
    return on_latents
