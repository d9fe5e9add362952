"""``search``: the best solver, options, grid and analytical first step for one model and one budget.

    x = proc.prior((256, *shape), generator=torch.Generator().manual_seed(0))    # calibration start points
    plan = ds.calibrate.search(model, x, nfe=5)
    x0 = ds.sample(model, x_new, plan.grid, plan.solver)                         # the whole of using it
    plan.save("digits-nfe5.json"); plan = ds.calibrate.load_plan("digits-nfe5.json")

The Unified Sampling Framework and its search S3 (Liu et al., "A Unified Sampling Framework for Solver
Searching of Diffusion Probabilistic Models", ICLR 2024, arXiv:2312.07243) choose per model the solver's
order, its derivative estimates, its grid and whether to take an analytical first step, judged against a
reference. Here the space is the library's own: registered deterministic solvers with their options, the
hand-made grids and the calibrated grids of :func:`diffsampler.calibrate.grid`, and the analytical first step
of :mod:`~diffsampler.calibrate.first_step` on or off. The calibration points are split in two halves: the
calibrated grids and the Gaussian statistics are fitted on the first, every configuration is judged on the
second (the endpoint error against the reference), so the choice is not tuned to the points it is judged on.
The search is exhaustive over the hand-made grids; the calibrated grid methods, which cost a teacher solve
each, are run for the best ``calibrated_for`` configurations of that first stage. Every configuration's
cost is measured with the model's own evaluation counter and none above ``nfe`` is kept.

A :class:`Plan` is data: the solver's registered name and options, the grid, and the first step's Gaussian
statistics (stored beside the JSON in a safetensors file named by its digest).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import calibrate as _calibrate
from .. import grids as _grids
from .. import solvers as _solvers
from ..loop import sample, take
from ..solvers.base import Solver
from .base import GridMethod, check_model, check_start, into_zero, per_sample_norm, teacher_trajectory
from .gits import GITS
from ..solvers.base import require_grid_steps
from .first_step import AnalyticalFirstStep, GaussianStats, solver_record

__all__ = ["search", "SearchSpace", "Plan", "Calibration", "Candidate", "load_plan", "shipped_plans",
           "calibrated_grid", "endpoint_error", "PLANS", "DEFAULT_SOLVERS"]

PLAN_FORMAT = "diffsampler.plan/1"
PLANS = Path(__file__).parent / "plans"

#: The deterministic solvers searched by default, as (registered name, options).
DEFAULT_SOLVERS: tuple = (
    ("ddim", {}),
    ("heun", {}),
    ("dpmpp_2m", {}),
    ("dpmpp_3m", {}),
    ("unipc", {"solver_order": 2, "variant": "bh1"}),
    ("unipc", {"solver_order": 3, "variant": "bh1"}),
    ("unipc", {"solver_order": 3, "variant": "bh2"}),
    ("ipndm", {}),
    ("deis", {"solver_order": 3}),
    ("dpm_solver_singlestep", {"solver_order": 3}),
)


@dataclass(frozen=True)
class SearchSpace:
    """What :func:`search` tries, and how it measures.

    ``solvers``: solver objects, registered names or ``(name, options)`` pairs (deterministic, taking the
    grid's steps). ``grids``: hand-made grid names of ``ds.grids`` (they must accept ``t_max=``, which the
    first step needs). ``methods``: calibrated grid methods (names or objects of ``ds.calibrate.METHODS``),
    run for the ``calibrated_for`` best configurations of the hand-made stage. ``first_step``: the noise
    levels the analytical first step jumps to, as multiples of the data's RMS standard deviation in the
    noise-to-signal ratio ``sigma / alpha`` (``()``: never take it); ``rank`` caps the principal directions of
    the Gaussian statistics (``None``: all the fitting half determines). ``reference_steps``,
    ``reference_grid``, ``substeps``, ``reference``: the reference solve (a many-step high-order run).
    ``fit_fraction``: the share of the calibration points that fits; the rest judges.
    """

    solvers: tuple = DEFAULT_SOLVERS
    grids: tuple = ("logsnr", "karras", "uniform")
    methods: tuple = ("dmn", GITS(teacher_steps=20, substeps=2))
    calibrated_for: int = 2
    first_step: tuple = (4.0, 2.0)
    rank: int | None = None
    reference_steps: int = 48
    reference_grid: str = "karras"
    substeps: int = 3
    reference: str = "dpmpp_3m"
    fit_fraction: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "solvers", tuple(self.solvers))
        object.__setattr__(self, "grids", tuple(self.grids))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "first_step", tuple(self.first_step))
        if not self.solvers:
            self._refuse("solvers", "at least one deterministic solver")
        for name in self.grids:
            if name not in _grids.GRIDS:
                self._refuse("grids", f"names of ds.grids ({', '.join(_grids.names())})")
        if not self.grids and not self.methods:
            self._refuse("grids", "at least one grid name or calibrated method")
        for level in self.first_step:
            if not (isinstance(level, (int, float)) and math.isfinite(level) and level > 0):
                self._refuse("first_step", "noise levels > 0 (multiples of the data's standard deviation)")
        if isinstance(self.calibrated_for, bool) or not isinstance(self.calibrated_for, int) or self.calibrated_for < 0:
            self._refuse("calibrated_for", "an integer >= 0")
        if not (isinstance(self.fit_fraction, float) and 0 < self.fit_fraction < 1):
            self._refuse("fit_fraction", "a float in (0, 1)")
        if isinstance(self.reference_steps, bool) or not isinstance(self.reference_steps, int) or \
                self.reference_steps < 2:
            self._refuse("reference_steps", "an integer >= 2")

    def _refuse(self, option: str, allowed: str) -> None:
        raise ValueError(f"calibrate.SearchSpace: {option} = {getattr(self, option)!r} is invalid; allowed: {allowed}")

    def solver_objects(self) -> list[Solver]:
        """The searched solvers as objects, each checked to be deterministic and to take the grid's steps."""
        out = []
        for entry in self.solvers:
            if isinstance(entry, tuple):
                solver = _solvers.get(entry[0], **entry[1])
            else:
                solver = _solvers.resolve(entry)
            require_grid_steps(solver, "calibrate.search", "but the search judges solvers against the "
                               "probability-flow ODE's reference with deterministic grid methods")
            out.append(solver)
        return out

    def method_objects(self) -> list[GridMethod]:
        return [_calibrate.resolve_method(m) for m in self.methods]


@dataclass(frozen=True)
class Candidate:
    """One configuration the search judged: its solver (the wrapper when the first step is on), grid, where
    the grid came from (a ``ds.grids`` name or a calibrate method), the first step's level (``None``: off), its
    measured evaluations and its endpoint error on the judging half."""

    solver: Solver
    grid: torch.Tensor
    source: str
    first_step: float | None
    nfe: int
    error: float

    def describe(self) -> str:
        solver = self.solver.base if isinstance(self.solver, AnalyticalFirstStep) else self.solver
        options = ", ".join(f"{k}={v!r}" for k, v in solver_record(solver)["options"].items()
                            if v != getattr(type(solver)(), k))
        jump = f" + first step to {self.first_step:.3g} std" if self.first_step is not None else ""
        return f"{solver.name}{f'({options})' if options else ''} on {self.source}{jump}"


@dataclass(frozen=True)
class Plan:
    """A calibrated way to sample one model at one budget: ``ds.sample(model, x, plan.grid, plan.solver)``.

    ``solver`` is a registered solver object or an :class:`AnalyticalFirstStep` around one; ``grid`` the
    float64 grid; ``nfe`` its measured network evaluations; ``info`` JSON data on how it was made (the
    calibration seed, the errors, the model's setting).
    """

    solver: Solver
    grid: torch.Tensor
    nfe: int
    info: dict = field(default_factory=dict)

    @property
    def first_step(self) -> AnalyticalFirstStep | None:
        return self.solver if isinstance(self.solver, AnalyticalFirstStep) else None

    def to_dict(self, stats_file: str | None = None) -> dict:
        """The plan as JSON data. The first step's statistics are inline, or, with ``stats_file``, a reference
        ``{"file": stats_file, "sha256": digest}`` to a file written by :meth:`GaussianStats.save`."""
        jump = self.first_step
        base = jump.base if jump is not None else self.solver
        first = None
        if jump is not None:
            stats = {"file": stats_file, "sha256": jump.stats.digest()} if stats_file is not None else \
                {k: v.tolist() for k, v in jump.stats.tensors().items()}
            first = {"skip": jump.skip, "stats": stats}
        return {"format": PLAN_FORMAT, "solver": solver_record(base), "first_step": first,
                "grid": self.grid.tolist(), "nfe": self.nfe, "info": self.info}

    @classmethod
    def from_dict(cls, data: dict, root: str | Path | None = None) -> "Plan":
        """A plan from :meth:`to_dict`'s data; a referenced statistics file is read from ``root``."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"Plan.from_dict: not a plan (format {got!r}); allowed: data of format {PLAN_FORMAT!r}")
        solver = _solvers.get(data["solver"]["name"], **data["solver"]["options"])
        first = data.get("first_step")
        if first is not None:
            stats = first["stats"]
            if "file" in stats:
                where = Path(root) if root is not None else Path(".")
                stats = GaussianStats.load(where / stats["file"], stats["sha256"])
            else:
                dtypes = {k: torch.int64 if k == "shape" else torch.float64 for k in stats}
                stats = GaussianStats.from_tensors({k: torch.tensor(v, dtype=dtypes[k]) for k, v in stats.items()})
            solver = AnalyticalFirstStep(solver, stats, first["skip"])
        grid = torch.tensor(data["grid"], dtype=torch.float64)
        return cls(solver, grid, int(data["nfe"]), dict(data.get("info", {})))

    def save(self, path: str | Path) -> Path:
        """Write the plan's JSON to ``path`` and the first step's statistics beside it (``gaussian-<digest>``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        stats_file = None
        if self.first_step is not None:
            stats = self.first_step.stats
            stats_file = f"gaussian-{stats.digest()[:16]}.safetensors"
            if not (path.parent / stats_file).is_file():
                stats.save(path.parent / stats_file)
        path.write_text(json.dumps(self.to_dict(stats_file), indent=1) + "\n")
        return path


def shipped_plans() -> list[tuple[str, int]]:
    """``(model, nfe)`` of every plan shipped with the package."""
    out = []
    for p in sorted(PLANS.glob("*-nfe*.json")):
        model, _, nfe = p.stem.rpartition("-nfe")
        out.append((model, int(nfe)))
    return sorted(out)


def load_plan(path: str | Path | None = None, *, model: str | None = None, nfe: int | None = None) -> Plan:
    """A plan saved by :meth:`Plan.save` (``path``), or one shipped with the package (``model=``, ``nfe=``)."""
    if (path is None) == (model is None and nfe is None):
        raise ValueError("load_plan: give either a path, or model= and nfe= of a shipped plan")
    if path is None:
        shipped = shipped_plans()
        if (model, nfe) not in shipped:
            have = ", ".join(f"{m} nfe={n}" for m, n in shipped) or "none"
            raise ValueError(f"load_plan: no shipped plan for model = {model!r}, nfe = {nfe!r}; allowed: {have}")
        path = PLANS / f"{model}-nfe{nfe}.json"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_plan: no plan at {path}")
    return Plan.from_dict(json.loads(path.read_text()), root=path.parent)


def calibrated_grid(process, steps: int, *, model: str) -> torch.Tensor:
    """The grid of the shipped plan of ``model`` for ``steps`` network evaluations.

    Only half of a plan: the grid was chosen for the plan's solver (and its first step, whose grid has one
    interval more than the network steps), so sample with ``load_plan(model=..., nfe=...).solver``."""
    from .. import models as _models
    expected = _models.load(model).process
    if repr(process) != repr(expected):
        raise ValueError(f"calibrated_grid: the plans of {model!r} are for {expected!r}, got process {process!r}")
    return _grids.validate(process, load_plan(model=model, nfe=steps).grid)


def endpoint_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """The root mean square over samples of the endpoint's Euclidean error (what the search minimises)."""
    return float(per_sample_norm(out - reference).pow(2).mean().sqrt())


class Calibration:
    """The part of a search shared by every budget: the split, the reference and the Gaussian statistics.

    ``Calibration(model, x, space, cond).plan(nfe)`` is :func:`search`; making several budgets' plans from one
    ``Calibration`` solves the reference once.
    """

    def __init__(self, model, x: torch.Tensor, space: SearchSpace | None = None, cond: dict | None = None):
        check_model(model)
        space = SearchSpace() if space is None else space
        if not isinstance(space, SearchSpace):
            raise TypeError(f"calibrate.search: space must be a ds.calibrate.SearchSpace, got {type(space).__name__}")
        process = model.process
        check_start(process, x)
        n = x.shape[0]
        fit = int(round(space.fit_fraction * n))
        if fit < 2 or n - fit < 2:
            raise ValueError(f"calibrate.search: x has {n} start points; the search fits on {space.fit_fraction:g} "
                             f"of them and judges on the rest, each needing at least 2; allowed: at least 4 points")
        self.model, self.space, self.process = model, space, process
        self.solvers, self.methods = space.solver_objects(), space.method_objects()
        cond = dict(cond or {})
        with torch.no_grad():
            teacher = teacher_trajectory(model, x, space.reference_steps, space.reference_grid, space.substeps,
                                         space.reference, cond)
        reference = teacher.states[-1]
        fit_index, judge_index = torch.arange(fit), torch.arange(fit, n)
        self.x_fit, self.x_judge = x[fit_index], x[judge_index]
        self.cond_fit, self.cond_judge = take(cond, fit_index, n), take(cond, judge_index, n)
        self.reference_fit, self.reference_judge = reference[fit_index], reference[judge_index]
        self.stats = GaussianStats.from_samples(self.reference_fit, space.rank) if space.first_step else None
        self.zero = into_zero(process)

    # -- the candidates ---------------------------------------------------------------------------------
    def _judge(self, solver, grid, source, level, nfe) -> Candidate | None:
        before = self.model.nfe
        with torch.no_grad():
            out = sample(self.model, self.x_judge, grid, solver, **self.cond_judge)
        used = self.model.nfe - before
        if used > nfe:
            return None
        error = endpoint_error(out, self.reference_judge)
        return Candidate(solver, grid, source, level, used, error if math.isfinite(error) else math.inf)

    def _steps(self, solver, nfe: int, least: int) -> int | None:
        """The most steps of ``solver`` whose run costs at most ``nfe`` (``None`` below ``least`` steps)."""
        if solver.run_nfe(least, self.zero) > nfe:
            return None
        steps = least
        while solver.run_nfe(steps + 1, self.zero) <= nfe:
            steps += 1
        return steps

    def _data_std(self) -> float:
        """The data's RMS standard deviation under the Gaussian statistics."""
        return math.sqrt((float(self.stats.variances.sum()) + self.stats.residual * (self.stats.dim - self.stats.rank))
                         / self.stats.dim)

    def _skip_time(self, level: float) -> float | None:
        """The time the first step jumps to: noise-to-signal ``level`` times the data's RMS std (``None`` where
        that lies outside ``(t_min, t_max)``)."""
        t = float(self.process.t_of_lambda(-math.log(level * self._data_std())))
        return t if self.process.t_min < t < self.process.t_max else None

    def _level(self, t: float) -> float:
        """The inverse of :meth:`_skip_time`: the noise-to-signal level at ``t`` in data standard deviations."""
        return math.exp(-float(self.process.lambda_(torch.tensor(t, dtype=torch.float64)))) / self._data_std()

    def _hand_made(self, solver, nfe: int) -> list[Candidate]:
        """The solver on every hand-made grid, with and without the first step, within ``nfe``."""
        out = []
        steps = self._steps(solver, nfe, 1)
        levels = [(None, None)] + [(lv, self._skip_time(lv)) for lv in self.space.first_step]
        for name in self.space.grids:
            for level, t_skip in levels:
                if level is None:
                    if steps is None:
                        continue
                    try:
                        grid = _grids.get(name, self.process, steps)
                    except ValueError:
                        continue            # a grid this process cannot take (log-SNR at a flow's t = 1)
                    used = solver
                else:
                    if t_skip is None or steps is None:
                        continue
                    try:
                        rest = _grids.get(name, self.process, steps, t_max=t_skip)
                    except ValueError:
                        continue
                    grid = torch.cat([rest.new_tensor([self.process.t_max]), rest])
                    used = AnalyticalFirstStep(solver, self.stats)
                found = self._judge(used, grid, name, level, nfe)
                if found is not None:
                    out.append(found)
        return out

    def _calibrated(self, config: Candidate, nfe: int) -> list[Candidate]:
        """The calibrated grid methods for the solver and first-step choice of ``config`` (the first step then
        jumps over the first interval of a grid one step longer)."""
        jump = config.first_step is not None
        solver = config.solver.base if jump else config.solver
        steps = self._steps(solver, nfe, 2)
        if steps is None:
            return []
        out = []
        for method in self.methods:
            budget = solver.run_nfe(steps + jump, self.zero)
            try:
                with torch.no_grad():
                    grid = _calibrate.grid(self.model, self.x_fit, solver, budget, method=method, **self.cond_fit)
            except ValueError:
                continue                    # a method this process cannot take (DMN at a flow's t = 1)
            used = AnalyticalFirstStep(solver, self.stats) if jump else solver
            # the jump goes to the calibrated grid's second knot, whatever level the hand-made stage had
            level = self._level(float(grid[1])) if jump else None
            found = self._judge(used, grid, method.name, level, nfe)
            if found is not None:
                out.append(found)
        return out

    def candidates(self, nfe: int) -> list[Candidate]:
        """Every configuration judged for budget ``nfe``, in the order tried."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"calibrate.search: nfe must be a positive integer, got {nfe!r}")
        found = [c for solver in self.solvers for c in self._hand_made(solver, nfe)]
        if not found:
            least = min(s.run_nfe(1, self.zero) for s in self.solvers)
            raise ValueError(f"calibrate.search: nfe = {nfe} is below what every searched solver needs; allowed: "
                             f"nfe >= {least} (one step{' into t = 0' if self.zero else ''} of the cheapest)")
        best_configs = []
        for c in sorted(found, key=lambda c: c.error):
            key = (id(c.solver.base if c.first_step is not None else c.solver), c.first_step)
            if key not in [k for k, _ in best_configs]:
                best_configs.append((key, c))
            if len(best_configs) == self.space.calibrated_for:
                break
        for _, config in best_configs:
            found += self._calibrated(config, nfe)
        return found

    def plan(self, nfe: int) -> Plan:
        """The best configuration for ``nfe`` evaluations, judged on the judging half."""
        found = self.candidates(nfe)
        best = min(found, key=lambda c: c.error)          # ties go to the first tried (the simpler)
        uncalibrated = [c for c in found if c.first_step is None and c.source in self.space.grids]
        info = {"model": getattr(self.model, "name", None), "nfe": nfe, "configuration": best.describe(),
                "judged_error": best.error, "searched": len(found),
                "points": {"fit": len(self.x_fit), "judge": len(self.x_judge)}}
        if uncalibrated:
            base = min(uncalibrated, key=lambda c: c.error)
            info["best_uncalibrated"] = {"configuration": base.describe(), "judged_error": base.error}
        return Plan(best.solver, best.grid, best.nfe, info)


def search(model, x: torch.Tensor, nfe: int, *, space: SearchSpace | None = None, **cond) -> Plan:
    """The best plan for sampling ``model`` with at most ``nfe`` network evaluations.

    Parameters
    ----------
    model:
        A :class:`~diffsampler.Denoiser` (or a guidance transform of one).
    x:
        Calibration start points at the process's ``t_max`` (``process.prior``), drawn by the caller; the
        first ``space.fit_fraction`` of them fit, the rest judge.
    nfe:
        The evaluation budget; the plan's run costs at most this (counted with ``model.nfe``).
    space:
        A :class:`SearchSpace`: the solvers, grids, calibrated grid methods and first-step levels tried, and the
        reference solve.
    **cond:
        Conditioning keywords passed to the model at every evaluation (per-sample tensors are split with ``x``).

    The plan's ``solver`` carries everything chosen (an :class:`AnalyticalFirstStep` around the base solver
    when the first step won), so ``ds.sample(model, x, plan.grid, plan.solver, **cond)`` is the whole of using it.
    """
    return Calibration(model, x, space, cond).plan(nfe)
