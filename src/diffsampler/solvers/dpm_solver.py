"""Multistep DPM-Solver with noise prediction (Lu et al. 2022a, "DPM-Solver: A Fast ODE Solver for
Diffusion Probabilistic Model Sampling in Around 10 Steps", arXiv:2206.00927; the multistep form of
Lu et al. 2022b, as diffusers' ``algorithm_type="dpmsolver"``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Knots
from .expint import data_step, dpm_solver_weights
from .multistep import LinearMultistep, OrderedMultistep, StepPlan

__all__ = ["DPMSolver"]


@dataclass(frozen=True)
class DPMSolver(OrderedMultistep, LinearMultistep):
    """Multistep DPM-Solver of ``solver_order`` 1 to 3 on the noise estimate.

    The same exponential integrator as DPM-Solver++ but extrapolating ``eps``
    instead of ``x0`` (better for unconditional models per the authors, worse
    under strong guidance). Options as DPM-Solver++: ``solver_type``,
    ``lower_order_final`` (diffusers' rule) and ``legacy_third_order``. A step from
    ``alpha = 0`` (a flow's ``t = 1``), where the noise estimate says nothing of
    the data, is taken in data form. Order ``solver_order`` (global 2 for order 3,
    whose first step is first order); 1 NFE per step.
    """

    solver_type: str = "midpoint"
    legacy_third_order: bool = False

    name = "dpm_solver"
    nfe_per_step = 1
    paper = "Lu et al. 2022, arXiv:2206.00927"

    def __post_init__(self):
        super().__post_init__()
        self._require(self.solver_type in ("midpoint", "heun"), "solver_type", "'midpoint' or 'heun'")

    def plan(self, knots: Knots):
        for i, k in enumerate(self.step_orders(knots)):
            if knots.alpha[i] == 0.0 or not math.isfinite(knots.lam[i]):
                A, B, _ = data_step(knots, i)
                yield StepPlan(knots.t[i], A, (B,))
                continue
            while k > 1 and knots.alpha[i - k + 1] == 0.0:
                k -= 1
            A, P = dpm_solver_weights(knots, i, k, self.solver_type, self.legacy_third_order)
            yield StepPlan(knots.t[i], A, P, kind="eps")
