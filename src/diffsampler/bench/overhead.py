"""The sampler's own cost per step, ours and the peers', measured in one process.

Every library drives the same nearly free model (the exact eps of standard
normal data under VP: ``x0 = alpha x``, written as the k-diffusion denoiser
``D(y, s) = y / (1 + s^2)`` for k-diffusion and as ``eps = sigma x`` for the
others, with sigma read from a table). Each repeat times a whole 50-step run and,
right after it, the model alone called as often as the run calls it; their
difference is the sampler's own work. We report medians over repeats, per step.
Timing the two back to back keeps slow drifts of the machine (and, for the large
shapes, of its caches) out of the difference, and the libraries take turns within
each repeat, so that a slow spell weighs on all of them alike.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import grids as _grids
from ..denoiser import Denoiser
from ..loop import sample
from . import peers

__all__ = ["Timing", "run_overhead", "SHAPES", "SHARED"]

SHAPES = [(1024, 2), (4, 3, 32, 32), (1, 4, 128, 128)]
STEPS = 50
# Our solver -> (diffusers scheduler and config, k-diffusion sampler); None where a peer lacks it.
SHARED = {
    "euler": (("EulerDiscreteScheduler", {}), "euler"),
    "heun": (("HeunDiscreteScheduler", {}), "heun"),
    "ddim": (("DDIMScheduler", {"clip_sample": False}), None),
    "dpmpp_2m": (("DPMSolverMultistepScheduler", {}), "dpmpp_2m"),
    "dpmpp_3m": (("DPMSolverMultistepScheduler", {"solver_order": 3}), None),
    "unipc": (("UniPCMultistepScheduler", {}), None),
    "lms": (("LMSDiscreteScheduler", {}), "lms"),
    "dpm_2": (("KDPM2DiscreteScheduler", {}), "dpm_2"),
}
TWO_EVALS = ("heun", "dpm_2")
# A reference: the same steps written the obvious way as plain PyTorch loops, coefficients computed beforehand.
PLAIN = ("ddim", "dpmpp_2m")


@dataclass
class Timing:
    shape: tuple
    solver: str
    library: str
    total_us: float      # per step, model included
    model_us: float      # the model's own cost per step
    own_us: float        # total - model


def _per_step(cases: dict[str, tuple[Callable[[], None], Callable[[], None]]], repeats: int,
              steps: int) -> dict[str, tuple[float, float, float]]:
    """Per library, medians per step in microseconds of (the run, the model alone, their difference).

    ``cases`` maps a library to (its run, its model alone). The libraries take turns within each repeat,
    so a slow spell of the machine weighs on all of them alike and the ratios stay fair.
    """
    for run, model_only in cases.values():  # warm-up
        run(), model_only()
    samples = {lib: ([], [], []) for lib in cases}
    for _ in range(repeats):
        for lib, (run, model_only) in cases.items():
            start = time.perf_counter()
            run()
            middle = time.perf_counter()
            model_only()
            end = time.perf_counter()
            totals, models, own = samples[lib]
            totals.append(middle - start)
            models.append(end - middle)
            own.append((middle - start) - (end - middle))
    return {lib: tuple(statistics.median(v) / steps * 1e6 for v in values) for lib, values in samples.items()}


def run_overhead(quick: bool = False, log: Callable[[str], None] = print) -> list[Timing]:
    import diffusers
    from diffusers import DDIMScheduler

    warnings.filterwarnings("ignore", module="diffusers")
    ks = peers.kdiffusion_sampling()
    repeats = 3 if quick else 51
    shapes = SHAPES[:1] if quick else SHAPES
    base = DDIMScheduler(**{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    process = peers.vp_process_of(base)
    sigma_of_timestep = torch.sqrt(1 - base.alphas_cumprod.to(torch.float32))
    out: list[Timing] = []

    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        log(f"overhead: shape {shape}")

        def eps_net(xx, timestep):
            # timestep is a (batch,) tensor; standard-normal data has eps = sigma x exactly.
            return xx * sigma_of_timestep[int(timestep[0].round())]

        ours_model = Denoiser(eps_net, process, "eps")
        kd_model = lambda y, s: y / (1 + s[0] * s[0])  # noqa: E731

        for solver, ((sched_name, sched_cfg), kd_name) in SHARED.items():
            n_evals = 2 * STEPS - 1 if solver in TWO_EVALS else STEPS
            grid = _grids.get("uniform", process, STEPS)

            # the model alone, called as each library calls it; each output is dropped at once, as in a
            # sampling loop (kept alive, 100 outputs of the largest shape cost fresh memory pages)
            ts = torch.full((shape[0],), 500.0)

            def model_only():
                for _ in range(n_evals):
                    eps_net(x, ts)

            def kd_model_only():
                for _ in range(n_evals):
                    kd_model(x, torch.full((shape[0],), 1.5))

            cases = {"diffsampler": (lambda: sample(ours_model, x, grid, solver), model_only)}
            if solver in PLAIN:
                cases["plain loop"] = (_plain_loop(solver, eps_net, process, grid, x), model_only)

            sched = getattr(diffusers, sched_name)(**{"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                      "beta_end": 0.012}, **sched_cfg)

            def run_diffusers(sched=sched):
                sched.set_timesteps(STEPS)
                sample_ = x * sched.init_noise_sigma
                for t in sched.timesteps:
                    inp = sched.scale_model_input(sample_, t)
                    sample_ = sched.step(eps_net(inp, t.reshape(1).expand(shape[0])), t, sample_).prev_sample

            cases["diffusers"] = (run_diffusers, model_only)
            if kd_name is not None:
                sigmas = ks.get_sigmas_karras(STEPS, 0.03, 14.6, device="cpu")
                fn = getattr(ks, f"sample_{kd_name}")
                cases["k-diffusion"] = (lambda fn=fn, sigmas=sigmas: fn(kd_model, x * 14.6, sigmas, disable=True),
                                        kd_model_only)
            for lib, medians in _per_step(cases, repeats, STEPS).items():
                out.append(Timing(shape, solver, lib, *medians))
    return out


def _plain_loop(solver: str, eps_net, process, grid: torch.Tensor, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A hand-written loop of ``solver`` ("ddim" or "dpmpp_2m", data-prediction form) as one would write it in
    plain PyTorch: x0 from eps, then the step, in x; times and coefficients computed before the loop."""
    g = grid.to(torch.float64)
    a, s = process.alpha(g).tolist(), process.sigma(g).tolist()
    times = [torch.full((x.shape[0],), float(process.time_input(t))) for t in g.tolist()]
    lam = [math.log(ai / si) if si > 0 else math.inf for ai, si in zip(a, s)]
    n = len(g) - 1

    def ddim():
        y = x
        for i in range(n):
            eps = eps_net(y, times[i])
            y = a[i + 1] * ((y - s[i] * eps) / a[i]) + s[i + 1] * eps
        return y

    def dpmpp_2m():
        y, x0_prev = x, None
        for i in range(n):
            eps = eps_net(y, times[i])
            x0 = (y - s[i] * eps) / a[i]
            if s[i + 1] == 0:
                y = x0
                break
            h = lam[i + 1] - lam[i]
            d = x0
            if x0_prev is not None:
                r = (lam[i] - lam[i - 1]) / h
                d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            y = (s[i + 1] / s[i]) * y - a[i + 1] * math.expm1(-h) * d
            x0_prev = x0
        return y

    return {"ddim": ddim, "dpmpp_2m": dpmpp_2m}[solver]


def ratio_rows(timings: list[Timing]) -> list[dict]:
    """One row per (shape, solver): our own cost and its ratio to each peer's own cost."""
    rows = []
    keys = sorted({(t.shape, t.solver) for t in timings}, key=lambda k: (math.prod(k[0]), k[1]))
    for shape, solver in keys:
        by_lib = {t.library: t for t in timings if t.shape == shape and t.solver == solver}
        ours = by_lib["diffsampler"].own_us
        row = {"shape": shape, "solver": solver, "diffsampler_us": ours}
        if "plain loop" in by_lib:
            row["plain_us"] = by_lib["plain loop"].own_us
        for lib in ("diffusers", "k-diffusion"):
            if lib in by_lib:
                row[f"{lib}_us"] = by_lib[lib].own_us
                row[f"ratio_{lib}"] = ours / by_lib[lib].own_us if by_lib[lib].own_us > 0 else float("nan")
        rows.append(row)
    return rows
