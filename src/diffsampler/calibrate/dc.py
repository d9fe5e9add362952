"""DC-Solver's calibration (Zhao et al. 2024, arXiv:2409.03755): compensation ratios fitted against a
reference trajectory, and the cascade polynomial regression (CPR) that predicts them for other budgets.

``fit_ratios`` follows the paper's search step by step: for each step ``i >= dc_order`` in turn, the
earlier ratios fixed, ``rho_i`` minimises the mean squared error of the (corrected, where the solver
corrects) state at ``t_{i+1}`` against the reference there. The authors run 40 (diffusers: 20) AdamW steps
at lr 0.1 on that loss, differentiating through the network; the loss is a function of one scalar, so
here a bounded scalar minimisation (``scipy.optimize.minimize_scalar``, the diffusers bound
``1 +- 0.5``) does the same search without gradients through the model.

CPR: the authors model ``rho(guidance, steps, i)`` as a polynomial in ``u = step / steps`` (their
1-based step) whose coefficients are quadratics in ``guidance / 12`` whose coefficients are quadratics
in ``steps / 50``. That cascade is linear in its ``(degree + 1) x 3 x 3`` numbers, so it is fitted by
linear least squares (minimum norm where the tables do not determine it, e.g. a single guidance scale).
Ratios of the first two steps are 1, as theirs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .. import grids as _grids
from ..loop import sample
from ..solvers import resolve
from ..solvers.base import Knots
from ..solvers.dc_solver import DCSolver

__all__ = ["fit_ratios", "reference_trajectory", "CPR", "fit_cpr", "predict_ratios"]

# The authors' normalisations of the CPR inputs.
GUIDANCE_SCALE, STEPS_SCALE = 12.0, 50.0


def reference_trajectory(model, x: torch.Tensor, grid: torch.Tensor, *, substeps: int = 32,
                         solver="unipc", **cond) -> torch.Tensor:
    """The probability-flow solution from ``x`` at every knot of ``grid``, shape ``(len(grid), *x.shape)``:
    each interval solved with ``substeps`` steps uniform in log-SNR (``solver``, UniPC by default; the
    authors use a 999-step DDIM trajectory). A step into ``t = 0`` is the last substep's."""
    process = model.process
    out = [x]
    with torch.no_grad():
        for a, b in zip(grid[:-1].tolist(), grid[1:].tolist()):
            end = "zero" if b == 0.0 else "min"
            sub = _grids.logsnr(process, substeps, end=end, t_max=a, t_min=b if b > 0 else None)
            out.append(sample(model, out[-1], sub, solver, **cond))
    return torch.stack(out)


def _run_to(solver, model, x, knots, upto: int, cond):
    """The solver's state and sample after ``upto`` steps, and the corrected point there (the corrector of
    the last step applied with one more evaluation, as the authors' loss does)."""
    fn = (lambda y, t: model(y, t, **cond)) if cond else model
    state = solver.init(knots, x)
    for i in range(upto):
        x, state = solver.step(fn, x, i, state, None)
    plan = state.inner.plans[upto - 1]
    if plan.K is None:
        return x
    from ..solvers.base import combine

    pred = fn(x, knots.t[upto])
    history = state.inner.history[:len(plan.K) - 1]
    return combine(state.inner.x_base, plan.A, tuple(zip(plan.K, (*history, pred))))


def fit_ratios(model, x: torch.Tensor, grid: torch.Tensor, reference: torch.Tensor | None = None, *,
               solver: DCSolver | None = None, objective: str = "endpoint", bounds: tuple[float, float] = (0.5, 1.5),
               tol: float = 1e-4, **cond) -> tuple[float, ...]:
    """Compensation ratios for ``solver`` (a :class:`DCSolver`, default options by default) on ``grid``, one
    per step, fitted so that the run from ``x`` follows ``reference`` (the states at every knot,
    :func:`reference_trajectory`, computed here when ``None``). See the module docstring.

    ``objective="step"`` is the paper's: step ``i``'s ratio minimises the error at ``t_{i+1}``.
    ``"endpoint"`` (default) minimises the error of the whole run's result instead, by the same sequential
    scalar search. Measured on a 2-D four-component mixture (VP, UniPC-2 bh2, 128 calibration points,
    64 held out), the held-out endpoint error relative to UniPC was 0.86 / 0.96 / 0.92 (uniform grid, 5 / 6
    / 8 steps) and 0.98 / 0.78 / 1.36 (log-SNR grid) with ``"step"``, and 0.81 / 0.77 / 0.68 and 0.99 / 0.83
    / 0.90 with ``"endpoint"``: greedy per-step fits can leave the endpoint worse. Each step keeps ratio 1
    unless its fit lowers its objective."""
    from scipy.optimize import minimize_scalar

    solver = DCSolver() if solver is None else resolve(solver)
    if not isinstance(solver, DCSolver):
        raise ValueError(f"fit_ratios: solver = {solver!r} is invalid; allowed: a DCSolver (ds.solvers.get('dc_solver'))")
    grid = torch.as_tensor(grid, dtype=torch.float64)
    steps = len(grid) - 1
    if reference is None:
        reference = reference_trajectory(model, x, grid, **cond)
    if not (isinstance(reference, torch.Tensor) and reference.shape == (len(grid), *x.shape)):
        raise ValueError(f"fit_ratios: reference must hold the states at every knot, shape "
                         f"{(len(grid), *x.shape)}; got "
                         f"{tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__}")
    if objective not in ("step", "endpoint"):
        raise ValueError(f"fit_ratios: objective = {objective!r} is invalid; allowed: 'step' or 'endpoint'")
    lo, hi = bounds
    if not (0 < lo < 1 < hi):
        raise ValueError(f"fit_ratios: bounds = {bounds!r} is invalid; allowed: (lo, hi) with 0 < lo < 1 < hi")
    knots = Knots.from_grid(model.process, grid)
    ratios = [1.0] * steps
    with torch.no_grad():
        for i in range(solver.dc_order, steps):
            def loss(rho, i=i):
                trial = dataclasses.replace(solver, ratios=tuple(ratios[:i] + [float(rho)] + ratios[i + 1:]))
                upto = i + 1 if objective == "step" else steps
                return float(((_run_to(trial, model, x, knots, upto, cond) - reference[upto]) ** 2).mean())
            best = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": tol})
            ratios[i] = float(best.x) if best.fun < loss(1.0) else 1.0
    return tuple(ratios)


@dataclass(frozen=True)
class CPR:
    """The cascade polynomial regression's coefficients, shape ``(degree + 1, 3, 3)``: ``[p, a, b]`` weighs
    ``u^p (guidance/12)^(2-a) (steps/50)^(2-b)``, as the authors' ``cascade_polynomial_regression``;
    ``dc_order``: the solver's, whose first ``dc_order`` steps are not compensated (ratio 1)."""

    coefficients: np.ndarray
    dc_order: int = 2

    def __call__(self, steps: int, guidance: float = 1.0) -> tuple[float, ...]:
        return predict_ratios(self, steps, guidance)


def _features(steps: int, guidance: float, step: int, degree: int) -> np.ndarray:
    u, g, n = step / steps, guidance / GUIDANCE_SCALE, steps / STEPS_SCALE
    return np.array([[[u ** p * g ** (2 - a) * n ** (2 - b) for b in range(3)] for a in range(3)]
                     for p in range(degree + 1)]).ravel()


def fit_cpr(tables, degree: int = 3, dc_order: int = 2) -> CPR:
    """Fit the CPR to ``tables``: an iterable of ``(steps, ratios)`` or ``(steps, ratios, guidance)``
    (guidance 1 when absent), ``ratios`` one per step as :func:`fit_ratios` returns them for a solver of
    ``dc_order``. The first ``dc_order`` steps' ratios are not fitted (they are 1)."""
    if not (isinstance(degree, int) and degree >= 0):
        raise ValueError(f"fit_cpr: degree = {degree!r} is invalid; allowed: an integer >= 0")
    if not (isinstance(dc_order, int) and dc_order >= 1):
        raise ValueError(f"fit_cpr: dc_order = {dc_order!r} is invalid; allowed: an integer >= 1")
    rows, targets = [], []
    for entry in tables:
        steps, ratios, guidance = (tuple(entry) + (1.0,))[:3]
        if len(ratios) != steps:
            raise ValueError(f"fit_cpr: a table for {steps} steps has {len(ratios)} ratios; allowed: one per step")
        for step in range(dc_order + 1, steps + 1):  # 1-based, as the authors'
            rows.append(_features(steps, guidance, step, degree))
            targets.append(ratios[step - 1])
    if not rows:
        raise ValueError(f"fit_cpr: tables hold no ratio beyond the first {dc_order} steps; allowed: tables of "
                         f">= {dc_order + 1} steps")
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
    return CPR(coef.reshape(degree + 1, 3, 3), dc_order)


def predict_ratios(cpr: CPR, steps: int, guidance: float = 1.0) -> tuple[float, ...]:
    """The ratios the CPR predicts for a run of ``steps`` steps at ``guidance`` (1 for the first ``dc_order``)."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"predict_ratios: steps = {steps!r} is invalid; allowed: an integer >= 1")
    degree = cpr.coefficients.shape[0] - 1
    flat = cpr.coefficients.ravel()
    return tuple(1.0 if step <= cpr.dc_order else float(_features(steps, guidance, step, degree) @ flat)
                 for step in range(1, steps + 1))
