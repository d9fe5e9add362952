"""Steering toward a reward: reward, independent accuracy and distance to the exact target against NFE.

Two problems, the same methods (best-of-N, FK steering with each potential, SVDD, and DTS / DTS*
when :func:`diffsampler.steering.tree_search` exists):

* ``digits``: the shipped ``digits`` model, unconditional, steered toward one class per population
  (classes 0-9 in turn) with :func:`~diffsampler.steering.digits_reward` (``log p(class | x0)`` under
  ``digits-classifier``); each population's best particle is judged by ``digits-evaluator``, which
  played no part in steering.
* ``gmm``: ``ring8`` under VP-cosine, its exact denoiser, the linear reward ``r(x) = a.x``; the exact
  target ``p(x) exp(lam r(x))`` is :meth:`GaussianMixture.tilted`. Each population gives one sample
  of the target (a particle drawn by its final weight; best-of-N's is its best), and those samples
  are compared with the target: error of the mode weights and of the mean.

NFE is per population (per returned sample): every network evaluation of every particle and
candidate, as :class:`~diffsampler.steering.SteeringResult` counts them, times the particles.
Best-of-N for every N comes from one run of independent samples (the first N of each population's
draws), which is what N separate runs would give.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import grids as _grids
from .. import steering
from ..process import VP
from .report import save_figure

__all__ = ["SteerResult", "run_steering", "steering_section", "plot_steering", "claims", "steer", "METHODS",
           "tree_search_or_none"]

METHODS = ("best_of_n", "fk", "svdd", "dts", "dts*")

# The sizes of a run: populations, steps, best-of-N sizes, FK particles and potentials, SVDD candidates,
# DTS / DTS* budgets (in unsteered runs' worth of nodes per tree); digits: the populations of the separate
# run of the first claim (FK with 4 particles against best-of-4).
FULL = {"digits": dict(groups=40, steps=10, n=(1, 2, 4, 8, 16, 32), particles=(2, 4, 8),
                       potentials=steering.POTENTIALS, candidates=(2, 4, 8), budgets=(4, 8, 16), claim_groups=200),
        "gmm": dict(groups=500, steps=20, n=(1, 2, 4, 8, 16, 32), particles=(2, 4, 8),
                    potentials=steering.POTENTIALS, candidates=(2, 4, 8), budgets=(4, 8, 16))}
# (--quick checks that every row is produced, not the claims: it is also what the test suite runs)
QUICK = {"digits": dict(groups=4, steps=8, n=(1, 2, 4, 8), particles=(2, 4),
                        potentials=("diff", "max"), candidates=(2, 4), budgets=(4,), claim_groups=8),
         "gmm": dict(groups=100, steps=8, n=(1, 2, 4, 8), particles=(2, 4),
                     potentials=("diff", "max"), candidates=(2, 4), budgets=(4,))}
SOLVER = "ddpm"
DIGITS_LAM = 10.0     # the authors' default inverse temperature, for a log-probability reward
GMM_LAM = 1.0         # a tilt that moves the mode weights of ring8 a lot (e^4 between opposite modes)
GMM_DIRECTION = (1.0, 0.0)
TREE_PARTICLES = 2    # DTS / DTS*: the root's children per tree (the populations' starting samples)


@dataclass
class SteerResult:
    problem: str             # "digits", "gmm", or "digits_claim" (the first claim's own run)
    method: str              # best_of_n, fk, svdd, dts, dts*, or "exact" (the GMM target's own samples)
    setting: str
    size: int                # N, particles or candidates
    groups: int
    steps: int
    nfe: float               # per population (per returned sample)
    reward: float            # mean reward of each population's best particle
    accuracy: float | None   # digits: share of best particles digits-evaluator puts in the target class
    sample_reward: float | None  # gmm: mean reward of the samples of the target
    mode_error: float | None     # gmm: 0.5 sum_k |mean responsibility_k - tilted weight_k|
    mean_error: float | None     # gmm: |mean of the samples - mean of the target|
    seconds: float


def tree_search_or_none():
    """``diffsampler.steering.tree_search`` if it exists, else ``None`` (DTS and DTS* come later)."""
    try:
        from ..steering import tree_search
    except ImportError:
        try:
            from ..steering.tree import tree_search
        except ImportError:
            return None
    return tree_search


def steer(method: str, model, x, grid, solver, reward, *, particles: int, generator, lam: float = 10.0,
          potential: str = "diff", candidates: int = 4, alpha: float = 0.0, budget: int | None = None, **cond):
    """Run one steering method by name (``METHODS``): the one place the CLI and the bench call them."""
    if method == "best_of_n":
        return steering.best_of_n(model, x, grid, solver, reward, particles=particles, generator=generator, **cond)
    if method == "fk":
        return steering.fk(model, x, grid, solver, reward, particles=particles, generator=generator, lam=lam,
                           potential=potential, **cond)
    if method == "svdd":
        return steering.svdd(model, x, grid, solver, reward, particles=particles, candidates=candidates,
                             alpha=alpha, generator=generator, **cond)
    if method in ("dts", "dts*"):
        tree_search = tree_search_or_none()
        if tree_search is None:
            raise RuntimeError(f"{method}: diffsampler.steering.tree_search is not available in this version "
                               f"(DTS and DTS* come with steering/tree.py); use best_of_n, fk or svdd")
        extra = {} if budget is None else {"budget": budget}
        return tree_search(model, x, grid, solver, reward, method=method, particles=particles, lam=lam,
                           generator=generator, **extra, **cond)
    raise ValueError(f"steer: method must be one of {', '.join(METHODS)}, got {method!r}")


def nfe_per_group(result, groups: int) -> float:
    """Network evaluations per population: ``result.nfe`` is per final particle."""
    return float(result.nfe) * result.x.shape[0] / groups


def _configs(size: dict, lam: float, alpha: float, tree) -> list[tuple[str, str, int, dict]]:
    """(method, setting, size, keywords of :func:`steer`) for every steered configuration of a run."""
    out = [("fk", f"{pot}, {p} particles", p, dict(particles=p, lam=lam, potential=pot))
           for pot in size["potentials"] for p in size["particles"]]
    out += [("svdd", f"M={m}", m, dict(particles=1, candidates=m, alpha=alpha)) for m in size["candidates"]]
    if tree is not None:
        # budget: nodes per tree (one kernel step each), k unsteered runs' worth; 2 root children
        out += [(m, f"budget {k} x {size['steps']}", k, dict(particles=TREE_PARTICLES, lam=lam,
                                                            budget=k * size["steps"]))
                for m in ("dts", "dts*") for k in size["budgets"]]
    return out


def _digits(size: dict, seed: int, log) -> list[SteerResult]:
    from .. import models
    from ..models.quality import default_grid

    # Each population is steered toward its own class: the reward reads it from the conditioning
    # keyword `target`, which follows its particle in every driver; the network ignores it.
    model = _ignoring(models.load("digits"), "target")
    evaluator = models.load("digits-evaluator")
    reward = steering.digits_reward("target")
    process = model.process
    groups, steps = size["groups"], size["steps"]
    grid = _grids.get(default_grid(process), process, steps)
    targets = torch.arange(groups) % 10
    rows = []

    # best-of-N for every N: the first N of nmax independent samples per population
    nmax = max(size["n"])
    g = torch.Generator().manual_seed(seed)
    x = process.prior((groups * nmax, 1, 8, 8), generator=g)
    start = time.perf_counter()
    with torch.no_grad():
        res = steering.best_of_n(model, x, grid, SOLVER, reward, particles=1, generator=g,
                                 target=targets.repeat_interleave(nmax))
    seconds = time.perf_counter() - start
    r = res.rewards.reshape(groups, nmax)
    with torch.no_grad():
        predicted = evaluator(res.x.float()).argmax(1).reshape(groups, nmax)
    for n in size["n"]:
        pick = r[:, :n].argmax(1)
        hit = (predicted[torch.arange(groups), pick] == targets).double().mean().item()
        rows.append(SteerResult("digits", "best_of_n", f"N={n}", n, groups, steps, float(res.nfe) * n,
                                r[:, :n].max(1).values.mean().item(), hit, None, None, None,
                                round(seconds * n / nmax, 2)))
        log(f"steering digits best_of_n N={n}: NFE {rows[-1].nfe:.0f}, reward {rows[-1].reward:.3f}, "
            f"accuracy {hit:.3f}")
    for method, setting, n, kw in _configs(size, DIGITS_LAM, 0.0, tree_search_or_none()):
        per = kw["particles"]
        g = torch.Generator().manual_seed(seed)
        x = process.prior((groups * per, 1, 8, 8), generator=g)
        start = time.perf_counter()
        with torch.no_grad():
            res = steer(method, model, x, grid, SOLVER, reward, generator=g, target=targets.repeat_interleave(per),
                        **kw)
        seconds = time.perf_counter() - start
        rows.append(SteerResult("digits", method, setting, n, groups, steps, nfe_per_group(res, groups),
                                _best_reward(res, groups), steering.digits_accuracy(res.best, targets, evaluator),
                                None, None, None, round(seconds, 2)))
        log(f"steering digits {method} {setting}: NFE {rows[-1].nfe:.0f}, reward {rows[-1].reward:.3f}, "
            f"accuracy {rows[-1].accuracy:.3f}")
    rows += _claim_run(model, reward, evaluator, grid, size, seed + 1, log)
    return rows


def _claim_run(model, reward, evaluator, grid, size: dict, seed: int, log) -> list[SteerResult]:
    """The first claim on its own populations: FK (diff) with 4 particles against best-of-4."""
    groups = size.get("claim_groups", 0)
    if not groups:
        return []
    targets = torch.arange(groups) % 10
    rows = []
    for method, setting, kw in (("best_of_n", "N=4", {}), ("fk", "diff, 4 particles", dict(lam=DIGITS_LAM))):
        g = torch.Generator().manual_seed(seed)
        x = model.process.prior((groups * 4, 1, 8, 8), generator=g)
        start = time.perf_counter()
        with torch.no_grad():
            res = steer(method, model, x, grid, SOLVER, reward, particles=4, generator=g,
                        target=targets.repeat_interleave(4), **kw)
        rows.append(SteerResult("digits_claim", method, setting, 4, groups, size["steps"], nfe_per_group(res, groups),
                                _best_reward(res, groups), steering.digits_accuracy(res.best, targets, evaluator),
                                None, None, None, round(time.perf_counter() - start, 2)))
        log(f"steering digits (claim) {method} {setting}: NFE {rows[-1].nfe:.0f}, accuracy {rows[-1].accuracy:.3f}")
    return rows


def _ignoring(model, keyword: str):
    """``model`` with a network that ignores the conditioning keyword ``keyword`` (which the reward reads)."""
    from ..denoiser import Denoiser

    net = model.fn

    def fn(x, time, **cond):
        cond.pop(keyword, None)
        return net(x, time, **cond)

    return Denoiser(fn, model.process, model.prediction, time_input=model.time_input, name=model.name,
                    null=model.null)


def _gmm(size: dict, seed: int, log) -> list[SteerResult]:
    from .. import testbeds

    gmm = testbeds.ring8()
    process = VP.cosine()
    model = gmm.denoiser(process, "eps")
    a = torch.tensor(GMM_DIRECTION, dtype=torch.float64)
    target = gmm.tilted(a, GMM_LAM)
    target_mean = (target.weights[:, None] * target.means).sum(0)
    groups, steps = size["groups"], size["steps"]
    grid = _grids.get("logsnr", process, steps)

    def reward(x0, **cond):
        return x0.to(torch.float64) @ a

    def figures(samples: torch.Tensor) -> tuple[float, float, float]:
        resp = target.responsibilities(samples).mean(0)
        mode = 0.5 * (resp - target.weights).abs().sum().item()
        return reward(samples).mean().item(), mode, (samples.mean(0) - target_mean).norm().item()

    rows = []
    exact, _ = target.sample(groups, generator=torch.Generator().manual_seed(seed + 1))
    sr, mode, mean = figures(exact)
    rows.append(SteerResult("gmm", "exact", "tilted target's own samples", 0, groups, 0, 0.0, sr, None, sr, mode,
                            mean, 0.0))
    nmax = max(size["n"])
    g = torch.Generator().manual_seed(seed)
    x = process.prior((groups * nmax, 2), generator=g, dtype=torch.float64)
    start = time.perf_counter()
    res = steering.best_of_n(model, x, grid, SOLVER, reward, particles=1, generator=g)
    seconds = time.perf_counter() - start
    r = res.rewards.reshape(groups, nmax)
    xs = res.x.reshape(groups, nmax, 2)
    for n in size["n"]:
        best = xs[torch.arange(groups), r[:, :n].argmax(1)]
        sr, mode, mean = figures(best)
        rows.append(SteerResult("gmm", "best_of_n", f"N={n}", n, groups, steps, float(res.nfe) * n,
                                r[:, :n].max(1).values.mean().item(), None, sr, mode, mean,
                                round(seconds * n / nmax, 2)))
        log(f"steering gmm best_of_n N={n}: NFE {rows[-1].nfe:.0f}, mode error {mode:.3f}")
    tree = tree_search_or_none()
    for method, setting, n, kw in _configs(size, GMM_LAM, 1.0 / GMM_LAM, tree):
        per = kw["particles"]
        g = torch.Generator().manual_seed(seed)
        x = process.prior((groups * per, 2), generator=g, dtype=torch.float64)
        start = time.perf_counter()
        res = steer(method, model, x, grid, SOLVER, reward, generator=g, **kw)
        seconds = time.perf_counter() - start
        sr, mode, mean = figures(_weighted_draw(res, groups, torch.Generator().manual_seed(seed + 2)))
        rows.append(SteerResult("gmm", method, setting, n, groups, steps, nfe_per_group(res, groups),
                                _best_reward(res, groups), None, sr, mode,
                                mean, round(seconds, 2)))
        log(f"steering gmm {method} {setting}: NFE {rows[-1].nfe:.0f}, mode error {mode:.3f}")
    return rows


def _best_reward(result, groups: int) -> float:
    """Mean over populations of the reward of each population's best final particle."""
    return result.rewards.reshape(groups, -1).max(1).values.mean().item()


def _weighted_draw(result, groups: int, generator: torch.Generator) -> torch.Tensor:
    """One particle per population, drawn by its final weight: the population's sample of the target."""
    w = result.log_weights.reshape(groups, -1).softmax(1)
    pick = torch.multinomial(w, 1, generator=generator).flatten()
    per = w.shape[1]
    return result.x[torch.arange(groups) * per + pick]


def run_steering(quick: bool = False, log: Callable[[str], None] = print, sizes: dict | None = None,
                 seed: int = 0) -> list[SteerResult]:
    """Both problems at the sizes of ``FULL`` (``QUICK`` with ``quick``; ``sizes`` overrides either)."""
    sizes = sizes or (QUICK if quick else FULL)
    rows = []
    if "gmm" in sizes:
        rows += _gmm(sizes["gmm"], seed, log)
    if "digits" in sizes:
        rows += _digits(sizes["digits"], seed, log)
    return rows


# --- the report --------------------------------------------------------------------------------------


def _find(rows, problem, method, size, setting_start=""):
    return next((r for r in rows if r.problem == problem and r.method == method and r.size == size
                 and r.setting.startswith(setting_start)), None)


def _binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def claims(rows: list[SteerResult]) -> dict:
    """The issue's two performance claims, computed from the rows.

    1. Digits: FK with 4 particles (default potential ``diff``) has a higher evaluator accuracy than
       best-of-4, at equal NFE; on the claim's own populations where they were run (``digits_claim``),
       else on the table's.
    2. Per problem and best-of-N size N: the cheapest steering configuration (FK, SVDD, DTS) whose mean
       reward reaches best-of-N's, and its NFE as a fraction of best-of-N's. The claim holds where that
       fraction is at most 1/3 for some N.
    """
    out: dict = {}
    source = "digits_claim" if _find(rows, "digits_claim", "fk", 4) else "digits"
    fk4, bo4 = _find(rows, source, "fk", 4, "diff"), _find(rows, source, "best_of_n", 4)
    if fk4 and bo4:
        se = math.hypot(_binomial_se(fk4.accuracy, fk4.groups), _binomial_se(bo4.accuracy, bo4.groups))
        out["fk4_vs_best_of_4"] = {"populations": fk4.groups, "fk_accuracy": fk4.accuracy,
                                   "best_of_4_accuracy": bo4.accuracy, "fk_nfe": fk4.nfe, "best_of_4_nfe": bo4.nfe,
                                   "difference_se": se,
                                   "holds": fk4.accuracy > bo4.accuracy and fk4.nfe <= bo4.nfe}
    for problem in ("digits", "gmm"):
        bon = [r for r in rows if r.problem == problem and r.method == "best_of_n"]
        steered = [r for r in rows if r.problem == problem and r.method not in ("best_of_n", "exact")]
        if not bon or not steered:
            continue
        per_n = []
        for b in sorted(bon, key=lambda r: r.size):
            reach = [s for s in steered if s.reward >= b.reward]
            cheapest = min(reach, key=lambda s: s.nfe) if reach else None
            per_n.append({"n": b.size, "nfe": b.nfe, "reward": b.reward,
                          "cheapest": f"{cheapest.method} {cheapest.setting}" if cheapest else None,
                          "cheapest_nfe": cheapest.nfe if cheapest else None,
                          "ratio": cheapest.nfe / b.nfe if cheapest else None})
        reached = [p for p in per_n if p["ratio"] is not None]
        best = min(reached, key=lambda p: p["ratio"]) if reached else None
        out[f"third_of_nfe_{problem}"] = {"best_ratio": best["ratio"] if best else None,
                                          "best_n": best["n"] if best else None,
                                          "holds": best is not None and best["ratio"] <= 1 / 3, "per_n": per_n}
    return out


def _verdict(holds: bool) -> str:
    return "**holds**" if holds else "**does not hold**"


def steering_section(rows: list[SteerResult]) -> list[str]:
    """The lines of BENCHMARKS.md's steering section."""
    digits = [r for r in rows if r.problem == "digits"]
    gmm = [r for r in rows if r.problem == "gmm"]
    lines = ["## Steering toward a reward", ""]
    if digits:
        d = digits[0]
        nmax = max((r.size for r in digits if r.method == "best_of_n"), default=0)
        lines += [
            f"The unconditional `digits` model ({SOLVER}, log-SNR grid, {d.steps} steps) steered toward one class "
            f"per population (classes 0-9 in turn, {d.groups} populations) by `ds.steering.digits_reward`: "
            f"log p(class | x0) under `digits-classifier` at its lowest noise level, lam = {DIGITS_LAM:g}. "
            "Accuracy: the share of populations whose best particle `digits-evaluator` (trained on real digits "
            "only, never the reward) puts in the target class. Reward: mean over populations of the best "
            "particle's reward. NFE per population, every particle and candidate counted; best-of-N for every "
            f"N is the first N of {nmax} independent samples per population, SVDD keeps its best candidate "
            "(alpha = 0, the authors' code) with one particle per population. DTS and DTS*: one tree per "
            f"population with {TREE_PARTICLES} root children, a budget of nodes (kernel steps) of k unsteered "
            "runs.", "",
            "| method | setting | NFE | reward | accuracy |", "|---|---|---|---|---|"]
        for r in digits:
            lines.append(f"| {r.method} | {r.setting} | {r.nfe:.0f} | {r.reward:.3f} | {r.accuracy:.1%} |")
        lines.append("")
    if gmm:
        g = [r for r in gmm if r.method != "exact"][0]
        lines += [
            f"`ring8` under VP-cosine with its exact denoiser ({SOLVER}, log-SNR grid, {g.steps} steps), the reward "
            f"r(x) = a.x with a = {GMM_DIRECTION}, lam = {GMM_LAM:g}: the exact target p(x) exp(lam r(x)) is "
            f"`GaussianMixture.tilted(a, lam)`. {g.groups} populations; each gives one sample of the target "
            "(a particle drawn by its final weight; best-of-N's is its best, what it returns), and those "
            "samples are compared with the target: mode-weight error (half the L1 distance between the "
            "target's weights and the mean responsibilities of the samples under the target) and the distance "
            "between the means. SVDD draws its candidate with alpha = 1 / lam (its soft-optimal policy, an "
            "approximation of the tilt). \"exact\": as many samples of the target itself (the Monte-Carlo "
            "floor of both errors). Reward (best): mean reward of each population's best particle. FK, SVDD "
            "and DTS sample the target; best-of-N and DTS* (its best leaves) maximise the reward, so their "
            "samples overshoot the target as their budget grows.", "",
            "| method | setting | NFE | reward (best) | reward (sample) | mode-weight error | mean error |",
            "|---|---|---|---|---|---|---|"]
        for r in gmm:
            nfe = "-" if r.method == "exact" else f"{r.nfe:.0f}"
            best = "-" if r.method == "exact" else f"{r.reward:.3f}"
            lines.append(f"| {r.method} | {r.setting} | {nfe} | {best} | {r.sample_reward:.3f} | "
                         f"{r.mode_error:.3f} | {r.mean_error:.3f} |")
        lines.append("")
    if not any(r.method in ("dts", "dts*") for r in rows):
        lines += ["DTS and DTS* are absent: `ds.steering.tree_search` was not available when this section ran.", ""]
    lines += ["![steering](benchmarks/steering.png)", "", "The issue's claims, as measured:", ""]
    c = claims(rows)
    if "fk4_vs_best_of_4" in c:
        f = c["fk4_vs_best_of_4"]
        own = (f"on {f['populations']} populations of their own (classes 0-9 in turn, another seed)"
               if any(r.problem == "digits_claim" for r in rows) else "on the table's populations")
        lines.append(f"* \"Steering the unconditional digits model toward one class, FK with 4 particles reaches a "
                     f"higher evaluator accuracy than best-of-4 at equal NFE\": {_verdict(f['holds'])} {own}: FK "
                     f"(diff potential) {f['fk_accuracy']:.1%} at NFE {f['fk_nfe']:.0f}, best-of-4 "
                     f"{f['best_of_4_accuracy']:.1%} at NFE {f['best_of_4_nfe']:.0f}; the difference, "
                     f"{f['fk_accuracy'] - f['best_of_4_accuracy']:+.1%}, has a binomial standard error of "
                     f"{f['difference_se']:.1%}.")
    for problem in ("digits", "gmm"):
        key = f"third_of_nfe_{problem}"
        if key not in c:
            continue
        t = c[key]
        per = "; ".join(f"N={p['n']} (NFE {p['nfe']:.0f}): " + (f"{p['ratio']:.2f}, {p['cheapest']}"
                                                            if p["ratio"] is not None else "not reached")
                        for p in t["per_n"])
        best = (f"the smallest fraction is {t['best_ratio']:.2f} (N={t['best_n']})" if t["best_ratio"] is not None
                else "no steering configuration reaches any best-of-N")
        lines.append(f"* \"The best steering method reaches best-of-N's mean reward at no more than 1/3 of its "
                     f"NFE\" ({problem}): {_verdict(t['holds'])}; {best}. Per N, the NFE of the cheapest "
                     f"configuration reaching best-of-N's mean reward, as a fraction of best-of-N's: {per}.")
    lines.append("")
    return lines


def plot_steering(rows: list[SteerResult], out: Path) -> str:
    """``steering.png``: digits accuracy and reward, GMM mode-weight error and reward, against NFE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [("digits", "accuracy", "evaluator accuracy of the best particle"),
              ("digits", "reward", "mean reward (log p, best particle)"),
              ("gmm", "mode_error", "mode-weight error to the exact tilt"),
              ("gmm", "reward", "mean reward (a.x, best particle)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=110)
    for ax, (problem, metric, label) in zip(axes.flatten(), panels):
        sub = [r for r in rows if r.problem == problem and r.method != "exact"]
        lines: dict[str, list] = {}
        for r in sub:
            name = r.method if r.method != "fk" else f"fk ({r.setting.split(',')[0]})"
            lines.setdefault(name, []).append(r)
        for name, pts in lines.items():
            pts = sorted(pts, key=lambda r: r.nfe)
            style = "--" if name == "best_of_n" else "-"
            ax.plot([r.nfe for r in pts], [getattr(r, metric) for r in pts], style, marker="o", markersize=3,
                    label=name)
        floor = [r for r in rows if r.problem == problem and r.method == "exact"]
        if floor and metric == "mode_error":
            ax.axhline(floor[0].mode_error, color="gray", linestyle=":", label="exact samples (floor)")
        ax.set_xscale("log")
        ticks = sorted({round(r.nfe) for r in sub if r.method == "best_of_n"})
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("NFE per population")
        ax.set_ylabel(label)
        ax.set_title(problem)
        ax.legend(fontsize=7)
    return save_figure(fig, out, "steering.png")
