"""``sample()``: the one loop that drives every solver over a grid."""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch

from . import grids as _grids
from . import solvers as _solvers
from .denoiser import Denoiser
from .noise import BrownianNoise, StepNoise, sample_keys

__all__ = ["sample", "NonFiniteError"]

# Steps between looks for NaN and inf in the sample. A look is a reduction, and on accelerators a host
# sync, so there they are rare. On CPU a sync costs nothing, but the samples kept between looks (to name
# the bad step) compete for cache with the solver's own tensors: measured at (1, 4, 128, 128), keeping 8
# cost a DPM-Solver++(2M) step about as much as all its arithmetic and keeping 2 nothing (the solver holds
# the previous sample anyway). So on CPU at most CPU_WINDOW_BYTES of samples are kept, and at least 2 steps.
CHECK_EVERY = 8
CPU_WINDOW_BYTES = 512 * 1024


def _check_every(x: torch.Tensor) -> int:
    if x.device.type != "cpu":
        return CHECK_EVERY
    return max(2, min(CHECK_EVERY, CPU_WINDOW_BYTES // max(1, x.numel() * x.element_size())))


class NonFiniteError(FloatingPointError):
    """Sampling produced NaN or infinite values; the message names the step and the times."""

    def __init__(self, step: int, t: float, t_next: float, solver: str):
        self.step, self.t, self.t_next = step, t, t_next
        super().__init__(f"non-finite values (NaN or inf) in the sample after step {step} "
                         f"(t = {t:.6g} -> {t_next:.6g}) of solver {solver!r}; the model's output or "
                         f"the sample diverged there")


def _is_finite(x: torch.Tensor) -> bool:
    # NaN and inf propagate through a sum (accumulated in float32 at least, so half inputs
    # cannot overflow it): one reduction and one read, cheaper than isfinite().all().
    return math.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32).item())


def _first_non_finite(samples: list[torch.Tensor]) -> int:
    """Index of the first sample with a NaN or inf (the caller knows the last one has one)."""
    return next(k for k, x in enumerate(samples) if not _is_finite(x))


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
    # Non-finite values are looked for once every few steps, in the newest sample: NaN and inf persist
    # through every later step, so a bad step shows there. The samples since the last look are kept
    # (solvers never write into a sample they returned) to name the first bad step exactly. With a
    # callback, every step is looked at.
    window: list[torch.Tensor] = []
    check_every = 1 if callback is not None else _check_every(x)
    last = len(knots) - 1
    step = solver.step
    try:
        for i in steps:
            x, state = step(fn, x, i, state, noise)
            window.append(x)
            if len(window) == check_every or i == last:
                if not _is_finite(x):
                    j = i - len(window) + 1 + _first_non_finite(window)
                    raise NonFiniteError(j, knots.t[j], knots.t[j + 1], solver.name)
                window.clear()
            if callback is not None:
                callback({"i": i, "t": knots.t[i], "t_next": knots.t[i + 1], "x": x})
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return x
