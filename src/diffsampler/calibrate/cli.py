"""``diffsampler calibrate --model digits --nfe 5 [--out PATH] [--seed S]``: write a calibrated plan.

The plan is searched (:func:`diffsampler.calibrate.search`) on start points drawn from ``--seed``, in the
setting ``diffsampler demo`` samples the model in (the digits models: classifier-free guidance 2 over the ten
classes in equal numbers), then judged with the best uncalibrated configuration (every searched solver on
every hand-made grid, the best picked on those same points) on start points drawn from ``--seed + 1``.

``add_parser(subparsers)`` adds the command to an ``argparse`` parser and ``run(args)`` runs it; ``command``
is the same command for the Typer application of ``diffsampler``.
"""

from __future__ import annotations

import argparse
import math
import textwrap
import time
from pathlib import Path

import torch
import typer

from .search import Calibration, SearchSpace

__all__ = ["add_parser", "run", "command", "calibration_problem", "DEMO_SCALE", "WIDTH"]

WIDTH = 80
#: The classifier-free guidance weight of ``diffsampler demo`` (its ``--scale`` default).
DEMO_SCALE = 2.0
#: Calibration points per model family: the 2-D toys are cheap, the digits UNet is not.
POINTS = {"toy2d": 512, "digits": 128}


def calibration_problem(name: str, points: int | None, seed: int):
    """``(model as sampled, start points, conditioning, setting)`` of shipped model ``name``.

    The digits denoisers are class-conditional and ``diffsampler demo`` samples them with classifier-free
    guidance ``DEMO_SCALE`` over every class: that is what is calibrated, the labels cycling through 0-9.
    """
    from .. import models as _models
    from ..guidance import cfg

    if name not in _models.names():
        raise ValueError(f"calibrate: model = {name!r} is not a shipped model; allowed: {', '.join(_models.names())}")
    denoiser = _models.load(name)
    if not hasattr(denoiser, "process"):
        raise ValueError(f"calibrate: model = {name!r} is a classifier, not a denoiser; allowed: "
                         f"{', '.join(n for n in _models.names() if hasattr(_models.load(n), 'process'))}")
    family = "toy2d" if name.startswith("toy2d") else "digits"
    n = points if points is not None else POINTS[family]
    if isinstance(n, bool) or not isinstance(n, int) or n < 4:
        raise ValueError(f"calibrate: points = {n!r} is invalid; allowed: an integer >= 4")
    process = denoiser.process
    shape = (2,) if family == "toy2d" else (1, 8, 8)
    x = process.prior((n, *shape), generator=torch.Generator().manual_seed(seed))
    if family == "toy2d":
        return denoiser, x, {}, {"model": name, "guidance": None, "conditioning": None}
    labels = torch.arange(n) % 10
    setting = {"model": name, "guidance": {"cfg": DEMO_SCALE},
               "conditioning": "label = arange(points) % 10 (every class in turn), as diffsampler demo"}
    return cfg(denoiser, DEMO_SCALE), x, {"label": labels}, setting


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``calibrate`` to an ``argparse`` sub-parser collection; returns its parser."""
    p = subparsers.add_parser("calibrate", help="Search a calibrated plan (solver, grid, first step) for a model.")
    p.add_argument("--model", required=True, help="A shipped denoiser (ds.models.names()).")
    p.add_argument("--nfe", type=int, nargs="+", required=True, help="Evaluation budget(s), e.g. 5 or 3 4 5 6 8 10.")
    p.add_argument("--out", type=Path, default=None,
                   help="A .json file (one budget) or a directory for MODEL-nfeN.json (default: current directory).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the calibration start points (held out: seed + 1).")
    p.add_argument("--points", type=int, default=None, help="Calibration start points (default: 512 toys, 128 digits).")
    return p


def _say(text: str, indent: int = 0) -> None:
    """Print ``text`` wrapped at ``WIDTH`` columns, continuation lines indented two more."""
    print(textwrap.fill(text, WIDTH, initial_indent=" " * indent, subsequent_indent=" " * (indent + 2)))


def run(args, *, space: SearchSpace | None = None) -> int:
    """Search, save and report one plan per budget in ``args.nfe``; returns the exit status.

    ``space`` replaces the default :class:`SearchSpace` (a smaller one for quick checks)."""
    nfes = list(args.nfe)
    out = args.out
    if out is not None and out.suffix == ".json" and len(nfes) != 1:
        raise ValueError(f"calibrate: --out {out} names one file, but {len(nfes)} budgets were asked; allowed: a "
                         f"directory for several budgets")
    model, x, cond, setting = calibration_problem(args.model, args.points, args.seed)
    space = SearchSpace() if space is None else space
    start = time.perf_counter()
    calibration = Calibration(model, x, space, cond)
    reference_s = time.perf_counter() - start
    # the held-out points judge both the plan and the uncalibrated configurations: twice as many are drawn
    # because a Calibration judges on the half it does not fit on
    _, x_new, cond_new, _ = calibration_problem(args.model, 2 * len(x), args.seed + 1)
    held = Calibration(model, x_new, SearchSpace(solvers=space.solvers, grids=space.grids, methods=(),
                                                 first_step=()), cond_new)
    folder = out.parent if out is not None and out.suffix == ".json" else (out or Path("."))
    _say(f"{args.model}: calibrated on {len(x)} start points of seed {args.seed} (reference solve "
         f"{reference_s:.1f} s), judged on {len(held.x_judge)} of seed {args.seed + 1}; plans in {folder}")
    for nfe in nfes:
        start = time.perf_counter()
        plan = calibration.plan(nfe)
        seconds = time.perf_counter() - start
        mine = held._judge(plan.solver, plan.grid, "plan", None, nfe)
        others = held.candidates(nfe)
        best = min(others, key=lambda c: c.error)
        ratio = mine.error / best.error if best.error > 0 else math.inf
        info = {**plan.info, "setting": setting,
                "calibration": {"seed": args.seed, "points": len(x), "seconds": round(seconds + reference_s, 2)},
                "held_out": {"seed": args.seed + 1, "points": len(held.x_judge), "error": mine.error,
                             "best_uncalibrated": best.describe(), "best_uncalibrated_error": best.error}}
        plan = type(plan)(plan.solver, plan.grid, plan.nfe, info)
        path = out if out is not None and out.suffix == ".json" else (out or Path(".")) / f"{args.model}-nfe{nfe}.json"
        plan.save(path)
        _say(f"NFE {nfe}: {path.name}, searched in {seconds:.1f} s, uses {plan.nfe} evaluations")
        _say(f"error {mine.error:.4g} against {best.error:.4g} uncalibrated: {ratio:.3g}x", indent=2)
        _say(f"plan: {plan.info['configuration']}", indent=2)
        _say(f"best uncalibrated: {best.describe()}", indent=2)
    return 0


def command(
    model: str = typer.Option(..., help="A shipped denoiser (ds.models.names())."),
    nfe: list[int] = typer.Option(..., help="Evaluation budget; repeat for several (--nfe 3 --nfe 5)."),
    out: Path = typer.Option(None, help="A .json file (one budget) or a directory for MODEL-nfeN.json."),
    seed: int = typer.Option(0, help="Seed of the calibration start points (held out: seed + 1)."),
    points: int = typer.Option(None, help="Calibration start points (default: 512 toys, 128 digits)."),
) -> None:
    """Search a calibrated plan (solver, grid, analytical first step) for a shipped model; report it."""
    try:
        code = run(argparse.Namespace(model=model, nfe=nfe, out=out, seed=seed, points=points))
    except ValueError as error:  # an unknown model, a budget no solver fits, a bad --out: the message, no traceback
        raise typer.BadParameter(str(error)) from None
    raise typer.Exit(code)
