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
from .resample import ess, resample_groups
from ..loop import Run
from ..noise import _mix, _wrap, _GOLDEN, sample_keys

__all__ = ["SteeringResult", "Population", "Reward", "latent_reward", "stochastic_solvers", "require_stochastic",
           "REVERSE_SDE_SOLVERS", "reverse_sde_solvers", "require_reverse_sde", "noise_level"]

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


# Solvers whose noise at eta = 1 (and s_noise = 1) is the reverse SDE's own, g dW: each step samples
# (to its order) the reverse-time SDE of the model's process. The Feynman-Kac correctors and AFDPS
# derive their weights for that noise level (or none), so they accept only these, or a deterministic
# solver where V = 0 is meant. ddim counts at eta = 1 (it is then ddpm).
REVERSE_SDE_SOLVERS = ("ddpm", "ddim", "euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                       "dpmpp_2m_sde", "dpmpp_3m_sde", "res_multistep_ancestral", "seeds_2", "seeds_3")


def noise_level(solver) -> str | None:
    """``"reverse_sde"`` for a reverse-SDE kernel, ``"ode"`` for a deterministic solver, ``None`` otherwise."""
    if not solver.stochastic:
        return None if solver.adaptive else "ode"
    if solver.name in REVERSE_SDE_SOLVERS and getattr(solver, "eta", 1.0) == 1.0 \
            and getattr(solver, "s_noise", 1.0) == 1.0:
        return "reverse_sde"
    return None


def reverse_sde_solvers() -> list[str]:
    """The registered solvers that are reverse-SDE kernels at their default options."""
    return [n for n in _solvers.names() if noise_level(_solvers.get(n)) == "reverse_sde"]


def require_reverse_sde(solver, method: str, ode: bool = False) -> str:
    """The solver's noise level, ``"reverse_sde"`` (or ``"ode"`` where ``ode`` allows it), or a clear error."""
    level = noise_level(solver)
    if level == "reverse_sde" or (ode and level == "ode"):
        return level
    allowed = ", ".join(reverse_sde_solvers()) + " (eta = 1, s_noise = 1), ddim with eta = 1"
    if ode:
        allowed += ", or a deterministic solver with a fixed grid (V = 0)"
    options = {k: getattr(solver, k) for k in solver.options()}
    raise ValueError(f"{method}: solver {solver.name!r} with options {options} is not a reverse-SDE kernel, and "
                     f"{method}'s weights are derived for the reverse SDE's own noise level; use one of {allowed}")


class Population:
    """The bookkeeping of one steered batch: groups, the reward and its checks, the generators.

    ``Population(method, run, reward, particles, generator, cond)``; ``reward_of(x0, step)`` calls the
    reward and checks its answer; ``generators(event)`` gives one fresh generator per group for a
    draw (a resampling, a selection), derived from the group's key and the event's number.
    """

    def __init__(self, method: str, run: Run, reward: Reward, particles, generator):
        self.method, self.run = method, run
        if reward is not None and not callable(reward):
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
        self._events = [0] * self.groups  # draws made by each population so far

    def generators(self, groups: torch.Tensor | None = None) -> list[torch.Generator]:
        """One generator per group for the next draw of the populations in ``groups`` (a boolean mask;
        all by default), derived from the group's key and the number of draws that population has made:
        a population's draws never depend on whether the others drew (an ESS-adaptive schedule
        resamples some populations and not others). Groups outside the mask get a generator too (the
        batched resamplers draw for every group) whose draws are discarded and not counted."""
        drawing = [True] * self.groups if groups is None else [bool(v) for v in groups.tolist()]
        for k, yes in enumerate(drawing):
            self._events[k] += yes
        shift = torch.tensor([_wrap(e * _GOLDEN * 7) for e in self._events], dtype=torch.int64)
        seeds = _mix(self._keys + shift)
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

    def resample(self, resampler, log_w: torch.Tensor, threshold: float | None):
        """Resample the populations by ``log_w``: every one (``threshold`` None), or those whose ESS is
        below ``threshold * particles``. Returns global parent indices (``None`` when no population
        resamples) and a per-sample mask of the resampled populations' particles."""
        particles = self.particles
        if particles == 1:  # a population of one resamples to itself
            return None, None
        if threshold is None:
            resampling = torch.ones(self.groups, dtype=torch.bool)
        else:
            resampling = ess(self.grouped(log_w)) < threshold * particles
            if not resampling.any():
                return None, None
        indices = resample_groups(resampler, self.generators(resampling), log_w, particles)
        chosen = resampling.repeat_interleave(particles)
        return torch.where(chosen, indices, torch.arange(log_w.shape[0])), chosen

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
