"""Adapters that run the peers' samplers (k-diffusion, diffusers) on a diffsampler Denoiser.

They exist to compare like with like: the same model, the same start point and
the same noise levels. Both peers are optional dependencies (``pip install
'diffsampler[peers]'``; k-diffusion with ``--no-deps``).

k-diffusion's package ``__init__`` imports its training stack (and torchvision,
which does not load beside the CPU torch), while ``k_diffusion.sampling`` needs
only ``utils.append_dims``. :func:`kdiffusion_sampling` registers the package by
its spec and a one-function ``utils`` module, then imports ``sampling`` alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Callable

import torch

from ..denoiser import Denoiser
from ..integrations.diffusers_grids import grid_from_scheduler
from ..process import Process, VPDiscrete

__all__ = ["kdiffusion_sampling", "kdiffusion_denoiser", "run_kdiffusion", "run_diffusers",
           "diffusers_grid", "run_diffusers_flow", "diffusers_flow_grid", "vp_process_of"]


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def kdiffusion_sampling():
    """``k_diffusion.sampling`` imported without the package ``__init__``."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion")
    if "k_diffusion" not in sys.modules:
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["k_diffusion"] = pkg
    if "k_diffusion.utils" not in sys.modules:
        utils = types.ModuleType("k_diffusion.utils")
        utils.append_dims = _append_dims
        sys.modules["k_diffusion.utils"] = utils
        sys.modules["k_diffusion"].utils = utils
    return importlib.import_module("k_diffusion.sampling")


# -- k-diffusion -------------------------------------------------------------

def kdiffusion_denoiser(model: Denoiser, **cond) -> Callable:
    """``D(y, s)`` in k-diffusion's convention for ``model``, in the process's ODE coordinates.

    ``y = x / ode_scale(t)`` and ``s = ode_sigma(t)`` (EDM variables for VP and
    EDM, ``(x, t)`` for flows), so ``(y - D) / s`` is the ODE derivative k-diffusion
    integrates.
    """
    p = model.process

    def denoise(y, sigma):
        t = float(p.t_of_ode_sigma(float(sigma.reshape(-1)[0])))
        return model(y * float(p.ode_scale(t)), t, **cond).x0

    return denoise


def run_kdiffusion(name: str, model: Denoiser, x: torch.Tensor, grid: torch.Tensor, noise=None,
                   **options) -> torch.Tensor:
    """Run ``k_diffusion.sampling.sample_<name>`` from ``x`` at ``grid[0]`` over ``grid`` (process times).

    ``noise`` (a :class:`~diffsampler.noise.StepNoise`) feeds k-diffusion's
    ``noise_sampler``: the draw for the step that starts at ``sigmas[i]`` is
    ``noise.draw(i)``, the same one our solvers use for step ``i``; a Brownian
    noise source answers k-diffusion's ``(sigma, sigma_next)`` with its increment.
    """
    ks = kdiffusion_sampling()
    p = model.process
    sigmas = torch.tensor([float(p.ode_sigma(float(t))) for t in grid], dtype=x.dtype)
    y = x / float(p.ode_scale(float(grid[0])))
    fn = getattr(ks, f"sample_{name}")
    if noise is not None and hasattr(noise, "between"):
        options["noise_sampler"] = lambda sigma, sigma_next: noise.between(float(sigma), float(sigma_next))
    elif noise is not None:
        index = {float(s): i for i, s in enumerate(sigmas[:-1])}
        options["noise_sampler"] = lambda sigma, sigma_next: noise.draw(index[float(sigma)])
    out = fn(kdiffusion_denoiser(model), y, sigmas, disable=True, **options)
    return out * float(p.ode_scale(float(grid[-1])))


# -- diffusers -----------------------------------------------------------------

def _sigma_space(scheduler) -> bool:
    """Schedulers of the k-diffusion family keep the sample in EDM scale (``init_noise_sigma > 1``)."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0


def diffusers_grid(scheduler, process: VPDiscrete) -> torch.Tensor:
    """The process times a discrete-VP scheduler visits after its ``set_timesteps``, ending where it ends.

    :func:`~diffsampler.integrations.diffusers_grids.grid_from_scheduler` for the scheduler's
    current number of steps, in times of ``process``.
    """
    return grid_from_scheduler(scheduler, scheduler.num_inference_steps, process=process)


def run_diffusers(scheduler, model: Denoiser, x: torch.Tensor, steps: int, generator=None, **cond) -> torch.Tensor:
    """Run a diffusers scheduler's own loop for a discrete-VP eps model, from ``x`` at the scheduler's first time.

    ``x`` is in the process's scale (variance ~1); schedulers of the
    k-diffusion family get it in their EDM scale. The model is evaluated at the
    noise level the scheduler itself assumes: for schedulers in EDM scale the one
    implied by ``scale_model_input``, for the others the timestep's training node.
    """
    p = model.process
    if not isinstance(p, VPDiscrete):
        raise TypeError("run_diffusers: only discrete VP processes are adapted")
    scheduler.set_timesteps(steps)
    sigma_space = _sigma_space(scheduler)
    t0 = float(diffusers_grid(scheduler, p)[0])
    sample = x / float(p.alpha(t0)) if sigma_space else x
    kwargs = {"generator": generator} if generator is not None else {}
    for ts in scheduler.timesteps:
        if sigma_space:
            inp = scheduler.scale_model_input(sample, ts)
            alpha = float(scheduler.scale_model_input(torch.ones(1, dtype=sample.dtype), ts)[0])
            t = float(p.t_of_lambda(_lambda_of_alpha(alpha)))
        else:
            inp = sample
            t = float(p.t_of_timestep(float(ts)))
        eps = model(inp, t, **cond).eps
        sample = scheduler.step(eps, ts, sample, **kwargs).prev_sample
    return sample


def _lambda_of_alpha(alpha: float) -> float:
    import math
    return math.log(alpha) - 0.5 * math.log1p(-alpha * alpha)


def vp_process_of(scheduler) -> VPDiscrete:
    """The discrete VP process of a diffusers scheduler, from its own (float32) ``alphas_cumprod``."""
    return VPDiscrete(alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64), name="diffusers")


def run_diffusers_flow(scheduler, model: Denoiser, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Run a diffusers flow-matching scheduler's loop on a Flow Denoiser (velocity at ``t = sigma``)."""
    p = model.process
    scheduler.set_timesteps(steps)
    sample = x
    for k, ts in enumerate(scheduler.timesteps):
        t = min(max(float(scheduler.sigmas[k]), p.t_min), p.t_max)
        velocity = model(sample, t).velocity(p, t)
        sample = scheduler.step(velocity, ts, sample).prev_sample
    return sample


def diffusers_flow_grid(scheduler, process: Process) -> torch.Tensor:
    """The distinct times a flow scheduler visits after its ``set_timesteps`` (see :func:`diffusers_grid`)."""
    return grid_from_scheduler(scheduler, scheduler.num_inference_steps, process=process)
