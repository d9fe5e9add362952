"""Calibration to the model at hand: grids optimised for one solver and one evaluation budget.

    x = proc.prior((256, *shape), generator=g)                      # calibration start points at t_max
    grid = ds.calibrate.grid(model, x, "dpmpp_2m", nfe=5)           # GITS by default
    x0 = ds.sample(model, proc.prior((16, *shape), generator=g2), grid, "dpmpp_2m")

Methods (a name, or the method object carrying its options, ``ds.calibrate.GITS(teacher_steps=60)``):

* ``"gits"``: dynamic programming over a fine teacher grid, each jump costed by one solver step from the
  teacher's state (Chen et al. 2024);
* ``"oss"``: dynamic programming that carries the student's state, per calibration point, median of the
  paths (Pei et al. 2025);
* ``"dmn"``: data-free, minimises a bound on a data-prediction multistep solver's local errors (Xue et al. 2024);
* ``"ays"``: minimises the KL upper bound of a frozen-denoiser sampler over the reference's endpoints
  (Sabour et al. 2024); the only one that accepts a stochastic solver.
"""

from __future__ import annotations

import torch

from . import dc
from .ays import AYS
from .base import GridMethod, check_model, check_start, resolve_solver, steps_for_budget
from .dmn import DMN, dmn_objective
from .dp import layered_path, path_cost, shortest_path
from .ems import ModelStatistics, ems, statistics_grid
from .gits import GITS
from .oss import OSS

__all__ = ["grid", "ems", "ModelStatistics", "statistics_grid", "dc", "METHODS", "GridMethod", "GITS", "OSS", "DMN", "AYS", "shortest_path", "layered_path",
           "path_cost", "dmn_objective", "resolve_method"]

METHODS: dict[str, type[GridMethod]] = {"gits": GITS, "oss": OSS, "dmn": DMN, "ays": AYS}


def resolve_method(method) -> GridMethod:
    """A grid method object from a name in ``METHODS`` or a method object."""
    if isinstance(method, GridMethod):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]()
    raise ValueError(f"calibrate: method = {method!r} is unknown; allowed: {', '.join(sorted(METHODS))} "
                     f"or a method object (e.g. ds.calibrate.GITS(teacher_steps=60))")


def grid(model, x: torch.Tensor, solver, nfe: int, *, method="gits", **cond) -> torch.Tensor:
    """A float64 grid, strictly decreasing from ``t_max``, whose run with ``solver`` costs at most ``nfe`` evaluations.

    Parameters
    ----------
    model:
        A :class:`~diffsampler.Denoiser` (or a guidance transform of one).
    x:
        Calibration start points at the process's ``t_max``, drawn by the caller (``process.prior``).
        Their scale is checked against the prior's.
    solver:
        A registered name or a solver object (``ds.solvers.get(name, **options)``): its options travel in
        the object. Adaptive solvers are refused; stochastic ones are accepted by ``"ays"`` only.
    nfe:
        The evaluation budget. The grid has the most steps whose run costs at most ``nfe``
        (``solver.run_nfe(steps, into_zero)``), and at least two.
    method:
        ``"gits"``, ``"oss"``, ``"dmn"``, ``"ays"`` or a method object with options.
    **cond:
        Conditioning keywords passed to the model at every evaluation.

    The methods that need a reference compute it with the library: a many-step high-order solve from
    ``x`` (``sample`` with the method's ``reference`` solver). The grid ends at 0 where the process
    reaches data.
    """
    check_model(model)
    method = resolve_method(method)
    solver = resolve_solver(solver, method)
    process = model.process
    check_start(process, x)
    steps = steps_for_budget(solver, nfe, process)
    with torch.no_grad():
        out = method.optimise(model, x, solver, steps, cond)
    if len(out) != steps + 1:
        raise RuntimeError(f"calibrate: method {method.name!r} returned {len(out) - 1} steps, {steps} were asked")
    return out


# search.py and first_step.py import this package's grid methods: bound after them
from .first_step import AnalyticalFirstStep, GaussianStats  # noqa: E402
from .search import Calibration, Plan, SearchSpace, load_plan, search, shipped_plans  # noqa: E402

__all__ += ["search", "Plan", "SearchSpace", "Calibration", "load_plan", "shipped_plans", "AnalyticalFirstStep",
            "GaussianStats"]
