"""Accuracy per NFE: endpoint error against the exact probability-flow ODE, ours and the peers'.

Every configuration (a solver with its options and a grid) is run from the same
start points ``x_T`` on the same exact Gaussian-mixture model, and its final
sample is compared with ``ode_reference`` from the configuration's own first
time to its own last time (a peer whose grid starts below ``t_max`` is judged on
the ODE it actually solves). NFE is what the Denoiser counted.

Beside the fixed configurations, each problem and budget gets one calibrated row: the plan of
``ds.calibrate.search`` (solver, options, hand-made or calibrated grid, analytical first step), found on
start points of another seed (``CALIBRATION_SEED``) and judged here on the bench's own, like every row.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import grids as _grids
from .. import solvers as _solvers
from ..calibrate import GITS
from ..calibrate.search import DEFAULT_SOLVERS, Plan, SearchSpace, search
from ..loop import sample
from ..process import EDM, Flow, Process, VPDiscrete
from ..testbeds import GaussianMixture, get as get_testbed
from . import peers

__all__ = ["Problem", "Result", "Failure", "problems", "run_accuracy", "run_adaptive", "NFES", "QUICK_NFES",
           "calibration_points", "calibration_space", "calibrated_config", "is_calibrated", "CALIBRATED"]

NFES = [3, 4, 5, 6, 8, 10, 15, 20, 50]
QUICK_NFES = [5, 10, 20]
OUR_GRIDS = ["uniform", "logsnr", "karras", "quadratic"]
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

# The bench's start points and the calibration points come from two seeds, so that a calibrated row is
# judged on draws it was not fitted to (checked in ``calibration_points``).
BENCH_SEED = 0
CALIBRATION_SEED = 1
# The search fits on half of these and chooses on the other half; the Gaussian mixtures cost little per
# point, so 128 points take hardly longer than 64 and choose more reliably.
CALIBRATION_POINTS = 128
# The calibrated rows' configs start with this.
CALIBRATED = "calibrated: "
# The bench's frequent winners beside the search's own solvers. Measured on the 12 problems at NFE 3, 4, 5
# and 10: with them, the quadratic grid and 128 points instead of the search's defaults and 64, the calibrated
# row's error is lower in 33 of 48 cases, higher in 5 (the choice on 64 judging points is noisy), 0.81x in
# geometric mean.
CALIBRATION_SOLVERS = DEFAULT_SOLVERS + (("gradient_estimation", {}), ("ipndm_v", {}))
# The search's reference solve and GITS's teacher. The search's default reference (DPM-Solver++(3M), 48
# Karras intervals) ends with a data-estimate step from t_min, which under SD's VP schedule (sigma_min
# 0.029) leaves it 8.5e-4 from the exact endpoint on gmm16 however many steps it takes, so at NFE 50 the
# search preferred configurations sharing that last step (3-10x the best fixed row's error); LMS's last step
# extrapolates (measured on gmm16 at 96 intervals: 3.5e-7 under SD's VP schedule, 6e-5 cosine, 2e-6 EDM,
# 5e-5 flow).
CALIBRATION_REFERENCE = dict(reference="lms", reference_steps=96)
# A small teacher (20 Karras intervals, 2 reference steps each): GITS then costs well under a second.
CALIBRATION_GITS = GITS(teacher_steps=20, substeps=2, reference=CALIBRATION_REFERENCE["reference"])
# DMN's L-BFGS over the interior knots takes 3-4 s at 10 steps and 10-60 s at 20 and 50, against about a
# second for the rest of the search, so above this budget only GITS's grid is calibrated.
DMN_MAX_NFE = 10


@dataclass
class Problem:
    testbed: str
    process_name: str
    gmm: GaussianMixture
    process: Process
    prediction: str
    x_T: torch.Tensor
    diffusers_config: dict | None  # beta schedule for diffusers' discrete schedulers, None if not VP


@dataclass
class Failure:
    testbed: str
    process: str
    family: str
    config: str
    steps: int
    error: str


@dataclass
class Result:
    testbed: str
    process: str
    family: str      # "diffsampler", "diffusers" or "k-diffusion"
    config: str      # solver + options + grid
    target_nfe: int
    nfe: int
    rmse: float
    t_start: float | None = None  # where the configuration's grid starts (t_max unless a peer skips ahead)
    calibration_s: float | None = None  # seconds the calibrated row's search took (None: not calibrated)


def _vp(schedule: str) -> tuple[VPDiscrete, dict]:
    from diffusers import DDIMScheduler
    cfg = dict(SD_BETAS) if schedule == "scaled_linear" else {"beta_schedule": "squaredcos_cap_v2"}
    # The process is built from diffusers' own float32 schedule so that every library sees one model.
    return peers.vp_process_of(DDIMScheduler(**cfg)), cfg


def problems(quick: bool, n: int) -> list[Problem]:
    testbeds = ["ring8"] if quick else ["ring8", "gmm16", "gmm64"]
    names = ["vp_scaled_linear", "flow"] if quick else ["vp_scaled_linear", "vp_cosine", "edm", "flow"]
    out = []
    for tb in testbeds:
        gmm = get_testbed(tb)
        for name in names:
            cfg = None
            if name == "vp_scaled_linear":
                proc, cfg = _vp("scaled_linear")
            elif name == "vp_cosine":
                proc, cfg = _vp("squaredcos_cap_v2")
            elif name == "edm":
                proc = EDM()
            else:
                proc = Flow()
            g = torch.Generator().manual_seed(BENCH_SEED)
            x_T = proc.prior((n, gmm.dim), generator=g, dtype=torch.float64)
            out.append(Problem(tb, name, gmm, proc, "velocity" if isinstance(proc, Flow) else "eps", x_T, cfg))
    return out


class _References:
    """Exact endpoints, cached by (first time, last time) of a grid."""

    def __init__(self, problem: Problem):
        self.p, self.cache = problem, {}

    def error(self, x: torch.Tensor, grid: torch.Tensor) -> float:
        key = (round(float(grid[0]), 12), round(float(grid[-1]), 12))
        if key not in self.cache:
            self.cache[key] = self.p.gmm.ode_reference(self.p.process, self.p.x_T, key[0], key[1])
        return (x - self.cache[key]).pow(2).mean().sqrt().item()


def _our_configs(process: Process):
    for name in _solvers.names():
        cls = _solvers.REGISTRY[name]
        if cls().stochastic or cls.adaptive:  # adaptive solvers spend what their tolerances ask
            continue
        for grid in OUR_GRIDS:
            yield name, cls, grid


def budget_steps(cls, nfe: int) -> int:
    """The most steps of solver class ``cls`` within ``nfe`` network evaluations on a grid ending at
    t = 0 (at least one), by the class's own count ``run_nfe``."""
    steps = 1
    while cls.run_nfe(steps + 1, into_zero=True) <= nfe:
        steps += 1
    return steps


def _diffusers_configs(problem: Problem) -> list[tuple[str, str, dict]]:
    if problem.diffusers_config is None:
        if isinstance(problem.process, Flow):
            return [("FlowMatchEulerDiscreteScheduler", "flow euler", {}),
                    ("FlowMatchHeunDiscreteScheduler", "flow heun", {})]
        return []
    return [
        ("DDIMScheduler", "ddim (defaults, clip off)", {"clip_sample": False}),
        ("DDIMScheduler", "ddim trailing", {"clip_sample": False, "timestep_spacing": "trailing"}),
        ("EulerDiscreteScheduler", "euler", {}),
        ("EulerDiscreteScheduler", "euler karras", {"use_karras_sigmas": True}),
        ("HeunDiscreteScheduler", "heun", {}),
        ("HeunDiscreteScheduler", "heun karras", {"use_karras_sigmas": True}),
        ("LMSDiscreteScheduler", "lms", {}),
        ("LMSDiscreteScheduler", "lms karras", {"use_karras_sigmas": True}),
        ("KDPM2DiscreteScheduler", "kdpm2", {}),
        ("DPMSolverMultistepScheduler", "dpm++ 2M", {}),
        ("DPMSolverMultistepScheduler", "dpm++ 2M karras", {"use_karras_sigmas": True}),
        ("DPMSolverMultistepScheduler", "dpm++ 3M", {"solver_order": 3}),
        ("DPMSolverMultistepScheduler", "dpm++ 2M lu", {"use_lu_lambdas": True}),
        ("DPMSolverSinglestepScheduler", "dpm++ 2S", {}),
        ("DPMSolverSinglestepScheduler", "dpm++ 3S", {"solver_order": 3}),
        ("UniPCMultistepScheduler", "unipc bh2", {}),
        ("UniPCMultistepScheduler", "unipc bh1 order 3", {"solver_type": "bh1", "solver_order": 3}),
        ("UniPCMultistepScheduler", "unipc bh2 karras", {"use_karras_sigmas": True}),
        ("DEISMultistepScheduler", "deis", {}),
        ("DEISMultistepScheduler", "deis order 3", {"solver_order": 3}),
        ("PNDMScheduler", "pndm", {"skip_prk_steps": True}),
    ]


def _diffusers_steps(make: Callable, nfe: int) -> int | None:
    """The most steps whose NFE (timesteps visited) stays within ``nfe``."""
    best = None
    for steps in range(1, nfe + 1):
        try:
            sched = make()
            sched.set_timesteps(steps)
        except Exception:  # noqa: BLE001 - some schedulers reject small step counts
            continue
        if len(sched.timesteps) <= nfe:
            best = steps
    return best


def calibration_points(problem: Problem, n: int = CALIBRATION_POINTS) -> torch.Tensor:
    """``n`` start points at ``t_max`` from ``CALIBRATION_SEED``: never the draws the bench judges on."""
    if CALIBRATION_SEED == BENCH_SEED:
        raise RuntimeError(f"bench: the calibration seed must differ from the bench's start points' seed "
                           f"({BENCH_SEED}), got {CALIBRATION_SEED}")
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    x = problem.process.prior((n, problem.gmm.dim), generator=g, dtype=torch.float64)
    if bool((torch.cdist(x, problem.x_T) == 0).any()):
        raise RuntimeError("bench: a calibration point is one of the bench's own start points")
    return x


def calibration_space(nfe: int, quick: bool) -> SearchSpace:
    """What the calibrated row searches at budget ``nfe``: the bench's grids, the search's solvers and the
    bench's frequent winners, the analytical first step, and the calibrated grids of GITS, plus DMN up to
    ``DMN_MAX_NFE`` (``--quick``: GITS only). A budget buying more steps than GITS's 20-interval teacher
    (NFE 50) has no calibrated grid: the search then picks among the hand-made grids and the first step."""
    methods = (CALIBRATION_GITS,) if quick or nfe > DMN_MAX_NFE else ("dmn", CALIBRATION_GITS)
    return SearchSpace(solvers=CALIBRATION_SOLVERS, grids=tuple(OUR_GRIDS), methods=methods,
                       **CALIBRATION_REFERENCE)


def calibrated_config(plan: Plan) -> str:
    """``"calibrated: <solver> + <grid> grid[ + first step ...]"`` from the plan's own description
    (``"<solver> on <grid>[ + first step to <level> std]"``)."""
    described = plan.info["configuration"]
    solver, on, rest = described.partition(" on ")
    if not on:
        return CALIBRATED + described
    grid, jump, level = rest.partition(" + ")
    return f"{CALIBRATED}{solver} + {grid} grid" + (f" + {level}" if jump else "")


def is_calibrated(result: Result) -> bool:
    return result.config.startswith(CALIBRATED)


KD_SAMPLERS = [("euler", 1), ("heun", 2), ("dpm_2", 2), ("lms", 1), ("dpmpp_2m", 1)]


def run_accuracy(quick: bool = False, n: int = 256,
                 log: Callable[[str], None] = print) -> tuple[list[Result], list[Failure]]:
    """All configurations at every NFE budget; a peer that raises or returns non-finite values is a Failure.

    The calibrated row of each budget is ``ds.calibrate.search``'s plan from ``calibration_points``.
    """
    import diffusers

    nfes = QUICK_NFES if quick else NFES
    results: list[Result] = []
    failures: list[Failure] = []
    warnings.filterwarnings("ignore", module="diffusers")
    for prob in problems(quick, n):
        refs = _References(prob)
        model = prob.gmm.denoiser(prob.process, prob.prediction)
        log(f"accuracy: {prob.testbed} / {prob.process_name}")

        x_calibration = calibration_points(prob)

        def record(family, config, target, x, grid, nfe, **extra):
            results.append(Result(prob.testbed, prob.process_name, family, config, target, nfe,
                                  refs.error(x, grid), float(grid[0]), **extra))

        for target in nfes:
            for name, cls, grid_name in _our_configs(prob.process):
                try:
                    grid = _grids.get(grid_name, prob.process, budget_steps(cls, target))
                except ValueError:
                    continue  # e.g. log-SNR spacing from t = 1 of a flow
                model.nfe = 0
                x = sample(model, prob.x_T, grid, cls())
                record("diffsampler", f"{name} {grid_name}", target, x, grid, model.nfe)

            began = time.perf_counter()
            plan = search(model, x_calibration, target, space=calibration_space(target, quick))
            seconds = time.perf_counter() - began
            model.nfe = 0
            x = sample(model, prob.x_T, plan.grid, plan.solver)
            record("diffsampler", calibrated_config(plan), target, x, plan.grid, model.nfe, calibration_s=seconds)

            for cls_name, label, opts in _diffusers_configs(prob):
                make = lambda: getattr(diffusers, cls_name)(**(prob.diffusers_config or {}), **opts)  # noqa: E731
                steps = _diffusers_steps(make, target)
                if steps is None:
                    continue
                sched = make()
                model.nfe = 0
                try:
                    if isinstance(prob.process, Flow):
                        x = peers.run_diffusers_flow(sched, model, prob.x_T, steps)
                        grid = peers.diffusers_flow_grid(sched, prob.process)
                    else:
                        x = peers.run_diffusers(sched, model, prob.x_T, steps)
                        grid = peers.diffusers_grid(sched, prob.process)
                except Exception as err:  # noqa: BLE001 - a peer failing is a result, not a crash
                    failures.append(Failure(prob.testbed, prob.process_name, "diffusers", label, steps,
                                            f"{type(err).__name__}: {err}"))
                    continue
                if not math.isfinite(float(x.sum())):
                    failures.append(Failure(prob.testbed, prob.process_name, "diffusers", label, steps,
                                            "non-finite output"))
                    continue
                record("diffusers", label, target, x, grid, model.nfe)

            for kd_name, per_step in KD_SAMPLERS:
                steps = max(1, (target + 1) // 2) if per_step == 2 else target
                for grid_name in ("karras", "exponential"):
                    grid = _kdiffusion_grid(prob.process, grid_name, steps)
                    if grid is None:
                        continue
                    model.nfe = 0
                    try:
                        x = peers.run_kdiffusion(kd_name, model, prob.x_T, grid)
                    except Exception as err:  # noqa: BLE001
                        failures.append(Failure(prob.testbed, prob.process_name, "k-diffusion",
                                                f"{kd_name} {grid_name}", steps, f"{type(err).__name__}: {err}"))
                        continue
                    record("k-diffusion", f"{kd_name} {grid_name}", target, x, grid, model.nfe)
    return results, failures


ADAPTIVE_RTOLS = (0.05, 0.01, 0.001)


def run_adaptive(quick: bool = False, n: int = 256, log: Callable[[str], None] = print) -> list[Result]:
    """``dpm_adaptive`` (order 3, ``atol = rtol / 10``) at a few tolerances on every accuracy problem.

    Its cost follows from the tolerance, so each result's ``target_nfe`` is the smallest budget of
    ``NFES`` that covers what it spent (the largest budget when none does).
    """
    out = []
    for prob in problems(quick, n):
        log(f"adaptive: {prob.testbed} / {prob.process_name}")
        refs = _References(prob)
        model = prob.gmm.denoiser(prob.process, prob.prediction)
        grid = _adaptive_grid(prob.process)
        for rtol in ADAPTIVE_RTOLS[:1] if quick else ADAPTIVE_RTOLS:
            model.nfe = 0
            x = sample(model, prob.x_T, grid, _solvers.DPMAdaptive(rtol=rtol, atol=rtol / 10))
            target = next((b for b in NFES if b >= model.nfe), NFES[-1])
            out.append(Result(prob.testbed, prob.process_name, "diffsampler", f"dpm_adaptive rtol={rtol:g}",
                              target, model.nfe, refs.error(x, grid), float(grid[0])))
    return out


def _adaptive_grid(process: Process) -> torch.Tensor:
    """``[t_max, t_min, 0]``: one adaptive interval, then the data estimate. A flow starts at alpha = 0,
    where the log-SNR is unbounded and the first interval is a DDIM step: there it ends at t = 0.98."""
    knots = [process.t_max] + ([0.98] if isinstance(process, Flow) else []) + [process.t_min, 0.0]
    return torch.tensor(knots, dtype=torch.float64)


def _kdiffusion_grid(process: Process, kind: str, steps: int) -> torch.Tensor | None:
    """k-diffusion's own sigma schedules (with the trailing 0), as process times."""
    ks = peers.kdiffusion_sampling()
    s_max, s_min = float(process.ode_sigma(process.t_max)), float(process.ode_sigma(process.t_min))
    if kind == "karras":
        sigmas = ks.get_sigmas_karras(steps, s_min, s_max, device="cpu").to(torch.float64)
    else:
        sigmas = ks.get_sigmas_exponential(steps, s_min, s_max, device="cpu").to(torch.float64)
    times = [min(max(float(process.t_of_ode_sigma(float(s))), process.t_min), process.t_max)
             for s in sigmas[:-1]] + [0.0]
    times[0] = process.t_max
    try:
        return _grids.validate(process, times)
    except ValueError:
        return None
