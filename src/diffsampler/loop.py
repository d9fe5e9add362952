"""``sample()``: the one loop that drives every solver over a grid."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from . import grids as _grids
from . import solvers as _solvers
from .denoiser import Denoiser
from .noise import StepNoise

__all__ = ["sample", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """Sampling produced NaN or infinite values; the message names the step and the times."""

    def __init__(self, step: int, t: float, t_next: float, solver: str):
        self.step, self.t, self.t_next = step, t, t_next
        super().__init__(f"non-finite values (NaN or inf) in the sample after step {step} "
                         f"(t = {t:.6g} -> {t_next:.6g}) of solver {solver!r}; the model's output or "
                         f"the sample diverged there")


def _all_finite(x: torch.Tensor) -> bool:
    # One reduction instead of an elementwise isfinite map: NaN and inf propagate
    # through a sum (accumulated in float32 at least, so half inputs cannot overflow it).
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return math.isfinite(x.sum(dtype=acc).item())


def sample(model: Denoiser, x: torch.Tensor, grid, solver, *,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           callback: Callable[[dict], None] | None = None, progress: bool = False,
           **cond) -> torch.Tensor:
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
    knots = _solvers.Knots.from_grid(process, grid)
    state = solver.init(knots, x)
    noise = StepNoise.from_generator(generator, x.shape, x.dtype, x.device) if solver.stochastic else None
    fn = (lambda x_, t_: model(x_, t_, **cond)) if cond else model

    steps = range(len(knots))
    bar = None
    if progress:
        from rich.progress import Progress
        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task(f"{solver.name}", total=len(knots))
    try:
        for i in steps:
            x, state = solver.step(fn, x, i, state, noise)
            if not _all_finite(x):
                raise NonFiniteError(i, knots.t[i], knots.t[i + 1], solver.name)
            if callback is not None:
                callback({"i": i, "t": knots.t[i], "t_next": knots.t[i + 1], "x": x})
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return x
