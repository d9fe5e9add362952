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

__all__ = ["uniform", "logsnr", "karras", "quadratic", "explicit", "shift", "validate", "get", "names", "GRIDS",
           "dpm_fast", "exponential", "polyexponential", "kl_optimal", "vp", "laplace", "normal", "sgm_uniform",
           "simple", "ddim_uniform", "beta", "linear_quadratic", "ays", "AYS_NOISE_LEVELS"]

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


def validate(process: Process, grid, *, increasing: bool = False) -> torch.Tensor:
    """Return ``grid`` as a float64 CPU tensor, or raise a ValueError saying what is wrong.

    A grid has at least two times, is finite and strictly decreasing, and lies in
    ``[t_min, t_max]``; its last time may be 0 when the process reaches data.
    ``increasing=True`` checks the same grid run backward (strictly increasing, its first
    time may be 0): only inversion (:mod:`diffsampler.inversion`) runs a grid that way.
    """
    if increasing:
        g = validate(process, torch.as_tensor(_increasing(grid), dtype=torch.float64).flip(0))
        return g.flip(0)
    times = _times(grid)
    g = torch.tensor(times, dtype=torch.float64)
    if not all(map(math.isfinite, times)):
        raise ValueError(f"grid has non-finite times: {times}")
    if len(times) > 1 and all(times[k + 1] > times[k] for k in range(len(times) - 1)):
        raise ValueError(f"grid must be strictly decreasing (sampling runs from noise at grid[0] to data), got an "
                         f"increasing grid from {times[0]} to {times[-1]}; to run a grid backward (inversion) pass "
                         f"the ordinary decreasing grid to ds.invert(model, x0, grid, method)")
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


def _times(grid) -> list[float]:
    """``grid``'s times as Python floats, checked to be a 1-D sequence of at least two."""
    try:
        g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"grid must be a 1-D sequence of times, got {type(grid).__name__}: {err}") from None
    if g.ndim != 1 or g.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least 2 times (one step), got shape {tuple(g.shape)}")
    # (on Python numbers: a 50-step grid is checked in a few microseconds, where tensor ops took 25)
    return g.tolist()


def _increasing(grid) -> list:
    """``grid``'s times, checked to be strictly increasing (a grid run backward)."""
    times = _times(grid)
    for k in range(len(times) - 1):
        if not times[k + 1] > times[k]:
            raise ValueError(f"a grid run backward must be strictly increasing; grid[{k}] = {times[k]} is "
                             f"followed by grid[{k + 1}] = {times[k + 1]}")
    return times


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


# -- the schedules of k-diffusion and ComfyUI ---------------------------------------------------------
# k-diffusion's get_sigmas_* and ComfyUI's schedulers place noise levels ``s = ode_sigma(t)`` (EDM's sigma
# for VP and EDM, t for flows); these builders place the same levels and map them to process times with
# ``t_of_ode_sigma``, as ``karras`` does. The ones ComfyUI builds from a model's table of noise levels
# (``model_sampling.sigmas``) read that table from the process (:func:`_levels`).

def _sigma_spacing(process: Process, rule: Callable[[float, float, int], torch.Tensor]):
    """A ``spacing`` for :func:`_build` that places noise levels ``rule(s_hi, s_lo, n)`` (decreasing)."""
    def spacing(hi, lo, n):
        s = rule(float(process.ode_sigma(hi)), float(process.ode_sigma(lo)), n).to(torch.float64)
        return process.t_of_ode_sigma(s)
    return spacing


def exponential(process: Process, steps: int, *, end: str = "zero", t_max=None, t_min=None) -> torch.Tensor:
    """Uniform in ``log ode_sigma`` (k-diffusion's ``get_sigmas_exponential``, ComfyUI's ``exponential``).

    For VP and EDM, ``-log ode_sigma`` is the log-SNR: this is :func:`logsnr`. For a flow it is uniform in
    ``log t`` (``ode_sigma = t``), which is what ComfyUI gives a flow model.
    """
    return polyexponential(process, steps, 1.0, end=end, t_max=t_max, t_min=t_min)


def polyexponential(process: Process, steps: int, rho: float = 1.0, *, end: str = "zero", t_max=None,
                    t_min=None) -> torch.Tensor:
    """``log ode_sigma`` a polynomial of degree ``rho`` in the step fraction (k-diffusion's
    ``get_sigmas_polyexponential``): ``log s = ramp^rho (log s_max - log s_min) + log s_min``, ``ramp`` from
    1 to 0. ``rho = 1`` is :func:`exponential`; ``rho > 1`` spends more steps at low noise."""
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"polyexponential: rho must be a finite number > 0, got {rho!r}")

    def rule(s_hi, s_lo, n):
        ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
        return torch.exp(ramp * (math.log(s_hi) - math.log(s_lo)) + math.log(s_lo))
    return _build(process, steps, end, t_max, t_min, _sigma_spacing(process, rule))


def kl_optimal(process: Process, steps: int, *, end: str = "zero", t_max=None, t_min=None) -> torch.Tensor:
    """Uniform in ``arctan(ode_sigma)`` (ComfyUI's ``kl_optimal``, from AUTOMATIC1111's PR 15608; the
    KL-optimal schedule of Align Your Steps for Gaussian data, Sabour et al. 2024)."""
    def rule(s_hi, s_lo, n):
        f = torch.linspace(0, 1, n, dtype=torch.float64)
        return torch.tan(f * math.atan(s_lo) + (1 - f) * math.atan(s_hi))
    return _build(process, steps, end, t_max, t_min, _sigma_spacing(process, rule))


def _finish(process: Process, name: str, sigmas, end: str) -> torch.Tensor:
    """Times of decreasing noise levels ``sigmas`` (the ends snap onto the process's range), then 0 for
    ``end="zero"``."""
    if end not in ENDS:
        raise ValueError(f"end must be one of {ENDS}, got {end!r}")
    if end == "zero" and not process.reaches_data:
        raise ValueError(f"end='zero': {process!r} cannot denoise to t = 0; use end='min'")
    s_hi, s_lo = float(process.ode_sigma(process.t_max)), float(process.ode_sigma(process.t_min))
    times = []
    for s in (float(v) for v in sigmas):
        if s == 0.0:
            times.append(0.0)
        elif abs(s - s_hi) <= 1e-12 * s_hi:
            times.append(process.t_max)
        elif abs(s - s_lo) <= 1e-12 * s_lo:
            times.append(process.t_min)
        elif s_lo < s < s_hi:
            times.append(float(process.t_of_ode_sigma(s)))
        else:
            raise ValueError(f"{name}: noise level {s} is outside {process!r}'s range [{s_lo}, {s_hi}] "
                             f"(ode_sigma from t_min to t_max)")
    if end == "zero" and times[-1] != 0.0:
        times.append(0.0)
    return validate(process, times)


def vp(process: Process, steps: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, *,
       end: str = "zero") -> torch.Tensor:
    """The noise levels of continuous VP with a linear beta at ``t`` uniform from 1 to ``eps_s``
    (k-diffusion's ``get_sigmas_vp``): ``s = sqrt(expm1(beta_d t^2 / 2 + beta_min t))``. On ``VP.linear()``
    (``beta_d = beta_max - beta_min``) it is :func:`uniform`; on another process the levels must lie in its
    range."""
    steps = _check_steps(steps)
    for name, v in (("beta_d", beta_d), ("beta_min", beta_min), ("eps_s", eps_s)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"vp: {name} must be a finite number > 0, got {v!r}")
    if not eps_s < 1:
        raise ValueError(f"vp: eps_s must be < 1, got {eps_s!r}")
    u = torch.linspace(1, eps_s, steps if end == "zero" else steps + 1, dtype=torch.float64)
    return _finish(process, "vp", torch.sqrt(torch.special.expm1(beta_d * u ** 2 / 2 + beta_min * u)), end)


def laplace(process: Process, steps: int, mu: float = 0.0, beta: float = 0.5, *, end: str = "zero") -> torch.Tensor:
    """Laplace schedule (Hang et al. 2024, "Improved Noise Schedule for Diffusion Training"; k-diffusion's
    ``get_sigmas_laplace``): ``log s`` at the quantiles of a Laplace distribution of location ``mu`` and
    scale ``beta``, clamped to the process's noise range. Levels the clamp makes equal are kept once, so
    the grid may have fewer steps than asked. k-diffusion's own grid has no final 0: ``end="min"``.
    """
    steps = _check_steps(steps)
    if not (isinstance(mu, (int, float)) and math.isfinite(mu)):
        raise ValueError(f"laplace: mu must be a finite number, got {mu!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"laplace: beta must be a finite number > 0, got {beta!r}")
    n = steps if end == "zero" else steps + 1
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    lam = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
    s_hi, s_lo = float(process.ode_sigma(process.t_max)), float(process.ode_sigma(process.t_min))
    levels = torch.exp(lam).clamp(s_lo, s_hi).tolist()
    levels = [v for k, v in enumerate(levels) if k == 0 or v != levels[k - 1]]
    return _finish(process, "laplace", levels, end)


def _levels(process: Process) -> list[float]:
    """The process times of a model's table of noise levels, increasing (ComfyUI's ``model_sampling.sigmas``).

    A discrete VP's training timesteps; EDM: 1000 levels uniform in ``log sigma`` (ComfyUI's
    ``ModelSamplingContinuousEDM``); any other process (flows: ComfyUI's ``k / 1000``): 1000 times uniform
    in ``t`` from ``t_min`` to ``t_max``.
    """
    from .process import EDM, VPDiscrete

    if isinstance(process, VPDiscrete):
        return [(k + 1) / process.num_train_timesteps for k in range(process.num_train_timesteps)]
    if isinstance(process, EDM):
        out = torch.linspace(math.log(process.t_min), math.log(process.t_max), 1000, dtype=torch.float64).exp()
    else:
        out = torch.linspace(process.t_min, process.t_max, 1000, dtype=torch.float64)
    out = out.tolist()
    out[0], out[-1] = process.t_min, process.t_max
    return out


def _timestep_times(process: Process, hi: float, lo: float, fractions) -> list[float]:
    """Times at ``fractions`` (0 at ``hi``, 1 at ``lo``) of the way along the model's timestep axis (ComfyUI's
    ``model_sampling.timestep``/``sigma``): a discrete VP's timestep index, its noise levels between training
    timesteps interpolated in ``log sigma``; EDM's ``log sigma``; any other process's ``t``."""
    from .process import EDM, VPDiscrete

    out = []
    if isinstance(process, VPDiscrete):
        n = process.num_train_timesteps
        u_hi, u_lo = n * hi - 1.0, n * lo - 1.0
        for f in fractions:
            u = u_hi + f * (u_lo - u_hi)
            k, w = math.floor(u), u - math.floor(u)
            if w < 1e-9 or w > 1 - 1e-9:  # on a training timestep
                out.append((round(u) + 1) / n)
                continue
            log_s = (1 - w) * math.log(float(process.ode_sigma((k + 1) / n))) \
                + w * math.log(float(process.ode_sigma((k + 2) / n)))
            out.append(float(process.t_of_ode_sigma(math.exp(log_s))))
    elif isinstance(process, EDM):
        out = [math.exp(math.log(hi) + f * (math.log(lo) - math.log(hi))) for f in fractions]
    else:
        out = [hi + f * (lo - hi) for f in fractions]
    return out


def normal(process: Process, steps: int, *, end: str = "zero", t_max=None, t_min=None) -> torch.Tensor:
    """Uniform along the model's timestep (ComfyUI's ``normal``, the default of its KSampler).

    On flows (and continuous VP) this is :func:`uniform`; on EDM it is uniform in ``log sigma``
    (:func:`exponential`); on a discrete VP the times are uniform too, with ComfyUI's noise levels between
    training timesteps (log-linear in the timestep, where the process interpolates ``log alpha``: the two
    differ by at most 4e-4 relative in sigma (1.4e-4 for Stable Diffusion's process), and agree on the training
    timesteps).
    """
    return _build(process, steps, end, t_max, t_min, lambda hi, lo, n: torch.tensor(
        _timestep_times(process, hi, lo, [k / (n - 1) for k in range(n)]), dtype=torch.float64))


def sgm_uniform(process: Process, steps: int) -> torch.Tensor:
    """``steps + 1`` times uniform along the model's timestep from ``t_max`` to ``t_min``, the last replaced
    by 0 (ComfyUI's ``sgm_uniform``, Stability's "trailing" spacing): the final step starts one step above
    ``t_min``."""
    steps = _check_steps(steps)
    times = _timestep_times(process, process.t_max, process.t_min, [k / steps for k in range(steps)])
    return _finish_times(process, "sgm_uniform", times)


def _finish_times(process: Process, name: str, times) -> torch.Tensor:
    if not process.reaches_data:
        raise ValueError(f"{name}: {process!r} cannot denoise to t = 0, which this schedule ends at")
    return validate(process, list(times) + [0.0])


def simple(process: Process, steps: int) -> torch.Tensor:
    """Every ``len/steps``-th level of the model's table from the top (ComfyUI's ``simple``), then 0."""
    steps = _check_steps(steps)
    table = _levels(process)
    stride = len(table) / steps
    return _finish_times(process, "simple", [table[-(1 + int(k * stride))] for k in range(steps)])


def ddim_uniform(process: Process, steps: int) -> torch.Tensor:
    """Every ``len // steps``-th level of the model's table from its second one up, then 0 (ComfyUI's
    ``ddim_uniform``, DDIM's "uniform" timesteps ``1, 1 + c, 1 + 2c, ...``). As in ComfyUI the grid starts
    below ``t_max`` and may have a step more than asked when ``steps`` does not divide the table."""
    steps = _check_steps(steps)
    table = _levels(process)
    stride = max(len(table) // steps, 1)
    return _finish_times(process, "ddim_uniform", table[1::stride][::-1])


def beta(process: Process, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Levels of the model's table at the quantiles of a Beta(``alpha``, ``beta``) distribution (Lee et al.
    2024, arXiv:2407.12173; ComfyUI's ``beta``), then 0. Quantiles that round to one table entry are kept
    once, so the grid may have fewer steps than asked."""
    import numpy as np
    from scipy import stats

    steps = _check_steps(steps)
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"beta: {name} must be a finite number > 0, got {v!r}")
    table = _levels(process)
    idx = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * (len(table) - 1))
    idx = [int(k) for j, k in enumerate(idx) if j == 0 or k != idx[j - 1]]
    return _finish_times(process, "beta", [table[k] for k in idx])


def linear_quadratic(process: Process, steps: int, threshold_noise: float = 0.025,
                     linear_steps: int | None = None) -> torch.Tensor:
    """Mochi's linear-then-quadratic schedule (ComfyUI's ``linear_quadratic``), made for flows: the noise
    fraction ``1 - s / s_max`` rises linearly to ``threshold_noise`` over ``linear_steps`` (default half the
    steps), then quadratically to 1; ``s_max = ode_sigma(t_max)``."""
    steps = _check_steps(steps)
    if not (isinstance(threshold_noise, (int, float)) and 0 < threshold_noise < 1):
        raise ValueError(f"linear_quadratic: threshold_noise must be in (0, 1), got {threshold_noise!r}")
    if steps == 1:
        fractions = [0.0, 1.0]
    else:
        lin = steps // 2 if linear_steps is None else operator.index(linear_steps)
        if not 0 < lin < steps:
            raise ValueError(f"linear_quadratic: linear_steps must be in [1, steps - 1], got {linear_steps!r}")
        quad = steps - lin
        excess = lin - threshold_noise * steps
        a = excess / (lin * quad ** 2)
        b = threshold_noise / lin - 2 * excess / quad ** 2
        c = a * lin ** 2
        fractions = [k * threshold_noise / lin for k in range(lin)] + [a * k * k + b * k + c for k in range(lin, steps)]
        fractions.append(1.0)
    s_max = float(process.ode_sigma(process.t_max))
    return _finish(process, "linear_quadratic", [s_max * (1.0 - f) for f in fractions], "zero")


#: The 10-step noise levels (EDM sigma) of Align Your Steps (Sabour et al. 2024, arXiv:2404.14507) for Stable
#: Diffusion 1.5, SDXL and Stable Video Diffusion, as NVIDIA publishes them and ComfyUI ships them.
AYS_NOISE_LEVELS = {
    "SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def ays(process: Process, steps: int, model: str = "SD1") -> torch.Tensor:
    """Align Your Steps (Sabour et al. 2024): the published 10-step noise levels of ``model`` ("SD1", "SDXL"
    for the Stable Diffusion VP process, "SVD" for ``EDM(0.002, 700)``), interpolated log-linearly to
    ``steps`` (ComfyUI's ``AlignYourStepsScheduler``), the last level replaced by 0."""
    steps = _check_steps(steps)
    if model not in AYS_NOISE_LEVELS:
        raise ValueError(f"ays: model must be one of {', '.join(AYS_NOISE_LEVELS)}, got {model!r}")
    table = AYS_NOISE_LEVELS[model]
    if steps + 1 == len(table):
        levels = list(table)
    else:
        # log-linear interpolation over the table's positions, from the bottom up
        logs = [math.log(v) for v in table[::-1]]
        levels = []
        for k in range(steps + 1):
            u = k / steps * (len(table) - 1)
            j = min(int(u), len(table) - 2)
            levels.append(math.exp(logs[j] + (u - j) * (logs[j + 1] - logs[j])))
        levels = levels[::-1]
    levels[-1] = 0.0
    return _finish(process, "ays", levels, "zero")


GRIDS: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": uniform,
    "logsnr": logsnr,
    "karras": karras,
    "quadratic": quadratic,
    "dpm_fast": dpm_fast,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "kl_optimal": kl_optimal,
    "vp": vp,
    "laplace": laplace,
    "normal": normal,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "linear_quadratic": linear_quadratic,
    "ays": ays,
}


def names() -> list[str]:
    return sorted(GRIDS)


def get(name: str, process: Process, steps: int, **options) -> torch.Tensor:
    """Build the grid called ``name``; an unknown name lists the valid ones."""
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; valid grids: {', '.join(names())}")
    return GRIDS[name](process, steps, **options)
