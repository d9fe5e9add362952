"""Time grids: a grid is data, a float64 1-D tensor of strictly decreasing process times.

Every builder takes the process and the number of steps (intervals) and returns
``steps + 1`` times from ``t_max`` down. With ``end="zero"`` (the default, as
k-diffusion's grids end) the last interval goes from ``t_min`` to ``0``, where
the sample is data; with ``end="min"`` the grid stops at ``t_min``. Starting
mid-way (image-to-image, inversion) is slicing a grid: ``grid[k:]``.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Sequence

import torch

from .process import Process

__all__ = ["uniform", "logsnr", "karras", "quadratic", "explicit", "shift", "validate", "get", "names", "GRIDS"]

ENDS = ("zero", "min")


def _check_steps(steps) -> int:
    # numpy and torch integers too (operator.index accepts exactly the integer types)
    try:
        value = operator.index(steps) if not isinstance(steps, bool) else None
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return value


def _range(process: Process, t_max, t_min) -> tuple[float, float]:
    hi = process.t_max if t_max is None else float(t_max)
    lo = process.t_min if t_min is None else float(t_min)
    if not (process.t_min <= lo < hi <= process.t_max) or not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"grid range: need {process.t_min} <= t_min < t_max <= {process.t_max} for "
                         f"{process!r}, got t_min={lo}, t_max={hi}")
    return hi, lo


def _build(process: Process, steps: int, end: str, t_max, t_min,
           spacing: Callable[[float, float, int], torch.Tensor]) -> torch.Tensor:
    """Place the non-zero knots with ``spacing(hi, lo, n)`` and finish the grid."""
    steps = _check_steps(steps)
    if end not in ENDS:
        raise ValueError(f"end must be one of {ENDS}, got {end!r}")
    hi, lo = _range(process, t_max, t_min)
    if end == "zero":
        if not process.reaches_data:
            raise ValueError(f"end='zero': {process!r} cannot denoise to t = 0; use end='min'")
        n = steps
    else:
        n = steps + 1
    if n == 1:
        knots = torch.tensor([hi], dtype=torch.float64)
    else:
        knots = spacing(hi, lo, n).to(torch.float64)
        knots[0], knots[-1] = hi, lo  # exact end points whatever the round trip through the spacing
    if end == "zero":
        knots = torch.cat([knots, knots.new_zeros(1)])
    return validate(process, knots)


def uniform(process: Process, steps: int, *, end: str = "zero", t_max=None, t_min=None) -> torch.Tensor:
    """Uniform in process time ``t``."""
    return _build(process, steps, end, t_max, t_min,
                  lambda hi, lo, n: torch.linspace(hi, lo, n, dtype=torch.float64))


def logsnr(process: Process, steps: int, *, end: str = "zero", t_max=None, t_min=None) -> torch.Tensor:
    """Uniform in the log signal-to-noise ratio ``lambda`` (DPM-Solver's ``logSNR`` skip type)."""
    def spacing(hi, lo, n):
        lam_hi, lam_lo = float(process.lambda_(hi)), float(process.lambda_(lo))
        if not math.isfinite(lam_lo):
            raise ValueError(f"logsnr: lambda is infinite at t_min = {lo} for {process!r} (sigma is 0 there); "
                             f"pass t_min strictly inside")
        if math.isfinite(lam_hi):
            return process.t_of_lambda(torch.linspace(lam_hi, lam_lo, n, dtype=torch.float64))
        # alpha = 0 at t_max (a flow's pure noise): the knots are uniform in lambda from the mirror of
        # the low end, -lambda(t_min), and the first of them is moved to t_max, so the grid still starts
        # at the prior and its first step is the one from pure noise every log-SNR solver takes exactly
        lam = torch.linspace(min(-lam_lo, lam_lo - 1.0), lam_lo, n, dtype=torch.float64)
        return process.t_of_lambda(lam)
    return _build(process, steps, end, t_max, t_min, spacing)


def karras(process: Process, steps: int, rho: float = 7.0, *, end: str = "zero", t_max=None,
           t_min=None) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: uniform in ``s ** (1 / rho)`` of the noise level ``s = ode_sigma(t)``."""
    if not rho > 0:
        raise ValueError(f"karras: rho must be > 0, got {rho}")

    def spacing(hi, lo, n):
        s_hi, s_lo = process.ode_sigma(hi), process.ode_sigma(lo)
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        s = (s_hi ** (1 / rho) + ramp * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
        return process.t_of_ode_sigma(s)
    return _build(process, steps, end, t_max, t_min, spacing)


def quadratic(process: Process, steps: int, *, end: str = "zero", t_max=None, t_min=None) -> torch.Tensor:
    """Uniform in ``sqrt(t)`` (DDIM's ``quad`` and DPM-Solver's ``time_quadratic``)."""
    return _build(process, steps, end, t_max, t_min,
                  lambda hi, lo, n: torch.linspace(hi ** 0.5, lo ** 0.5, n, dtype=torch.float64) ** 2)


def shift(process: Process, grid, factor: float) -> torch.Tensor:
    """A flow grid with its noise levels shifted: ``t -> factor t / (1 + (factor - 1) t)``.

    The resolution-dependent shift of rectified-flow models (Esser et al. 2024,
    SD3, section 5.3.2; diffusers' ``shift``/``flow_shift``): ``factor > 1`` spends
    more steps at high noise. It maps [0, 1] onto itself, so it applies to
    processes whose time is the noise fraction (:class:`~diffsampler.Flow`).
    diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)`` visits
    ``shift(uniform(Flow(t_min=shift_of(1/1000)), n), s)``.
    """
    from .process import Flow

    if not isinstance(process, Flow):
        raise ValueError(f"shift: only flows (time in [0, 1] as the noise fraction) can be shifted, got {process!r}")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"shift: factor must be a finite number > 0, got {factor!r}")
    g = validate(process, grid)
    return validate(process, factor * g / (1.0 + (factor - 1.0) * g))


def explicit(process: Process, times: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """A grid from explicit process times (validated)."""
    return validate(process, times)


def validate(process: Process, grid) -> torch.Tensor:
    """Return ``grid`` as a float64 CPU tensor, or raise a ValueError saying what is wrong.

    A grid has at least two times, is finite and strictly decreasing, and lies in
    ``[t_min, t_max]``; its last time may be 0 when the process reaches data.
    """
    try:
        g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"grid must be a 1-D sequence of times, got {type(grid).__name__}: {err}") from None
    if g.ndim != 1 or g.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least 2 times (one step), got shape {tuple(g.shape)}")
    # (on Python numbers: a 50-step grid is checked in a few microseconds, where tensor ops took 25)
    times = g.tolist()
    if not all(map(math.isfinite, times)):
        raise ValueError(f"grid has non-finite times: {times}")
    for k in range(len(times) - 1):
        if not times[k + 1] < times[k]:
            raise ValueError(f"grid must be strictly decreasing; grid[{k}] = {times[k]} is followed by "
                             f"grid[{k + 1}] = {times[k + 1]}")
    inner = times[:-1] if (process.reaches_data and times[-1] == 0.0) else times
    lo, hi = min(inner), max(inner)
    # Times rounded to float32 at the ends (k-diffusion's get_sigmas_karras(n, 0.002, 80) gives
    # 0.0019999996) are within a few float32 ulps of the end: accepted and clamped onto it.
    below = process.t_min - _F32_ENDS * max(abs(process.t_min), 1e-30)
    above = process.t_max + _F32_ENDS * max(abs(process.t_max), 1e-30)
    if hi > above or lo < below:
        zero = " (or a final 0)" if process.reaches_data else ""
        raise ValueError(f"grid times must lie in [{process.t_min}, {process.t_max}]{zero} for {process!r}; "
                         f"got values from {lo} to {hi}")
    if hi > process.t_max or lo < process.t_min:
        clamped = [min(max(t, process.t_min), process.t_max) for t in inner] + times[len(inner):]
        if any(clamped[k + 1] >= clamped[k] for k in range(len(clamped) - 1)):
            raise ValueError(f"grid: times beyond the process's range [{process.t_min}, {process.t_max}] by float32 "
                             f"rounding clamp onto its ends, and the clamped grid is not strictly decreasing: {times}")
        g = torch.tensor(clamped, dtype=torch.float64)
    return g


# Relative distance beyond the process's time range that a grid's end may have from float32 rounding
# (4 ulps of float32).
_F32_ENDS = 4 * 2.0 ** -23


def dpm_fast(process: Process, steps: int, *, t_max=None, t_min=None) -> torch.Tensor:
    """DPM-Solver's "fast" grid (Lu et al. 2022, section 3.3; k-diffusion's ``sample_dpm_fast``).

    ``steps`` network evaluations are grouped as singlestep DPM-Solver uses them
    (:func:`diffsampler.solvers.singlestep.group_orders`: groups of three, the last of
    two and one, or of ``steps % 3``); group boundaries are uniform in log-SNR from
    ``t_max`` to ``t_min`` and each group of ``k`` evaluations is cut into ``k`` equal
    parts in log-SNR (DPM-Solver-3's ``r = 1/3, 2/3``, DPM-Solver-2's ``r = 1/2``).
    The grid ends at ``t_min``: use it with ``dpm_solver_singlestep`` (``solver_order=3``,
    ``solver_type="paper"``).
    """
    from .solvers.singlestep import group_orders

    steps = _check_steps(steps)
    hi, lo = _range(process, t_max, t_min)
    lam_hi, lam_lo = float(process.lambda_(hi)), float(process.lambda_(lo))
    positions = group_orders(steps, 3, True, False)
    sizes = [next((j - i for j in range(i + 1, steps) if positions[j] == 1), steps - i)
             for i, pos in enumerate(positions) if pos == 1]
    bounds = torch.linspace(lam_hi, lam_lo, len(sizes) + 1, dtype=torch.float64).tolist()
    lam = [lam_hi]
    for (a, b), k in zip(zip(bounds[:-1], bounds[1:]), sizes):
        lam += [a + (b - a) * j / k for j in range(1, k + 1)]
    knots = process.t_of_lambda(torch.tensor(lam, dtype=torch.float64))
    knots[0], knots[-1] = hi, lo
    return validate(process, knots)


GRIDS: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": uniform,
    "logsnr": logsnr,
    "karras": karras,
    "quadratic": quadratic,
    "dpm_fast": dpm_fast,
}


def names() -> list[str]:
    return sorted(GRIDS)


def get(name: str, process: Process, steps: int, **options) -> torch.Tensor:
    """Build the grid called ``name``; an unknown name lists the valid ones."""
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; valid grids: {', '.join(names())}")
    return GRIDS[name](process, steps, **options)
