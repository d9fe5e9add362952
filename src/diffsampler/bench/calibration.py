"""Sample quality of the digits models with and without calibration, per NFE budget (issue 13, item 6).

For every shipped digits denoiser and budget, two configurations sample the same judging start points:

* ``calibrated``: the shipped plan (``ds.calibrate.load_plan(model=, nfe=)``), solver and grid as shipped;
* ``uncalibrated``: the best configuration without calibration, every searched solver on every hand-made
  grid (no calibrated grid, no analytical first step), picked the way the search picks, by endpoint error
  against its reference on the judging half of the calibration draws (seed ``CALIBRATION_SEED``), never by
  FD on the judging draws.

Both are sampled in the setting the plans were calibrated for (``calibration_problem``: classifier-free
guidance 2, labels cycling through 0-9), from start points of ``JUDGE_SEED``, a seed the calibration never
saw. The digits are judged as :mod:`diffsampler.bench.models` judges them (``digits_figures``): the Frechet
distance to the held-out real digits in ``digits-evaluator``'s feature space, and that classifier's accuracy
on the asked class. NFE is counted by the model's own counter on the judging run. The FD's sampling error
is measured by drawing the two configurations of the goal again from ``REPEAT_SEED``.

The calibration time per model and budget is what each shipped plan recorded (the reference solve and that
budget's search, on the machine that made them); in the full run one budget per model is searched again
here with the default search space and timed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["CalibrationResult", "run_calibration", "calibration_section", "digits_models", "goal",
           "FULL", "QUICK", "GOAL_NFE", "CALIBRATION_SEED", "JUDGE_SEED", "REPEAT_SEED"]

CALIBRATION_SEED = 0  # the seed the shipped plans were calibrated on (their info records it)
JUDGE_SEED = 1        # the judging start points: never drawn by the calibration
REPEAT_SEED = 2       # a second draw of the goal's configurations, for the FD's sampling error
GOAL_NFE = (5, 8)     # issue 13: the calibrated plan at NFE 5 beats the best uncalibrated at NFE 8 in FD

# ``models``: None for every shipped digits denoiser; ``points``: calibration draws for the uncalibrated
# pick (128, what the shipped plans were calibrated on); ``samples``: judging draws per configuration (a
# multiple of 10: every class equally often); ``retime_nfe``: the budget searched again and timed per model.
FULL = dict(models=None, nfes=(3, 4, 5, 6, 8, 10), points=128, samples=1000, retime_nfe=5)
QUICK = dict(models=("digits",), nfes=GOAL_NFE, points=16, samples=100, retime_nfe=None)


@dataclass
class CalibrationResult:
    model: str
    target_nfe: int
    kind: str                    # "calibrated" (the shipped plan) or "uncalibrated" (best hand-made configuration)
    configuration: str
    nfe: int                     # measured by the model's counter on the judging run
    seed: int                    # of the judging start points
    samples: int
    frechet_distance: float
    accuracy: float
    selection_error: float       # endpoint error on the calibration draws that chose it
    seconds: float               # sampling the judging draws
    calibration_seconds: float = math.nan     # calibrated rows: what the shipped plan recorded
    retimed_seconds: float = math.nan         # calibrated rows of the re-timed budget: searched again here
    retimed_configuration: str = ""           # what that search chose


def digits_models() -> list[str]:
    """The shipped digits denoisers (``ds.models``' denoisers trained on the digits)."""
    from ..models.train import SPECS
    return [name for name, spec in sorted(SPECS.items()) if spec.kind == "denoiser" and spec.data == "digits"]


def _judge(name, solver, grid, samples: int, seed: int, evaluator) -> tuple[dict, int, float]:
    """FD and accuracy of ``solver`` on ``grid`` from ``samples`` start points of ``seed``, in the calibrated
    setting; the measured evaluations and the sampling time."""
    from ..calibrate.cli import calibration_problem
    from ..loop import sample
    from ..models.quality import digits_figures

    model, x, cond, _ = calibration_problem(name, samples, seed)
    before = model.nfe
    start = time.perf_counter()
    with torch.no_grad():  # one batch: the counter then counts steps, not steps times batches
        images = sample(model, x, grid, solver, **cond)
    seconds = time.perf_counter() - start
    return digits_figures(images, cond["label"], evaluator), model.nfe - before, seconds


def _retime(name: str, nfe: int) -> tuple[float, str]:
    """Search the plan of ``name`` at ``nfe`` again as ``diffsampler calibrate`` made it (its points and seed,
    the default search space, the reference solve included); its seconds and configuration."""
    from ..calibrate.cli import POINTS, calibration_problem
    from ..calibrate.search import Calibration

    model, x, cond, _ = calibration_problem(name, POINTS["digits"], CALIBRATION_SEED)
    start = time.perf_counter()
    plan = Calibration(model, x, None, cond).plan(nfe)
    return time.perf_counter() - start, plan.info["configuration"]


def _model_rows(name: str, size: dict, evaluator, log) -> list[CalibrationResult]:
    from ..calibrate.cli import calibration_problem
    from ..calibrate.search import Calibration, SearchSpace, load_plan

    samples = size["samples"]
    model, x, cond, _ = calibration_problem(name, size["points"], CALIBRATION_SEED)
    # the search's own stage of hand-made configurations: every solver on every ds.grids grid, judged on
    # the half of the calibration draws the search judges on
    hand_made = Calibration(model, x, SearchSpace(methods=(), first_step=()), cond)
    rows = []
    for nfe in size["nfes"]:
        plan = load_plan(model=name, nfe=nfe)
        best = min(hand_made.candidates(nfe), key=lambda c: c.error)
        recorded = plan.info.get("best_uncalibrated", {}).get("configuration")
        if recorded is not None and recorded != best.describe():
            log(f"calibration {name} NFE {nfe}: best uncalibrated here {best.describe()!r}, the plan recorded "
                f"{recorded!r} (other calibration points)")
        retimed = (math.nan, "")
        if nfe == size["retime_nfe"]:
            retimed = _retime(name, nfe)
            log(f"calibration {name} NFE {nfe}: searched again in {retimed[0]:.1f} s: {retimed[1]}")
        configs = [("calibrated", plan.info["configuration"], plan.solver, plan.grid, plan.info["judged_error"]),
                   ("uncalibrated", best.describe(), best.solver, best.grid, best.error)]
        for kind, configuration, solver, grid, selection_error in configs:
            goal_config = (kind, nfe) in (("calibrated", GOAL_NFE[0]), ("uncalibrated", GOAL_NFE[1]))
            for seed in (JUDGE_SEED, REPEAT_SEED) if goal_config else (JUDGE_SEED,):
                figures, used, seconds = _judge(name, solver, grid, samples, seed, evaluator)
                extra = {}
                if kind == "calibrated":
                    extra = dict(calibration_seconds=float(plan.info.get("calibration", {}).get("seconds", math.nan)),
                                 retimed_seconds=round(retimed[0], 2), retimed_configuration=retimed[1])
                rows.append(CalibrationResult(name, nfe, kind, configuration, used, seed, samples,
                                              figures["frechet_distance"], figures["accuracy"], selection_error,
                                              round(seconds, 2), **extra))
                log(f"calibration {name} NFE {nfe} {kind} (seed {seed}): {configuration}, {used} evaluations, "
                    f"FD {figures['frechet_distance']:.2f}, accuracy {figures['accuracy']:.3f}")
    return rows


def run_calibration(quick: bool = False, log: Callable[[str], None] = print,
                    sizes: dict | None = None) -> list[CalibrationResult]:
    from .. import models

    size = sizes or (QUICK if quick else FULL)
    evaluator = models.load("digits-evaluator")
    rows = []
    for name in size["models"] or digits_models():
        rows += _model_rows(name, size, evaluator, log)
    return rows


def goal(rows: list[CalibrationResult]) -> dict[str, tuple[float, float] | None]:
    """Per model, the FD of the calibrated plan at ``GOAL_NFE[0]`` and of the best uncalibrated configuration
    at ``GOAL_NFE[1]`` on the judging draws (``None`` where one was not measured)."""
    out = {}
    for name in dict.fromkeys(r.model for r in rows):
        fd = {(r.kind, r.target_nfe): r.frechet_distance for r in rows if r.model == name and r.seed == JUDGE_SEED}
        pair = (fd.get(("calibrated", GOAL_NFE[0])), fd.get(("uncalibrated", GOAL_NFE[1])))
        out[name] = None if None in pair else pair
    return out


def _seed_spread(rows: list[CalibrationResult]) -> list[tuple[CalibrationResult, CalibrationResult]]:
    """The configurations drawn from both seeds: (judging row, repeat row)."""
    repeats = {(r.model, r.target_nfe, r.kind): r for r in rows if r.seed == REPEAT_SEED}
    return [(r, repeats[key]) for r in rows if r.seed == JUDGE_SEED
            and (key := (r.model, r.target_nfe, r.kind)) in repeats]


def _num(v: float, fmt: str) -> str:
    return "-" if v != v else format(v, fmt)


def calibration_section(rows: list[CalibrationResult]) -> list[str]:
    """The lines of BENCHMARKS.md's calibration section."""
    from ..calibrate.cli import POINTS

    judged = [r for r in rows if r.seed == JUDGE_SEED]
    samples = judged[0].samples
    lines = ["## Calibrated plans on the digits models", "",
             "Every shipped digits denoiser at each budget: the FD (to the held-out real digits, in "
             "`digits-evaluator`'s features, as in the models section) and the evaluator's accuracy of the "
             "shipped calibrated plan (`ds.calibrate.load_plan(model=, nfe=)`) and of the best uncalibrated "
             "configuration (every searched solver on every hand-made grid, no calibrated grid, no analytical "
             f"first step), chosen as the search chooses: by endpoint error against its reference on the "
             f"calibration draws of seed {CALIBRATION_SEED}, not by FD. Both sample "
             f"{samples} start points of seed {JUDGE_SEED}, which the calibration never saw, in the setting "
             "the plans were calibrated for (classifier-free guidance 2, labels cycling through 0-9). NFE: "
             "the model's counter on that run. Calibration (s): what the shipped plan recorded (the reference "
             f"solve and that budget's search, {POINTS['digits']} points, on the machine that made it).", "",
             "| model | NFE | calibrated plan | NFE used | FD | accuracy | best uncalibrated | NFE used | FD | "
             "accuracy | FD calibrated / uncalibrated | calibration (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs = {}
    for r in judged:
        pairs.setdefault((r.model, r.target_nfe), {})[r.kind] = r
    for (name, nfe), pair in pairs.items():
        cal, unc = pair["calibrated"], pair["uncalibrated"]
        lines.append(f"| {name} | {nfe} | {cal.configuration} | {cal.nfe} | {cal.frechet_distance:.2f} | "
                     f"{cal.accuracy:.1%} | {unc.configuration} | {unc.nfe} | {unc.frechet_distance:.2f} | "
                     f"{unc.accuracy:.1%} | {cal.frechet_distance / unc.frechet_distance:.2f} | "
                     f"{_num(cal.calibration_seconds, '.1f')} |")
    lines.append("")
    spread = _seed_spread(rows)
    if spread:
        lines += [f"Sampling error of the FD: the same configuration from {samples} start points of seed "
                  f"{JUDGE_SEED} and of seed {REPEAT_SEED}: "
                  + "; ".join(f"{a.model} NFE {a.target_nfe} {a.kind} {a.frechet_distance:.2f} and "
                              f"{b.frechet_distance:.2f}" for a, b in spread) + ".", ""]
    verdicts = goal(rows)
    measured = {name: v for name, v in verdicts.items() if v is not None}
    lines.append(f"**Goal: the calibrated plan at NFE {GOAL_NFE[0]} has a lower FD than the best uncalibrated "
                 f"configuration at NFE {GOAL_NFE[1]}:** "
                 + ("; ".join(f"{name}: {'yes' if cal < unc else 'no'} ({cal:.2f} against {unc:.2f})"
                              for name, (cal, unc) in measured.items()) if measured else "not measured")
                 + (f"; overall: {'yes' if all(c < u for c, u in measured.values()) else 'no'}." if measured else "."))
    retimed = [r for r in judged if r.kind == "calibrated" and r.retimed_seconds == r.retimed_seconds]
    if retimed:
        lines += ["", f"Calibration searched again here (default search space, {POINTS['digits']} points of seed "
                  f"{CALIBRATION_SEED}, reference solve included) and timed: "
                  + "; ".join(f"{r.model} NFE {r.target_nfe} in {r.retimed_seconds:.1f} s (the plan recorded "
                              f"{_num(r.calibration_seconds, '.1f')} s; "
                              + ("the same configuration" if r.retimed_configuration == r.configuration else
                                 f"chose {r.retimed_configuration}") + ")" for r in retimed) + "."]
    lines.append("")
    return lines
