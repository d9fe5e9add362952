"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", arXiv:2302.04867), data prediction, variants bh1 and bh2."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Knots
from .expint import dpmpp_weights, unipc_weights
from .multistep import LinearMultistep, StepPlan, step_orders

__all__ = ["UniPC"]


@dataclass(frozen=True)
class UniPC(LinearMultistep):
    """UniP-``solver_order`` predictor with the UniC corrector.

    The corrector re-uses the model evaluation at the predicted point (no extra
    NFE) and raises the order by one; it is skipped after the last step. The
    predictor is UniP (``predictor="unip"``) or DPM-Solver++ multistep of the same
    order (``predictor="dpmpp"``: UniC after another solver, as in the paper's
    section 3.3). Warm-up from order 1; with ``lower_order_final`` (diffusers'
    default) step ``i`` of ``n`` uses at most order ``n - i``. Order
    ``solver_order + 1`` with the corrector, ``solver_order`` without; 1 NFE per step.
    """

    solver_order: int = 2
    variant: str = "bh2"
    corrector: bool = True
    predictor: str = "unip"
    lower_order_final: bool = True

    name = "unipc"
    nfe_per_step = 1
    paper = "Zhao et al. 2023, arXiv:2302.04867"

    def __post_init__(self):
        self._require(self.solver_order in (1, 2, 3), "solver_order", "1, 2 or 3")
        self._require(self.variant in ("bh1", "bh2"), "variant", "'bh1' or 'bh2'")
        self._require(isinstance(self.corrector, bool), "corrector", "True or False")
        self._require(self.predictor in ("unip", "dpmpp"), "predictor", "'unip' or 'dpmpp'")
        self._require(isinstance(self.lower_order_final, bool), "lower_order_final", "True or False")

    @property
    def order(self) -> int:  # type: ignore[override]
        return self.solver_order + (1 if self.corrector else 0)

    def plan(self, knots: Knots):
        orders = step_orders(knots, self.solver_order, "always" if self.lower_order_final else "never")
        for i, k in enumerate(orders):
            if knots.sigma[i + 1] == 0.0:  # into t = 0: return the data estimate
                A, P, _ = dpmpp_weights(knots, i, 1)
                yield StepPlan(knots.t[i], A, P)
                continue
            A, P, K = unipc_weights(knots, i, k, self.variant)
            if self.predictor == "dpmpp":
                A, P, _ = dpmpp_weights(knots, i, k)
            yield StepPlan(knots.t[i], A, P, 0.0, K if self.corrector else None)
