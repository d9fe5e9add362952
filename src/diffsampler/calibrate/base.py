"""What every grid optimiser shares: checking its inputs, the step budget, and the teacher trajectory.

A grid method is a small frozen object holding its options (as a solver is); ``grid()`` checks the
model, the start points and the solver once, turns the evaluation budget into a number of steps with
the solver's own ``run_nfe``, and hands the method ``(model, x, solver, steps, cond)``. Methods that
measure against a reference share :func:`teacher_trajectory`: the probability-flow solution from the
calibration points, at the knots of a fine teacher grid, computed with the library's own ``sample``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import grids as _grids
from .. import solvers as _solvers
from .._options import Options
from ..loop import sample

__all__ = ["GridMethod", "Teacher", "teacher_trajectory", "steps_for_budget", "check_model", "check_start",
           "per_sample_norm", "finish_grid"]

# The start points' RMS may differ from the prior's standard deviation by this factor at most: the
# marginal at t_max is the prior plus alpha(t_max) times the data, so a batch of data or of noise at
# the wrong scale (unit noise for EDM's sigma_max = 80) is refused, a genuine draw is not.
START_SCALE_TOLERANCE = 2.0


class GridMethod(Options):
    """Base class of the grid optimisers: a frozen dataclass of options plus :meth:`optimise`.

    ``deterministic_only`` says whether the method measures the solver against the probability-flow
    ODE (then a stochastic solver is refused).
    """

    name: ClassVar[str]
    deterministic_only: ClassVar[bool] = True
    paper: ClassVar[str]

    def optimise(self, model, x: torch.Tensor, solver, steps: int, cond: dict) -> torch.Tensor:
        """A grid of exactly ``steps`` intervals from ``t_max`` (to 0 where the process reaches data)."""
        raise NotImplementedError

    def _label(self) -> str:
        return f"calibrate method {self.name!r}"

    def _require_int(self, option: str, low: int) -> None:
        v = getattr(self, option)
        self._require(isinstance(v, int) and not isinstance(v, bool) and v >= low, option, f"an integer >= {low}")


def check_model(model) -> None:
    if not callable(model) or getattr(model, "process", None) is None or not hasattr(model, "nfe"):
        raise TypeError(f"calibrate: model must be a diffsampler Denoiser (or a guidance transform of one: callable, "
                        f"with .process and .nfe), got {type(model).__name__}")


def check_start(process, x) -> None:
    """Refuse start points that cannot be a draw of the marginal at ``t_max`` (judged by their scale)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1 or x.shape[0] < 1:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"calibrate: x must be a floating-point batch of start points (batch, ...), got {got}")
    std = process.prior_std
    rms = float(x.detach().to(torch.float64).pow(2).mean().sqrt())
    if not (math.isfinite(rms) and std / START_SCALE_TOLERANCE <= rms <= std * START_SCALE_TOLERANCE):
        raise ValueError(f"calibrate: x must be start points drawn at the process's t_max = {process.t_max} "
                         f"(prior std {std:.4g}), got a batch of RMS {rms:.4g}; allowed: an RMS within a factor "
                         f"{START_SCALE_TOLERANCE:g} of the prior std, e.g. x = process.prior((n, ...), generator)")


def into_zero(process) -> bool:
    return bool(process.reaches_data)


def steps_for_budget(solver, nfe, process) -> int:
    """The most steps whose run with ``solver`` costs at most ``nfe`` evaluations (at least 2 steps).

    One step is no grid to calibrate (it is ``[t_max, end]`` whatever the method), so a budget that
    buys fewer than two steps is refused.
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise ValueError(f"calibrate: nfe must be an integer, got {nfe!r}")
    zero = into_zero(process)
    least = solver.run_nfe(2, zero)
    if nfe < least:
        raise ValueError(f"calibrate: nfe = {nfe} is below what solver {solver.name!r} needs for a calibrated grid; "
                         f"allowed: nfe >= {least} (two steps{', the last into t = 0' if zero else ''})")
    steps = 2
    while solver.run_nfe(steps + 1, zero) <= nfe:
        steps += 1
    return steps


def finish_grid(process, times) -> torch.Tensor:
    return _grids.validate(process, torch.as_tensor(times, dtype=torch.float64))


def per_sample_norm(e: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of each sample of a batch ``(batch, ...)``, in float64."""
    return e.to(torch.float64).reshape(e.shape[0], -1).norm(dim=1)


@dataclass(frozen=True)
class Teacher:
    """The reference trajectory at the knots of the teacher grid.

    ``knots``: ``n + 1`` decreasing times (``knots[0] = t_max``); ``states[k]``: the solution at
    ``knots[k]`` from every calibration point (``states[0]`` is the batch itself).
    """

    knots: torch.Tensor
    states: torch.Tensor


def teacher_trajectory(model, x: torch.Tensor, steps: int, grid: str, substeps: int, solver, cond: dict) -> Teacher:
    """The probability-flow ODE from ``x`` at the knots of ``grids.get(grid, process, steps)``.

    Each teacher interval is cut into ``substeps`` pieces uniform in ``log ode_sigma`` (log-SNR for VP
    and EDM) and the whole fine grid is run with ``solver``, a high-order deterministic solver, in one
    ``sample`` call; the states at the teacher knots are kept. The interval into ``t = 0`` is one step
    (a step into data returns the data estimate).
    """
    process = model.process
    options = {} if into_zero(process) else {"end": "min"}
    knots = _grids.get(grid, process, steps, **options)
    times = knots.tolist()
    fine, marks = [times[0]], [0]
    log_s = lambda t: math.log(float(process.ode_sigma(t)))  # noqa: E731
    for a, b in zip(times[:-1], times[1:]):
        if b > 0.0:
            ua, ub = log_s(a), log_s(b)
            for r in range(1, substeps):
                fine.append(float(process.t_of_ode_sigma(math.exp(ua + (ub - ua) * r / substeps))))
        fine.append(b)
        marks.append(len(fine) - 1)
    fine_grid = finish_grid(process, fine)
    states = [x]

    def keep(info):
        states.append(info["x"])

    sample(model, x, fine_grid, solver, callback=keep, **cond)
    return Teacher(knots, torch.stack([states[m] for m in marks]))


def resolve_solver(solver, method: GridMethod):
    solver = _solvers.resolve(solver)
    if solver.adaptive:
        raise ValueError(f"calibrate: solver {solver.name!r} is adaptive (it picks its own steps), so no grid fixes "
                         f"its cost; allowed: a solver that takes the grid's steps (e.g. 'ddim', 'dpmpp_2m', 'heun')")
    if method.deterministic_only and solver.stochastic:
        raise ValueError(f"calibrate: method {method.name!r} measures the solver against the probability-flow ODE, "
                         f"but solver {solver.name!r} is stochastic (it draws noise); allowed: a deterministic solver "
                         f"(e.g. 'ddim', 'dpmpp_2m', 'heun', or ddim with eta=0), or method='ays'")
    return solver
