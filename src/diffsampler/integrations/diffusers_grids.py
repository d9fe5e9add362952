"""The grid a diffusers scheduler steps through, as a diffsampler grid: :func:`grid_from_scheduler`."""

from __future__ import annotations

import copy
import inspect
import warnings

import torch

from .. import grids as _grids
from ..process import Flow, Process, VPDiscrete
from .diffusers_models import process_from_config

__all__ = ["grid_from_scheduler"]

# Schedulers that step from ``sigmas[i]`` to ``sigmas[i + 1]`` (noise levels in EDM scale,
# ``sqrt((1 - alphabar) / alphabar)``; for flows the flow time itself).
_SIGMA_SCHEDULERS = (
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
    "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "LMSDiscreteScheduler", "DPMSolverSDEScheduler", "SASolverScheduler",
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
)
# Schedulers that list one entry per network evaluation, so that a step of two stages repeats its
# knot (Heun, FlowMatchHeun, DPMSolverSDE) or lists it next to an interpolated midpoint that lives
# apart in ``sigmas_interpol`` (KDPM2): their knots are the distinct consecutive ``sigmas``.
_STAGE_LISTING_SCHEDULERS = (
    "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler", "FlowMatchHeunDiscreteScheduler",
)
# Schedulers that step from ``alphas_cumprod[timestep]`` to ``alphas_cumprod[previous timestep]``.
_ALPHA_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler")

SUPPORTED_SCHEDULERS = _ALPHA_SCHEDULERS + _SIGMA_SCHEDULERS

# diffusers keeps sigmas in float32 and computes them from float32 alphas_cumprod: a scheduler's
# sigma and our float64 sigma of the same training node agree to a few float32 ulps, while two
# neighbouring nodes differ by at least beta / 2 (> 1e-5 relative for every schedule in use).
_NODE_RTOL = 1e-6


def _scheduler_copy(scheduler_or_config):
    """A private scheduler: a deep copy of an instance, or the class a config's ``_class_name`` names."""
    if isinstance(scheduler_or_config, dict):  # diffusers' FrozenDict configs included
        name = scheduler_or_config.get("_class_name")
        if name is None:
            raise ValueError("grid_from_scheduler: a scheduler config needs '_class_name' to say which "
                             f"scheduler it configures; supported: {', '.join(SUPPORTED_SCHEDULERS)}")
        if name not in SUPPORTED_SCHEDULERS:
            raise ValueError(f"grid_from_scheduler: scheduler class {name!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_SCHEDULERS)}")
        import diffusers

        return getattr(diffusers, name).from_config(dict(scheduler_or_config))
    name = type(scheduler_or_config).__name__
    if name not in SUPPORTED_SCHEDULERS or not hasattr(scheduler_or_config, "set_timesteps"):
        raise ValueError(f"grid_from_scheduler: scheduler class {name!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_SCHEDULERS)}")
    # set_timesteps mutates the scheduler (timesteps, step index, multistep history): work on a copy.
    return copy.deepcopy(scheduler_or_config)


def _set_timesteps(scheduler, steps, sigmas, timesteps, mu) -> None:
    """Call the scheduler's own ``set_timesteps`` with the arguments a pipeline would pass."""
    name = type(scheduler).__name__
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"grid_from_scheduler: steps must be a positive int, got {steps!r}")
    if steps is None and sigmas is None and timesteps is None:
        raise ValueError("grid_from_scheduler: give steps (a positive int), or sigmas= or timesteps= "
                         "where the scheduler accepts them")
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    kwargs = {}
    for key, value in (("sigmas", sigmas), ("timesteps", timesteps), ("mu", mu)):
        if value is None:
            continue
        if key not in accepted:
            allowed = [k for k in ("sigmas", "timesteps", "mu") if k in accepted]
            raise ValueError(f"grid_from_scheduler: {name}.set_timesteps takes no {key}= (got {value!r}); "
                             f"it accepts {', '.join(allowed) or 'only the number of steps'}")
        kwargs[key] = value
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    try:
        scheduler.set_timesteps(**kwargs)
    except (ValueError, TypeError) as err:
        call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ValueError(f"grid_from_scheduler: {name}.set_timesteps({call}) failed: {err}") from err


def _distinct_consecutive(values: list[float]) -> list[float]:
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def _vp_time_of_sigma(process: Process, sigma: float) -> float:
    """Process time at EDM noise level ``sigma``, on the training node when ``sigma`` is a node's.

    diffusers maps a sigma between nodes to a timestep by interpolating log-sigma linearly
    (``_sigma_to_t``), while :class:`VPDiscrete` interpolates log-alpha linearly in ``t``; the two
    agree on the nodes only. Between nodes no time satisfies both, and we keep the sigma (the
    solver then steps exactly where the scheduler steps; the network's timestep differs from the
    scheduler's by the gap between the two interpolations, see :func:`grid_from_scheduler`). On a
    node the float32 sigma would place ``t`` a few ulps off it; snapping it back makes the network
    timestep the integer the scheduler passes.
    """
    if sigma == 0.0:
        return 0.0
    t = float(process.t_of_ode_sigma(sigma))
    if isinstance(process, VPDiscrete):
        n = process.num_train_timesteps
        node = min(max(round(t * n), 1), n) / n
        if abs(float(process.ode_sigma(node)) / sigma - 1.0) <= _NODE_RTOL:
            return node
    if t > process.t_max:
        if float(process.ode_sigma(process.t_max)) / sigma - 1.0 < -_NODE_RTOL:
            raise ValueError(f"grid_from_scheduler: sigma {sigma} is above the process's largest noise level "
                             f"{float(process.ode_sigma(process.t_max))} ({process!r})")
        t = process.t_max
    return t


def _sigma_grid(scheduler, process: Process) -> list[float]:
    name = type(scheduler).__name__
    sigmas = scheduler.sigmas.to(torch.float64).flatten().tolist()
    if name in _STAGE_LISTING_SCHEDULERS:
        sigmas = _distinct_consecutive(sigmas)
    if isinstance(process, Flow):
        # Flow schedulers' sigma is the flow time itself; the network sees sigma * num_train_timesteps.
        return [min(s, process.t_max) if s > 0 else 0.0 for s in sigmas]
    return [_vp_time_of_sigma(process, s) for s in sigmas]


def _alpha_grid(scheduler, process: Process) -> list[float]:
    """Knots of DDIM, DDPM and PNDM: their timesteps, then the state of their last step's target.

    These schedulers step from ``alphas_cumprod[timestep]`` to ``alphas_cumprod[previous]``, where
    ``previous`` is ``timestep - N // steps`` (DDPM: ``previous_timestep``) and a negative one means
    the final state (``alphas_cumprod = 1``, i.e. data, or ``alphas_cumprod[0]`` when
    ``set_alpha_to_one=False``). PNDM's PRK warm-up evaluates each of its Runge-Kutta steps four
    times (``t, t - h/2, t - h/2, t - h``) and PLMS repeats its first timestep (its second-order
    start); the knots are the ends of these steps.
    """
    name = type(scheduler).__name__
    if not isinstance(process, VPDiscrete):
        raise TypeError(f"grid_from_scheduler: {name} steps over training timesteps and needs a VPDiscrete "
                        f"process, got {process!r}")
    n_train = int(scheduler.config.num_train_timesteps)
    if name == "LCMScheduler":
        # LCM re-noises to the next listed timestep and its last step returns the data estimate.
        return [float(process.t_of_timestep(int(k))) for k in scheduler.timesteps] + [0.0]
    if name == "PNDMScheduler":
        prk = [int(v) for v in scheduler.prk_timesteps][::4]
        knots = prk + _distinct_consecutive([int(v) for v in scheduler.plms_timesteps])
        knots = _distinct_consecutive(knots)
    else:
        knots = [int(v) for v in scheduler.timesteps]
    if hasattr(scheduler, "previous_timestep"):
        previous = [int(scheduler.previous_timestep(torch.tensor(k))) for k in knots]
    else:
        previous = [k - n_train // scheduler.num_inference_steps for k in knots]
    for k, (target, following) in enumerate(zip(previous[:-1], knots[1:])):
        if target != following:
            warnings.warn(f"grid_from_scheduler: {name} (timestep_spacing="
                          f"{scheduler.config.get('timestep_spacing')!r}) steps from timestep {knots[k]} to "
                          f"{target} but evaluates the network next at {following}; no grid reproduces that, "
                          "and this grid follows the evaluations", stacklevel=3)
            break
    times = [float(process.t_of_timestep(k)) for k in knots]
    if previous[-1] >= 0:
        times.append(float(process.t_of_timestep(previous[-1])))
    else:
        final = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        times.append(0.0 if final == 1.0 else float(process.t_of_timestep(0)))
        if final not in (1.0, float(scheduler.alphas_cumprod[0])):
            raise ValueError(f"grid_from_scheduler: {name} ends at alphas_cumprod {final}, neither 1 nor "
                             "alphas_cumprod[0]")
    return times


def grid_from_scheduler(scheduler, steps: int | None = None, *, sigmas=None, timesteps=None, mu=None,
                        process: Process | None = None) -> torch.Tensor:
    """The process times a diffusers scheduler steps through, as a diffsampler grid.

    The scheduler (an instance, or a config dict with ``_class_name``) is copied, never changed: its
    own ``set_timesteps(steps, timesteps=, sigmas=, mu=)`` runs on the copy, with the arguments a
    pipeline passes (Flux and SD3 pass ``sigmas`` and ``mu`` for dynamic shifting), and what it
    produced is converted to times of ``process`` (default :func:`process_from_config`: VPDiscrete
    for the discrete-VP schedulers, Flow for flow matching). The grid ends at the state the
    scheduler's last step reaches. Run it with the Denoiser of :func:`from_diffusers` and the
    solver matching the scheduler (``"ddim"``, ``"euler"``, ``"dpmpp_2m"``, ...).

    What the grid is, per family:

    * **DDIM, DDPM, PNDM, LCM** (step between ``alphas_cumprod`` entries): the timesteps, at
      ``t = (timestep + 1) / N``, then the last step's target: ``t = 0`` (data) with
      ``set_alpha_to_one=True`` (DDPM and LCM always), else ``alphas_cumprod[0]``, ``t = 1 / N``.
      PNDM: the ends of its steps; with the PRK warm-up (``skip_prk_steps=False``) the ends of its
      three Runge-Kutta steps (every fourth PRK timestep; the midpoints are stages), then the PLMS
      timesteps; with ``skip_prk_steps=True`` the PLMS timesteps, the repeated second one (its
      two-evaluation start) counted once. DDIM and PNDM step to ``timestep - N // steps``; where
      that is not the next timestep (``"linspace"``, or ``"trailing"`` when ``steps`` does not
      divide ``N``) diffusers' own loop evaluates the network at a noise level the sample is not
      at: the grid follows the evaluations, and a warning says so.
    * **Sigma-space schedulers** (DPM-Solver multistep and singlestep, DEIS, UniPC, Euler, Euler
      ancestral, Heun, KDPM2 and its ancestral variant, LMS, DPM-Solver SDE, SA-Solver): their
      ``sigmas``, ending with the final one (0 for data; ``final_sigmas_type="sigma_min"`` and
      DEIS end at the smallest training sigma, ``t = 1 / N``). Schedulers that list every stage
      (Heun, KDPM2, DPM-Solver SDE) give the knots of their steps, not the stage times.
    * Where the last step goes from a noise level to itself (DDIM/PNDM ending at timestep 0
      without ``set_alpha_to_one``; DEIS with Karras, exponential or beta sigmas, which end on
      sigma_min twice) the grid ends at that level: diffusers spends a network call on a step
      that changes nothing.
    * **Flow matching** (FlowMatchEuler, FlowMatchHeun): ``t = sigma``, ending at 0; shift,
      dynamic shifting with ``mu``, ``sigmas=`` and Karras / exponential / beta sigmas are the
      scheduler's own.

    Precision: ``process.ode_sigma(t)`` equals the scheduler's sigma (VP) or
    ``sqrt((1 - alphas_cumprod) / alphas_cumprod)`` (DDIM family) at every knot to float32
    round-off, and a Denoiser of :func:`from_diffusers` gives the network the scheduler's own
    timestep on every knot that is a training node (``N t - 1``; every integer timestep of DDIM,
    DDPM, PNDM, of the DPM-Solver/UniPC/DEIS family and of Euler-family "leading"/"trailing"
    spacing) and for flows (``1000 t``). Between nodes (Karras, exponential or beta sigmas;
    "linspace" spacing with fractional timesteps) the two cannot both hold: diffusers interpolates
    log-sigma (``_sigma_to_t``; Euler's fractional timesteps interpolate sigma itself) while
    :class:`~diffsampler.process.VPDiscrete` interpolates log-alpha, and DPM-Solver rounds its
    timesteps. The grid keeps the scheduler's sigma, so the steps are diffusers' and only the
    network's time input differs, by the gap between the interpolations.

    Not supported: other scheduler classes (TCD, EDM, DDIM inverse, IPNDM, ...),
    ``invert_sigmas=True`` (a grid from data towards noise), and schedulers whose steps are not
    between consecutive listed noise levels.

    Parameters
    ----------
    scheduler
        A diffusers scheduler of a class in ``SUPPORTED_SCHEDULERS``, or its config with
        ``_class_name``.
    steps
        ``num_inference_steps``; may be omitted where ``sigmas`` or ``timesteps`` give the grid.
    sigmas, timesteps, mu
        Passed to ``set_timesteps`` where the scheduler accepts them.
    process
        The process whose times the grid holds; default ``process_from_config(scheduler)``.

    Returns
    -------
    torch.Tensor
        float64, 1-D, strictly decreasing process times.
    """
    if callable(getattr(scheduler, "base_scheduler_config", None)):
        # a DiffsamplerScheduler: the grid its solver steps through (its timesteps list every evaluation)
        own = type(scheduler).from_config(scheduler.config)
        own.set_timesteps(steps, sigmas=sigmas, timesteps=timesteps, mu=mu)
        return own.grid.clone() if process is None else _grids.validate(process, own.grid)
    scheduler = _scheduler_copy(scheduler)
    name = type(scheduler).__name__
    if scheduler.config.get("invert_sigmas"):
        raise ValueError(f"grid_from_scheduler: {name} with invert_sigmas=True runs from data towards noise; "
                         "only sampling grids (invert_sigmas=False) are supported")
    if process is None:
        process = process_from_config(scheduler)
    elif not isinstance(process, Process):
        raise TypeError(f"grid_from_scheduler: process must be a diffsampler Process, got {type(process).__name__}")
    is_flow_scheduler = name.startswith("FlowMatch")
    if is_flow_scheduler != isinstance(process, Flow):
        raise TypeError(f"grid_from_scheduler: {name} needs a {'Flow' if is_flow_scheduler else 'VP'} process, "
                        f"got {process!r}")
    _set_timesteps(scheduler, steps, sigmas, timesteps, mu)
    times = _sigma_grid(scheduler, process) if name in _SIGMA_SCHEDULERS else _alpha_grid(scheduler, process)
    if len(times) > 2 and times[-1] == times[-2]:
        # The scheduler's last step goes from a noise level to itself (DDIM/PNDM with
        # set_alpha_to_one=False ending at timestep 0; DEIS with Karras, exponential or beta
        # sigmas, which end at sigma_min twice). With a zero step in log-SNR every one of these
        # updates returns its input, so diffusers spends a network call on nothing; the grid ends
        # at that level instead.
        times.pop()
    for earlier, later in zip(times[:-1], times[1:]):
        if not later < earlier:
            raise ValueError(f"grid_from_scheduler: {name}'s schedule does not strictly decrease after conversion "
                             f"to process times: t = {earlier!r} is followed by {later!r} "
                             f"(times {[round(t, 6) for t in times]})")
    return torch.tensor(times, dtype=torch.float64)
