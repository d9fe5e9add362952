"""k-diffusion's functional interface over diffsampler's solvers.

For every registered solver (and every alias, :data:`diffsampler.solvers.ALIASES`) there is a function
with k-diffusion's signature::

    x = ds.k_diffusion.sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None)

* ``model`` is a k-diffusion denoiser ``D(x, sigma, **extra_args) -> x0``, called with one sigma per
  sample. By default the sample is in k-diffusion's scale, ``x = x0 + sigma eps`` (what its wrappers of
  eps, v and EDM models take); ``model_type="flow"`` (ComfyUI's ``CONST``) takes a flow denoiser, for
  which ``x = (1 - sigma) x0 + sigma eps`` and ``sigma`` is the flow's time.
* ``sigmas`` is a decreasing k-diffusion schedule (``get_sigmas_karras`` and the like, float32
  accepted), usually ending in 0; ``x`` is the sample at ``sigmas[0]``.
* ``callback`` receives k-diffusion's dict ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per
  step: the sample the step started from, the step's noise level (raised by churn in ``sigma_hat``)
  and the data estimate of its first evaluation.
* ``disable`` turns the progress bar off (``None``: shown on a terminal only, as tqdm does).
* ``noise_sampler(sigma, sigma_next)`` supplies the noise as in k-diffusion: a stochastic step from
  ``sigmas[i]`` asks it once for ``(sigmas[i], sigmas[i + 1])``, a multi-stage one for each stage's
  interval; without it the noise comes from ``generator`` (a ``torch.Generator``; default: drawn from
  torch's default generator).
* Other keywords are the solver's options; k-diffusion's names are accepted where ours differ
  (``order`` for ``lms``).

For the names k-diffusion also has, the defaults are k-diffusion's (``dpmpp_2m`` and the SDE
multistep solvers without a lower-order final step, ``dpmpp_3m_sde`` with its third-order weight),
so the same call gives k-diffusion's result: to float64 round-off given the same noise through
``noise_sampler`` (the tests run each one). Two k-diffusion functions take no schedule, and keep
their signatures here: ``sample_dpm_fast(model, x, sigma_min, sigma_max, n, ...)`` and
``sample_dpm_adaptive(model, x, sigma_min, sigma_max, ...)`` (which also accepts a schedule in
place of ``sigma_min``, and controls the step size of each sample, where k-diffusion controls one
for the whole batch: they agree sample by sample). Churn (``s_churn``) draws from diffsampler's
generator, not torch's global one, and never raises the noise above ``sigmas[0]``.

The CFG++ solvers need the unconditional noise estimate of ``ds.guidance.cfg(..., plus_plus=True)``; a
bare ``D(x, sigma)`` has none, so through this interface they are their unguided methods.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch

from . import solvers as _solvers
from .denoiser import Denoiser
from .grids import dpm_fast as _dpm_fast_grid
from .loop import Run, progress_bar
from .process import EDM, Flow

__all__ = ["MODEL_TYPES", "KDIFFUSION_DEFAULTS", "KDIFFUSION_OPTION_NAMES", "samplers", "sample_dpm_fast",
           "sample_dpm_adaptive"]

#: What ``model_type=`` accepts: k-diffusion's scale (``x = x0 + sigma eps``) or a flow (ComfyUI's CONST).
MODEL_TYPES = {"edm": "edm", "ve": "edm", "eps": "edm", "v": "edm", "flow": "flow", "const": "flow"}

#: k-diffusion's defaults where they differ from ours, by registered name (aliases included through it).
KDIFFUSION_DEFAULTS: dict[str, dict] = {
    "dpmpp_2m": {"lower_order_final": False},
    "dpmpp_2m_sde": {"lower_order_final": False},
    "dpmpp_3m_sde": {"lower_order_final": False, "legacy_third_order": True},
}

#: k-diffusion's option names where ours differ: registered name -> {k-diffusion's: ours}.
KDIFFUSION_OPTION_NAMES: dict[str, dict[str, str]] = {"lms": {"order": "lms_order"}}

# k-diffusion options of a fixed value here: registered name -> {option: the value we implement}.
_FIXED = {"dpmpp_sde": {"r": 0.5}}


class _SamplerNoise:
    """The noise of a run from a k-diffusion ``noise_sampler(sigma, sigma_next)``, through the interface
    solvers draw from: ``draw(i)`` for step ``i`` and ``between(a, b)`` for a stage from noise level ``a``
    to ``b`` (ode_sigma, which is k-diffusion's sigma here)."""

    def __init__(self, noise_sampler: Callable, sigmas: torch.Tensor):
        self.noise_sampler, self.sigmas = noise_sampler, sigmas

    def draw(self, step: int, stream: int = 0) -> torch.Tensor:
        return self.noise_sampler(self.sigmas[step], self.sigmas[step + 1])

    def between(self, a: float, b: float) -> torch.Tensor:
        return self.noise_sampler(torch.tensor(a, dtype=self.sigmas.dtype), torch.tensor(b, dtype=self.sigmas.dtype))

    def take(self, indices):  # pragma: no cover - particle drivers do not run through this interface
        raise NotImplementedError("a k-diffusion noise_sampler cannot be reindexed")


def _schedule(sigmas) -> torch.Tensor:
    try:
        s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"sigmas must be a 1-D sequence of noise levels, got {type(sigmas).__name__}: {err}") from None
    return s


def _process(sig: torch.Tensor, model_type: str):
    kind = MODEL_TYPES.get(str(model_type).lower())
    if kind is None:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    values = sig.tolist()
    if not all(map(math.isfinite, values)) or any(v < 0 for v in values):
        raise ValueError(f"sigmas must be finite and >= 0, got {values}")
    positive = [v for v in values if v > 0]
    if not positive:
        raise ValueError(f"sigmas must hold a positive noise level, got {values}")
    hi, lo = max(values), min(positive)
    if lo == hi:  # one noise level (a single step into 0): any lower bound below it
        lo = hi / 2
    if kind == "flow":
        if hi > 1:
            raise ValueError(f"model_type='flow': sigmas are a flow's times, at most 1; got {hi}")
        return Flow(t_min=lo, t_max=hi)
    return EDM(lo, hi)


def _solver(name: str, options: dict):
    target, _ = _solvers.canonical(name)
    renames = KDIFFUSION_OPTION_NAMES.get(target, {})
    opts = {renames.get(k, k): v for k, v in options.items()}
    for option, value in _FIXED.get(target, {}).items():
        if option in opts and opts.pop(option) != value:
            raise ValueError(f"sample_{name}: {option} = {options[option]!r} is not implemented (only {value})")
    for option, value in KDIFFUSION_DEFAULTS.get(target, {}).items():
        opts.setdefault(option, value)
    return _solvers.get(name, **opts)


def _show_progress(disable) -> bool:
    if disable is None:
        return sys.stderr.isatty()
    return not disable


def _sample(name: str, model: Callable, x: torch.Tensor, sigmas, extra_args, callback, disable, options: dict,
            solver=None):
    if not callable(model):
        raise TypeError(f"sample_{name}: model must be a k-diffusion denoiser D(x, sigma, **extra_args), "
                        f"got {type(model).__name__}")
    options = dict(options)
    noise_sampler = options.pop("noise_sampler", None)
    generator = options.pop("generator", None)
    model_type = options.pop("model_type", "edm")
    if solver is None:
        solver = _solver(name, options)
    elif options:
        raise ValueError(f"sample_{name}: unknown option(s) {', '.join(sorted(options))}")
    sig = _schedule(sigmas)
    if sig.numel() < 2:
        return x
    extra = {} if extra_args is None else dict(extra_args)
    process = _process(sig, model_type)
    denoiser = Denoiser(lambda y, sigma: model(y, sigma, **extra), process, "x0",
                        name=getattr(model, "__name__", type(model).__name__))
    with torch.no_grad():
        run = Run(denoiser, x, sig, solver, generator=generator)
        if noise_sampler is not None and run.noise is not None:
            run.noise = _SamplerNoise(noise_sampler, torch.as_tensor(sigmas).detach())
        if callback is not None:
            run.watch()
        original = torch.as_tensor(sigmas).detach()
        churn = getattr(solver, "s_churn", 0.0) or 0.0
        with progress_bar(_show_progress(disable), f"sample_{name}", len(run)) as advance:
            for i in range(len(run)):
                before = run.x
                run.step()
                if callback is not None:
                    sigma = original[i]
                    sigma_hat = sigma
                    if churn > 0 and solver.s_tmin <= float(sigma) <= solver.s_tmax:
                        gamma = min(churn / len(run), 2 ** 0.5 - 1)
                        sigma_hat = sigma * min(1 + gamma, float(sig[0]) / float(sigma))
                    pred = run.prediction
                    callback({"x": before, "i": i, "sigma": sigma, "sigma_hat": sigma_hat,
                              "denoised": None if pred is None else pred.x0})
                advance()
    return run.x


def _make(name: str):
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return _sample(name, model, x, sigmas, extra_args, callback, disable, options)

    target, preset = _solvers.canonical(name)
    cls = _solvers.REGISTRY[target]
    summary = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    alias = f" (alias of ``{target}``{' with ' + repr(preset) if preset else ''})" if target != name else ""
    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__doc__ = (f"``{name}``{alias}: {summary}\n\nk-diffusion's signature; see :mod:`diffsampler.k_diffusion`. "
                       f"Options: {', '.join(cls.options()) or 'none'}.")
    sampler.__module__ = __name__
    return sampler


def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, **options):
    """DPM-Solver-Fast (k-diffusion's ``sample_dpm_fast``): ``n`` evaluations of DPM-Solver-3 singlestep
    in the paper's form on DPM-Solver's fast grid from ``sigma_max`` to ``sigma_min`` (alias ``dpm_fast``).
    ``eta > 0`` (its ancestral form) is not implemented."""
    eta = options.pop("eta", 0.0)
    options.pop("s_noise", None)
    options.pop("noise_sampler", None)
    if eta:
        raise ValueError("sample_dpm_fast: eta > 0 (the ancestral form) is not implemented; use eta=0")
    model_type = options.pop("model_type", "edm")
    if not (float(sigma_min) > 0 and float(sigma_max) > float(sigma_min)):
        raise ValueError(f"sample_dpm_fast: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    process = _process(torch.tensor([float(sigma_max), float(sigma_min)], dtype=torch.float64), model_type)
    grid = _dpm_fast_grid(process, int(n))
    solver = _solver("dpm_fast", options)
    return _sample("dpm_fast", model, x, grid, extra_args, callback, disable, {"model_type": model_type},
                   solver=solver)


def sample_dpm_adaptive(model, x, sigma_min, sigma_max=None, extra_args=None, callback=None, disable=None,
                        **options):
    """Adaptive DPM-Solver-12/23 (k-diffusion's ``sample_dpm_adaptive``) from ``sigma_max`` to ``sigma_min``,
    or over a schedule passed in place of ``sigma_min``. Per-sample step-size control (k-diffusion controls
    one for the batch). ``return_info=True`` also returns ``{"nfe": evaluations}``; ``eta > 0`` is not
    implemented."""
    return_info = options.pop("return_info", False)
    eta = options.pop("eta", 0.0)
    options.pop("s_noise", None)
    options.pop("noise_sampler", None)
    if eta:
        raise ValueError("sample_dpm_adaptive: eta > 0 is not implemented; use eta=0")
    if sigma_max is None:
        sigmas = sigma_min
    else:
        if not (float(sigma_min) > 0 and float(sigma_max) > float(sigma_min)):
            raise ValueError(f"sample_dpm_adaptive: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        sigmas = torch.tensor([float(sigma_max), float(sigma_min)], dtype=torch.float64)
    counted = {"nfe": 0}

    def counting(y, sigma, **kw):
        counted["nfe"] += 1
        return model(y, sigma, **kw)

    out = _sample("dpm_adaptive", counting, x, sigmas, extra_args, callback, disable, options)
    return (out, counted) if return_info else out


def samplers() -> list[str]:
    """The names ``sample_<name>`` exists for: every registered solver and alias."""
    return sorted(set(_solvers.names()) | set(_solvers.ALIASES))


for _name in samplers():
    if f"sample_{_name}" not in globals():
        globals()[f"sample_{_name}"] = _make(_name)
        __all__.append(f"sample_{_name}")
del _name
