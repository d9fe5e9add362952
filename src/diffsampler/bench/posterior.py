"""Posterior sampling and the Feynman-Kac correctors against targets known in closed form.

* ``posterior``: a 2-D Gaussian-mixture prior under VP (scaled linear) and the linear-Gaussian
  measurement ``y = A x + n``: the posterior is a mixture again (``GaussianMixture.posterior``). DPS
  (its samples), AFDPS with a reverse-SDE kernel (``V = g``) and with an ODE solver (``V = 0``), and FK
  steering with the log-likelihood of the data estimate as its reward (its weighted particles) are
  compared with it: error of the mean, of the covariance and of the mode weights, against NFE.
* ``fkc``: CFG's geometric mean ``p_u^(1-w) p_c^w`` of a class-conditional mixture (by quadrature on a
  fine grid), sampled with FKC and with plain CFG (the same SDE, no weights).
* ``digits``: inpainting (the bottom half hidden) and denoising of held-out digits with the shipped
  ``digits`` prior: the evaluator's accuracy on the true class and the error in the observed pixels.

NFE is per particle (steps times evaluations per step); particle methods use ``particles`` of them
per returned estimate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import grids as _grids
from .. import posterior as _posterior
from .. import steering
from ..loop import sample
from ..process import VP
from ..testbeds import GaussianMixture

__all__ = ["PosteriorResult", "run_posterior", "posterior_section"]

PRIOR = GaussianMixture([[-1.5, 0.0], [1.5, 0.5], [0.0, 2.0]],
                        [[[0.3, 0.1], [0.1, 0.2]], [[0.25, -0.05], [-0.05, 0.35]], [[0.2, 0.0], [0.0, 0.15]]],
                        [0.5, 0.3, 0.2], labels=[0, 1, 1])
MATRIX = [[1.0, 0.5]]
Y = [0.3]
SIGMA_Y = 0.5
DPS_SCALE = 0.2
FK_LAM = 1.0

# (digits: AFDPS gets 4 times digits_particles, its own default, weighted; DPS that many samples)
FULL = dict(steps=(25, 50, 100, 200), groups=32, particles=64, dps_samples=2048, fkc_steps=(50, 100, 200),
            fkc_groups=16, fkc_particles=128, digits_images=8, digits_particles=16, digits_steps=100)
QUICK = dict(steps=(25, 50), groups=8, particles=32, dps_samples=256, fkc_steps=(50,), fkc_groups=4,
             fkc_particles=64, digits_images=1, digits_particles=4, digits_steps=20)


@dataclass
class PosteriorResult:
    problem: str          # "posterior", "fkc", "digits"
    method: str
    setting: str
    steps: int
    nfe: float            # per particle
    mean_error: float
    cov_error: float      # posterior: Frobenius error of the covariance; fkc: of the second moments
    mode_error: float     # half the L1 distance of the mode weights; digits: nan
    accuracy: float = float("nan")      # digits
    observed_rmse: float = float("nan")  # digits
    seconds: float = 0.0


def _moments(x: torch.Tensor, w: torch.Tensor, target: GaussianMixture):
    """Weighted mean, covariance and mode weights (mean responsibilities under ``target``)."""
    w = (w / w.sum()).to(torch.float64)[:, None]
    x = x.to(torch.float64)
    mean = (w * x).sum(0)
    centred = x - mean
    cov = (w * centred).T @ centred
    modes = (w * target.responsibilities(x)).sum(0)
    return mean, cov, modes


def _exact_moments(target: GaussianMixture):
    w, m, c = target.weights, target.means, target.covs
    mean = w @ m
    second = torch.einsum("k,kij->ij", w, c + torch.einsum("ki,kj->kij", m, m))
    return mean, second - torch.outer(mean, mean), w


def _errors(estimates, exact):
    mean, cov, modes = estimates
    return ((mean - exact[0]).norm().item(), (cov - exact[1]).norm().item(),
            0.5 * (modes - exact[2]).abs().sum().item())


def _population_average(x, log_w, groups, target):
    """Each population's weighted moments, averaged over the populations."""
    per = [_moments(xg, wg.exp(), target) for xg, wg in zip(x.chunk(groups), log_w.chunk(groups))]
    return tuple(torch.stack(parts).mean(0) for parts in zip(*per))


def _posterior_rows(size: dict, seed: int, log) -> list[PosteriorResult]:
    process = VP.scaled_linear()
    model = PRIOR.denoiser(process, "eps")
    A = torch.tensor(MATRIX, dtype=torch.float64)
    y = torch.tensor(Y, dtype=torch.float64)
    exact_mix = PRIOR.posterior(A, y, SIGMA_Y ** 2)
    exact = _exact_moments(exact_mix)
    op = _posterior.Linear(A)
    reward = lambda x0, **cond: -_posterior.mu_y(op, x0, y.expand(len(x0), -1), SIGMA_Y)  # noqa: E731
    groups, particles = size["groups"], size["particles"]
    rows = []
    for steps in size["steps"]:
        grid = _grids.logsnr(process, steps)
        g = torch.Generator().manual_seed(seed)
        x = process.prior((groups * particles, 2), generator=g, dtype=torch.float64)
        runs = {
            ("afdps", f"ddpm (V = g), {particles} particles"): lambda: _posterior.afdps(
                model, x, grid, "ddpm", y=y, operator=op, sigma_y=SIGMA_Y, particles=particles, generator=g),
            ("afdps", f"dpmpp_2m (V = 0), {particles} particles"): lambda: _posterior.afdps(
                model, x, grid, "dpmpp_2m", y=y, operator=op, sigma_y=SIGMA_Y, particles=particles, generator=g),
            ("fk", f"ddpm, reward -mu_y(x0), lam {FK_LAM:g}, {particles} particles"): lambda: steering.fk(
                model, x, grid, "ddpm", reward, particles=particles, generator=g, lam=FK_LAM,
                resample_every=1, resample_window=(1, steps), ess_threshold=0.5),
        }
        for (method, setting), call in runs.items():
            start = time.perf_counter()
            try:
                res = call()
            except FloatingPointError as err:  # AFDPS's explicit guidance at too few steps
                log(f"posterior: {method} {setting} at {steps} steps: {err}")
                continue
            est = _population_average(res.x, res.log_weights, groups, exact_mix)
            rows.append(PosteriorResult("posterior", method, setting, steps, res.nfe, *_errors(est, exact),
                                        seconds=time.perf_counter() - start))
        start = time.perf_counter()
        xd = process.prior((size["dps_samples"], 2), generator=g, dtype=torch.float64)
        samples = _posterior.dps(model, xd, grid, y=y, operator=op, sigma_y=SIGMA_Y, scale=DPS_SCALE, generator=g)
        est = _moments(samples, torch.ones(len(samples), dtype=torch.float64), exact_mix)
        rows.append(PosteriorResult("posterior", "dps", f"ddpm, scale {DPS_SCALE:g}", steps, float(steps),
                                    *_errors(est, exact), seconds=time.perf_counter() - start))
        log(f"posterior: {steps} steps done")
    return rows


_AXIS = torch.linspace(-6.0, 6.0, 481, dtype=torch.float64)
_POINTS = torch.stack(torch.meshgrid(_AXIS, _AXIS, indexing="ij"), -1).reshape(-1, 2)


def _fkc_rows(size: dict, seed: int, log) -> list[PosteriorResult]:
    process = VP.linear()
    model = PRIOR.denoiser(process, "eps")
    label = torch.tensor(1)
    groups, particles = size["fkc_groups"], size["fkc_particles"]
    rows = []
    for w in (2.0, 4.0):
        dens = torch.softmax((1 - w) * PRIOR.log_prob(_POINTS) + w * PRIOR.log_prob(_POINTS, label=1), 0)
        exact = _moments(_POINTS, dens, PRIOR)
        exact = (exact[0], exact[1] + torch.outer(exact[0], exact[0]), exact[2])  # second moments
        target = steering.cfg_target(model, w)
        for steps in size["fkc_steps"]:
            grid = _grids.logsnr(process, steps)
            g = torch.Generator().manual_seed(seed)
            x = process.prior((groups * particles, 2), generator=g, dtype=torch.float64)
            start = time.perf_counter()
            res = steering.fkc(target, x, grid, "ddpm", particles=particles, generator=g, label=label)
            m, c, modes = _population_average(res.x, res.log_weights, groups, PRIOR)
            rows.append(PosteriorResult("fkc", "fkc", f"w = {w:g}, ddpm, {particles} particles", steps, res.nfe,
                                        *_errors((m, c + torch.outer(m, m), modes), exact),
                                        seconds=time.perf_counter() - start))
            start = time.perf_counter()
            plain = sample(target, x, grid, "ddpm", generator=g, label=label)
            m, c, modes = _moments(plain, torch.ones(len(plain), dtype=torch.float64), PRIOR)
            rows.append(PosteriorResult("fkc", "cfg", f"w = {w:g}, ddpm (no weights)", steps, float(steps),
                                        *_errors((m, c + torch.outer(m, m), modes), exact),
                                        seconds=time.perf_counter() - start))
        log(f"fkc: w = {w:g} done")
    return rows


def _digits_rows(size: dict, seed: int, log) -> list[PosteriorResult]:
    from ..posterior.digits import posterior_digits
    rows = []
    for task in ("inpaint", "denoise"):
        for method in ("dps", "afdps"):
            particles = size["digits_particles"] * (4 if method == "afdps" else 1)
            try:
                r = posterior_digits(task, method, images=size["digits_images"], particles=particles,
                                     steps=size["digits_steps"], seed=seed, out=None)
            except FloatingPointError as err:
                log(f"digits: {method} {task}: {err}")
                continue
            rows.append(PosteriorResult("digits", method, f"{task}, sigma_y {r['sigma_y']:g}, {r['particles']} "
                                        f"per digit", r["steps"], float(r["nfe"]), float("nan"), float("nan"),
                                        float("nan"), accuracy=r["accuracy"], observed_rmse=r["observed_rmse"],
                                        seconds=r["time"]))
        log(f"digits: {task} done")
    return rows


def run_posterior(quick: bool = False, log: Callable[[str], None] = print, sizes: dict | None = None,
                  seed: int = 0) -> list[PosteriorResult]:
    size = sizes or (QUICK if quick else FULL)
    return _posterior_rows(size, seed, log) + _fkc_rows(size, seed, log) + _digits_rows(size, seed, log)


def _num(v: float, fmt: str = ".3f") -> str:
    return "-" if v != v else format(v, fmt)


def _error_table(rows: list[PosteriorResult], second: str) -> list[str]:
    lines = [f"| method | setting | steps | NFE | mean error | {second} | mode-weight error |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.setting} | {r.steps} | {r.nfe:.0f} | {r.mean_error:.3f} | {r.cov_error:.3f} | "
              f"{r.mode_error:.3f} |" for r in rows]
    return lines + [""]


def posterior_section(rows: list[PosteriorResult]) -> list[str]:
    """The lines of BENCHMARKS.md's posterior section."""
    lines = ["## Posterior sampling and Feynman-Kac correctors", ""]
    post = [r for r in rows if r.problem == "posterior"]
    if post:
        lines += [
            f"A 2-D three-component mixture prior under VP (scaled linear), its exact denoiser, and the measurement "
            f"y = A x + n with A = {MATRIX}, y = {Y}, sigma_y = {SIGMA_Y:g}: the exact posterior is a mixture "
            "(`GaussianMixture.posterior`). Particle methods: the weighted moments of each population, averaged "
            "over the populations; DPS: its samples. Errors: of the mean (L2), of the covariance (Frobenius), "
            "of the mode weights (half the L1 distance of the mean responsibilities under the posterior). NFE per "
            "particle (or DPS sample; DPS adds one VJP through the denoiser per step).", "",
            *_error_table(post, "covariance error")]
    fkc = [r for r in rows if r.problem == "fkc"]
    if fkc:
        lines += [
            "CFG's geometric mean p_u^(1-w) p_c^w of the same mixture, classes {0} and {1, 2}, c = 1, under VP "
            "(linear), by quadrature on a 481 x 481 grid: FKC's weighted particles against plain CFG (the same "
            "reverse SDE with the combined score, no weights). Errors of the mean, of the second moments and "
            "of the mode weights.", "",
            *_error_table(fkc, "second-moment error")]
    digits = [r for r in rows if r.problem == "digits"]
    if digits:
        lines += [
            "Held-out digits measured and reconstructed with the shipped `digits` prior "
            "(`diffsampler posterior`): inpainting hides the bottom half, denoising observes every pixel with "
            "noise. Accuracy: the share (weighted, for AFDPS) of samples `digits-evaluator` reads as the true "
            "digit; error: RMS in the observed pixels against the truth. AFDPS tilts the noisy state itself by "
            "the likelihood, so its observed pixels stay near the measurement at every noise level, where the "
            "network has never seen such inputs: on inpainting its hidden half degrades.", "",
            "| method | setting | steps | NFE | accuracy | observed RMSE |", "|---|---|---|---|---|---|"]
        for r in digits:
            lines.append(f"| {r.method} | {r.setting} | {r.steps} | {r.nfe:.0f} | {_num(r.accuracy, '.1%')} | "
                         f"{_num(r.observed_rmse)} |")
        lines.append("")
    return lines
