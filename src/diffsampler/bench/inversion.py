"""Inversion and editing: reconstruction error against NFE, and edits of real digits.

Every method of :func:`diffsampler.invert` (DDIM-style inversion with ``ddim`` and with ``dpmpp_2m``,
BDIA, EDICT, edit-friendly DDPM, POLARIS) inverts data to noise over a sampling grid and
:func:`diffsampler.regenerate` runs it forward again under the same model and condition; the
reconstruction error is the relative L2 distance to the data, per sample (median and largest over the
samples), in float32 and float64 samples. Problems:

* ``mixture``: ``random_mixture(2, 4)`` (2-D, four labelled components) under VP ``scaled_linear``, its
  exact class-conditional denoiser given each sample's label, no guidance;
* ``mixture-cfg``: the same under classifier-free guidance at scale 3 (the null label -1);
* ``digits``, ``digits-flow``: the shipped models under CFG at scale 3 with the digits' own labels,
  held-out real digits (``ds.models.data.digits("held_out")``). The networks compute in float32
  whatever the sample's dtype; a float64 run keeps the method's own arithmetic in float64.

NFE is per sample: inversion plus regeneration, network calls counted by the Denoiser (CFG's two
passes are one call on a doubled batch). Edits (``kind == "edit"``): the workflow of
``diffsampler edit`` (:func:`diffsampler.inversion.edit.edit_digit`) on a batch of held-out digits,
float64: invert under the digit's label over the last ``strength`` of the grid, regenerate under
another label; success is the share of edits the judge reads as the target (``digits-evaluator`` for
digits, the exact class posterior for the mixture), distance the mean RMS to the original.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .report import save_figure

__all__ = ["InversionResult", "run_inversion", "inversion_section", "plot_inversion", "METHODS", "PROBLEMS",
           "FULL", "QUICK"]

METHODS = ("ddim", "dpmpp_2m", "bdia", "edict", "edit_friendly", "polaris")
PROBLEMS = ("mixture", "mixture-cfg", "digits", "digits-flow")
DTYPES = ("float32", "float64")
SCALE = 3.0          # CFG scale of mixture-cfg, digits and digits-flow (inversion and regeneration)
STRENGTH = 0.8       # edits: the share of the grid inverted (diffusers' strength, `diffsampler edit`'s default)
SEED = 0

# Sizes of a run. mixture: samples and steps; digits (both models): reconstructed digits and steps per dtype;
# edits: digits (mixture: samples) and steps of the full grid (the last STRENGTH of it is inverted).
FULL = {"mixture": dict(samples=256, steps=(5, 10, 20, 50)),
        "digits": dict(samples=16, steps={"float32": (5, 10, 20, 50), "float64": (5, 10, 20, 50)}),
        "edit": dict(samples=16, steps=50, mixture_samples=64)}
QUICK = {"mixture": dict(samples=32, steps=(5, 20)),
         "digits": dict(samples=2, steps={"float32": (5, 20), "float64": (5, 20)}),
         "edit": dict(samples=4, steps=10, mixture_samples=32)}


@dataclass
class InversionResult:
    problem: str                 # mixture, mixture-cfg, digits, digits-flow
    kind: str                    # "reconstruction" or "edit"
    method: str                  # METHODS
    dtype: str                   # float32 or float64 (the samples'; the digits networks compute in float32)
    steps: int                   # steps inverted and regenerated (edits: of the strength slice)
    samples: int
    scale: float | None          # CFG scale (None: the conditional model, no guidance)
    nfe: int                     # per sample: inversion + regeneration
    error: float | None          # reconstruction: median relative L2 error over the samples
    error_max: float | None      # reconstruction: the largest
    edit_success: float | None   # edit: share read as the target label
    edit_distance: float | None  # edit: mean RMS distance to the original
    seconds: float


def _method(name: str):
    from .. import inversion
    return inversion.METHODS[name]() if name in inversion.METHODS else name


def _applies(problem: str, method: str) -> bool:
    """POLARIS chooses its own guidance scale: it has no unguided version."""
    return not (method == "polaris" and problem == "mixture")


def _rel(x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    d = (x.double() - x0.double()).flatten(1).norm(dim=1)
    return d / x0.double().flatten(1).norm(dim=1)


def _invert_and_regenerate(base, model, x0, labels, targets, grid, method):
    """Invert ``x0`` under ``labels`` and regenerate under ``targets``: the result, its NFE and seconds."""
    from .. import inversion

    before = base.nfe
    start = time.perf_counter()
    inv = inversion.invert(model, x0, grid, _method(method), generator=torch.Generator().manual_seed(SEED),
                           label=labels)
    x = inversion.regenerate(model, inv, grid, label=targets)
    return x, base.nfe - before, round(time.perf_counter() - start, 2)


def _round_trip(problem, base, model, x0, labels, grid, method, dtype, scale, log) -> InversionResult:
    x, nfe, seconds = _invert_and_regenerate(base, model, x0, labels, labels, grid, method)
    err = _rel(x, x0)
    row = InversionResult(problem, "reconstruction", method, dtype, len(grid) - 1, x0.shape[0], scale,
                          nfe, float(err.median()), float(err.max()), None, None, seconds)
    log(f"inversion {problem} {method} {dtype} {row.steps} steps: NFE {row.nfe}, error {row.error:.2e} "
        f"(max {row.error_max:.2e})")
    return row


def _edit(problem, base, model, x0, labels, targets, grid, method, judge, log) -> InversionResult:
    x, nfe, seconds = _invert_and_regenerate(base, model, x0, labels, targets, grid, method)
    success = (judge(x) == targets).double().mean().item()
    distance = (x.double() - x0.double()).flatten(1).pow(2).mean(1).sqrt().mean().item()
    row = InversionResult(problem, "edit", method, str(x0.dtype).removeprefix("torch."), len(grid) - 1,
                          x0.shape[0], SCALE, nfe, None, None, success, distance, seconds)
    log(f"inversion edit {problem} {method}: NFE {row.nfe}, success {success:.1%}, distance {distance:.3f}")
    return row


def _other_labels(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """A target class for each sample, never its own: its label plus 1, 2, ... in turn (mod ``classes``)."""
    shift = 1 + torch.arange(len(labels)) % (classes - 1)
    return (labels + shift) % classes


def _mixture(size: dict, edit: dict, log) -> list[InversionResult]:
    from .. import grids, testbeds
    from ..guidance import cfg
    from ..process import VP

    mix = testbeds.random_mixture(2, 4, seed=0)
    process = VP.scaled_linear()
    base = mix.denoiser(process, "eps")
    x0, comp = mix.sample(size["samples"], torch.Generator().manual_seed(SEED))
    labels = mix.labels[comp]
    rows = []
    for problem, scale in (("mixture", None), ("mixture-cfg", SCALE)):
        model = base if scale is None else cfg(base, scale)
        for dtype in DTYPES:
            x = x0.to(getattr(torch, dtype))
            for steps in size["steps"]:
                grid = grids.logsnr(process, steps)
                rows += [_round_trip(problem, base, model, x, labels, grid, m, dtype, scale, log)
                         for m in METHODS if _applies(problem, m)]
    # edits: the exact class posterior of the regenerated point is the judge
    from ..inversion import strength_grid
    n = edit["mixture_samples"]
    x0, comp = mix.sample(n, torch.Generator().manual_seed(SEED + 1))
    labels = mix.labels[comp]
    targets = _other_labels(labels, mix.n_classes)
    grid = strength_grid(grids.logsnr(process, edit["steps"]), STRENGTH)

    def judge(x):
        return mix.class_posterior(x.double(), process, 0.0).argmax(-1)

    rows += [_edit("mixture-cfg", base, cfg(base, SCALE), x0, labels, targets, grid, m, judge, log)
             for m in METHODS]
    return rows


def _digits(size: dict, edit: dict, log) -> list[InversionResult]:
    from .. import grids, models
    from ..guidance import cfg
    from ..inversion import strength_grid
    from ..models.data import digits
    from ..models.quality import default_grid

    images, labels = digits("held_out")
    evaluator = models.load("digits-evaluator")

    def judge(x):
        with torch.no_grad():
            return evaluator(x.float().clamp(-1, 1)).argmax(-1)

    rows = []
    for name in ("digits", "digits-flow"):
        base = models.load(name)
        model = cfg(base, SCALE)
        family = default_grid(base.process)
        n = size["samples"]
        for dtype in DTYPES:
            x0 = images[:n].to(getattr(torch, dtype))
            for steps in size["steps"][dtype]:
                grid = grids.get(family, base.process, steps)
                rows += [_round_trip(name, base, model, x0, labels[:n], grid, m, dtype, SCALE, log)
                         for m in METHODS]
        n = edit["samples"]
        x0, y = images[:n].double(), labels[:n]
        grid = strength_grid(grids.get(family, base.process, edit["steps"]), STRENGTH)
        rows += [_edit(name, base, model, x0, y, _other_labels(y, 10), grid, m, judge, log) for m in METHODS]
    return rows


def run_inversion(quick: bool = False, log: Callable[[str], None] = print,
                  sizes: dict | None = None) -> list[InversionResult]:
    """Every problem, method, dtype and step count of the section; ``sizes`` overrides FULL / QUICK."""
    size = sizes or (QUICK if quick else FULL)
    with torch.no_grad():
        return _mixture(size["mixture"], size["edit"], log) + _digits(size["digits"], size["edit"], log)


# -- the report ------------------------------------------------------------------------------------------

def _label(problem: str) -> str:
    return {"mixture": "exact mixture, no guidance", "mixture-cfg": f"exact mixture, CFG {SCALE:g}",
            "digits": f"digits, CFG {SCALE:g}", "digits-flow": f"digits-flow, CFG {SCALE:g}"}.get(problem, problem)


def _recon(rows, **match) -> list[InversionResult]:
    return [r for r in rows if r.kind == "reconstruction" and all(getattr(r, k) == v for k, v in match.items())]


def findings(rows: list[InversionResult]) -> list[str]:
    """The section's measured statements, read from the rows."""
    out = []
    problems = [p for p in PROBLEMS if _recon(rows, problem=p)]
    for method in ("bdia", "edict", "edit_friendly"):
        for dtype in DTYPES:
            per = [(p, _recon(rows, problem=p, method=method, dtype=dtype)) for p in problems]
            per = [(p, sub) for p, sub in per if sub]
            if per:
                med = ", ".join(f"{max(r.error for r in sub):.0e} ({p})" for p, sub in per)
                worst = ", ".join(f"{max(r.error_max for r in sub):.0e}" for p, sub in per)
                out.append(f"* {method}, {dtype}: median reconstruction error at most {med} over the step counts; "
                           f"the worst sample {worst}.")
    for method in ("ddim", "dpmpp_2m"):
        per = []
        for p in problems:
            sub = sorted(_recon(rows, problem=p, method=method, dtype="float64"), key=lambda r: r.steps)
            if sub:
                per.append(f"{p} {sub[0].error:.1e} at {sub[0].steps} steps to {sub[-1].error:.1e} at "
                           f"{sub[-1].steps}")
        if per:
            out.append(f"* {method} (DDIM-style, float64): " + "; ".join(per) + ".")
    cmp_ = []
    for p in problems:
        wins, total, ratios = 0, 0, []
        for pol in _recon(rows, problem=p, method="polaris"):
            d = _recon(rows, problem=p, method="ddim", dtype=pol.dtype, steps=pol.steps)
            if d and d[0].error > 0:
                total += 1
                wins += pol.error < d[0].error
                ratios.append(pol.error / d[0].error)
        if total:
            cmp_.append(f"{p}: lower in {wins} of {total} (error ratio {min(ratios):.2f} to {max(ratios):.2f})")
    if cmp_:
        same = all(p.nfe == d.nfe for p in _recon(rows, method="polaris")
                   for d in _recon(rows, problem=p.problem, method="ddim", dtype=p.dtype, steps=p.steps))
        out.append("* POLARIS against plain DDIM inversion under the same CFG, same grid" +
                   (" and NFE" if same else "") + " (dtype and step count pairs): " + "; ".join(cmp_) + ".")
    edits = [r for r in rows if r.kind == "edit"]
    if edits:
        per = []
        for p in dict.fromkeys(r.problem for r in edits):
            sub = [r for r in edits if r.problem == p]
            best = max(sub, key=lambda r: (r.edit_success, -r.edit_distance))
            per.append(f"{p} {best.method} ({best.edit_success:.0%}, RMS {best.edit_distance:.2f})")
        out.append("* Edits, the most successful method per problem (success, distance): " + "; ".join(per) + ".")
    return out


def _fmt(e: float | None) -> str:
    return "-" if e is None else f"{e:.1e}"


def inversion_section(rows: list[InversionResult]) -> list[str]:
    """The lines of BENCHMARKS.md's inversion section."""
    recon = [r for r in rows if r.kind == "reconstruction"]
    edits = [r for r in rows if r.kind == "edit"]
    lines = ["## Inversion and editing", ""]
    mix = _recon(rows, problem="mixture")
    dig = _recon(rows, problem="digits")
    counts = []
    if mix:
        counts.append(f"{mix[0].samples} exact samples of the mixture")
    if dig:
        counts.append(f"the first {dig[0].samples} held-out real digits")
    lines += [
        "`ds.invert` then `ds.regenerate` with the same model, condition and grid: the relative L2 error of "
        "the reconstruction, per sample, median over " + " and ".join(counts or ["the samples"]) + ". "
        "Problems: `random_mixture(2, 4)` (2-D, four labelled components) under VP `scaled_linear` with its "
        "exact class-conditional denoiser given each sample's label, without guidance and under CFG at scale "
        f"{SCALE:g}; the shipped `digits` (log-SNR grid) and `digits-flow` (uniform grid) models under CFG at "
        f"scale {SCALE:g} with the digits' own labels. `ddim` and `dpmpp_2m`: DDIM-style inversion, the solver "
        "run backward (two fixed-point evaluations for the step out of t = 0); `bdia` (gamma = 1), `edict` "
        "(p = 0.93), `edit_friendly` (eta = 1, its noise maps drawn with a fixed seed), `polaris` (scales "
        "replayed in reverse; it chooses its own guidance scale, so it has no unguided row). NFE per sample: "
        "inversion and regeneration together, CFG's two passes being one network call on a doubled batch. "
        "float32 and float64 are the samples' dtypes: the digits networks compute in float32 either way (so "
        "float64 costs the same there), the mixture's exact denoiser in float64 rounded to the sample's dtype. "
        "`edit_friendly` reconstructs by construction (regeneration recomputes the inversion's own points and "
        "its last noise map is the residual to the data), so its error is the rounding of that last addition. "
        "A cell: NFE / median error, 0.0e+00 where at least half the samples come back bit for bit; the worst "
        "sample's error is `error_max` in `benchmarks/results.json` and in the list below the plot.", ""]
    for problem in PROBLEMS:
        sub = [r for r in recon if r.problem == problem]
        if not sub:
            continue
        steps = sorted({r.steps for r in sub})
        lines += [f"### {_label(problem)}", "",
                  "| method | dtype | " + " | ".join(f"{s} steps" for s in steps) + " |",
                  "|---|---|" + "---|" * len(steps)]
        for method in METHODS:
            for dtype in DTYPES:
                cells = []
                for s in steps:
                    hit = [r for r in sub if (r.method, r.dtype, r.steps) == (method, dtype, s)]
                    cells.append(f"{hit[0].nfe} / {_fmt(hit[0].error)}" if hit else "-")
                if any(c != "-" for c in cells):
                    lines.append(f"| {method} | {dtype} | " + " | ".join(cells) + " |")
        lines.append("")
    if edits:
        e = edits[0]
        lines += [
            "### Edits", "",
            f"`diffsampler edit`'s workflow (`ds.inversion.edit.edit_digit`) on a batch, float64: invert under "
            f"the sample's own label with CFG at scale {SCALE:g} over the last {STRENGTH:g} of a grid "
            f"(diffusers' img2img strength; {e.steps} of its steps), regenerate under another label (the label "
            "plus 1, 2, ... in turn, mod the classes) with the same guided model (`ds.regenerate`: POLARIS "
            "replays its scales, edit-friendly DDPM its noise maps, with no skip and the same scale for source "
            "and target). Success: the share of edits read as the target, by `digits-evaluator` (trained on "
            "real digits only) for the digits models and by the exact class posterior for the mixture; "
            "distance: mean RMS distance to the original (digits' pixels in [-1, 1]).", "",
            "| problem | samples | method | steps | NFE | success | RMS distance |", "|---|---|---|---|---|---|---|"]
        for r in edits:
            lines.append(f"| {r.problem} | {r.samples} | {r.method} | {r.steps} | {r.nfe} | {r.edit_success:.0%} | "
                         f"{r.edit_distance:.3f} |")
        lines.append("")
    lines += ["![inversion](benchmarks/inversion.png)", "", "As measured:", ""]
    lines += findings(rows)
    lines.append("")
    return lines


def plot_inversion(rows: list[InversionResult], out: Path) -> str:
    """``inversion.png``: median reconstruction error against NFE per problem (solid float64, dashed float32;
    an error of exactly 0 is drawn on the floor line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    problems = [p for p in PROBLEMS if _recon(rows, problem=p)]
    cols = 2
    nrows = max(1, math.ceil(len(problems) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 4 * nrows), dpi=110, squeeze=False)
    colors = dict(zip(METHODS, plt.cm.tab10.colors))
    floor = 1e-17
    for ax, problem in zip(axes.flatten(), problems):
        for method in METHODS:
            for dtype, style in (("float64", "-"), ("float32", "--")):
                pts = sorted(_recon(rows, problem=problem, method=method, dtype=dtype), key=lambda r: r.nfe)
                if pts:
                    ax.plot([r.nfe for r in pts], [max(r.error, floor) for r in pts], linestyle=style, marker="o",
                            markersize=3, color=colors[method])
        ax.axhline(floor, color="gray", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE per sample (inversion + regeneration)")
        ax.set_ylabel("median relative error")
        ax.set_title(_label(problem))
    for ax in axes.flatten()[len(problems):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[m], marker="o", markersize=3, label=m) for m in METHODS]
    handles += [Line2D([], [], color="black", linestyle="-", label="float64"),
                Line2D([], [], color="black", linestyle="--", label="float32"),
                Line2D([], [], color="gray", linestyle=":", label="exactly 0 (drawn at 1e-17)")]
    # every panel has an empty band between the float32 drift and float64 rounding: the legend goes there
    axes.flatten()[0].legend(handles=handles, loc="center", ncol=3, fontsize=7)
    return save_figure(fig, out, "inversion.png")
