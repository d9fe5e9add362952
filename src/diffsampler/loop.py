"""``sample()``: the one loop that drives every solver over a grid."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from . import grids as _grids
from . import solvers as _solvers
from .denoiser import Denoiser
from .noise import BrownianNoise, StepNoise, sample_keys

__all__ = ["sample", "NonFiniteError"]

CHECK_EVERY = 8


class NonFiniteError(FloatingPointError):
    """Sampling produced NaN or infinite values; the message names the step and the times."""

    def __init__(self, step: int, t: float, t_next: float, solver: str):
        self.step, self.t, self.t_next = step, t, t_next
        super().__init__(f"non-finite values (NaN or inf) in the sample after step {step} "
                         f"(t = {t:.6g} -> {t_next:.6g}) of solver {solver!r}; the model's output or "
                         f"the sample diverged there")


def _checksum(x: torch.Tensor) -> torch.Tensor:
    # NaN and inf propagate through a sum (accumulated in float32 at least, so half
    # inputs cannot overflow it): one reduction per step, and no host sync until read.
    return x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _first_non_finite(sums: list[torch.Tensor]) -> int | None:
    """Index of the first non-finite checksum, with one host sync for all of them."""
    if not sums:
        return None
    bad = ~torch.isfinite(torch.stack(sums))
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0])


def _compute_initial_state(solver, process, grid: tuple, shape: tuple, dtype, device):
    knots = _solvers.Knots.from_grid(process, torch.tensor(grid, dtype=torch.float64))
    return knots, solver.init(knots, torch.empty(shape, dtype=dtype, device=device))


_cached_initial_state = functools.lru_cache(maxsize=64)(_compute_initial_state)


def _initial_state(solver, process, grid: tuple, shape: tuple, dtype, device):
    """Knots and the solver's initial state, computed once per (solver, process, grid, batch layout).

    Repeated calls with the same grid (generating batch after batch) then pay for
    neither. Solvers are frozen and their initial states immutable, so sharing is
    safe; a user's solver that is not hashable simply skips the cache.
    """
    try:
        return _cached_initial_state(solver, process, grid, shape, dtype, device)
    except TypeError:
        return _compute_initial_state(solver, process, grid, shape, dtype, device)


def sample(model: Denoiser, x: torch.Tensor, grid, solver, *,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           callback: Callable[[dict], None] | None = None, progress: bool = False,
           brownian: bool = False, **cond) -> torch.Tensor:
    """Integrate from ``x`` at ``grid[0]`` to ``grid[-1]`` with ``solver``; return the final sample.

    Parameters
    ----------
    model:
        A :class:`~diffsampler.Denoiser` (or a guidance transform of one).
    x:
        The starting sample at time ``grid[0]``, shape ``(batch, ...)``, floating point.
    grid:
        Strictly decreasing process times (see :mod:`diffsampler.grids`).
    solver:
        A registered solver name (``diffsampler.solvers.names()``) or a solver object.
    generator:
        The source of every random draw of a stochastic solver: a
        ``torch.Generator`` or one per sample. One key per sample is drawn from it,
        so a sample does not depend on the batch it is drawn in. ``None`` uses
        torch's default generator.
    callback:
        Called after each step with ``{"i", "t", "t_next", "x"}``.
    brownian:
        Draw a stochastic solver's noise as increments of one Brownian path per
        sample (in the process's noise level ``ode_sigma``), so that runs with
        different step counts follow the same path. Solvers that need it
        (``dpmpp_sde``) always get it.
    progress:
        Show a progress bar.
    **cond:
        Conditioning keywords passed to the network at every evaluation.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    process = getattr(model, "process", None)
    if process is None or not callable(model):
        raise TypeError(f"model must be a diffsampler Denoiser (callable with a .process), "
                        f"got {type(model).__name__}")
    solver = _solvers.resolve(solver)
    grid = _grids.validate(process, grid)
    knots, state = _initial_state(solver, process, tuple(grid.tolist()), tuple(x.shape), x.dtype, x.device)
    noise = None
    if solver.stochastic:
        keys = sample_keys(x.shape[0], generator)
        if brownian or solver.brownian:
            top = float(process.ode_sigma(process.t_max))
            noise = BrownianNoise(keys, x.shape, x.dtype, x.device, knots.s, 0.0, top)
        else:
            noise = StepNoise(keys, x.shape, x.dtype, x.device)
    fn = (lambda x_, t_: model(x_, t_, **cond)) if cond else model

    steps = range(len(knots))
    bar = None
    if progress:
        from rich.progress import Progress
        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task(f"{solver.name}", total=len(knots))
    # Non-finite values are detected from one checksum per step. Without a callback the
    # checksums are read once every CHECK_EVERY steps (a host sync on GPUs is expensive);
    # NaN and inf persist, so the first bad step is still found and named exactly.
    sums: list[torch.Tensor] = []
    check_every = 1 if callback is not None else CHECK_EVERY
    try:
        for i in steps:
            x, state = solver.step(fn, x, i, state, noise)
            sums.append(_checksum(x))
            if len(sums) == check_every or i == len(knots) - 1:
                bad = _first_non_finite(sums)
                if bad is not None:
                    j = i - len(sums) + 1 + bad
                    raise NonFiniteError(j, knots.t[j], knots.t[j + 1], solver.name)
                sums.clear()
            if callback is not None:
                callback({"i": i, "t": knots.t[i], "t_next": knots.t[i + 1], "x": x})
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return x
