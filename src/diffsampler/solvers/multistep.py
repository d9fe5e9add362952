"""The linear multistep engine shared by DDIM, DPM-Solver++ (2M, 3M, SDE) and UniPC.

Every such method, once the grid is known, is a table of numbers: step ``i``
moves the sample by

    x_{i+1} = A_i x_i + sum_j P_ij m_{i-j} + C_i z_i                     (predictor)

where ``m_k`` is the model's data estimate at knot ``k`` (or its noise estimate, for
the noise-prediction methods: ``StepPlan.kind``) and ``z_i`` fresh noise.
A corrector (UniPC's UniC, Zhao et al. 2023; SA-Solver's stochastic Adams-Moulton
step) re-derives ``x_{i+1}`` once the model has been evaluated there, at no extra
evaluation, keeping the predictor's noise:

    x_{i+1} <- A_i x_i + sum_j K_ij m_{i-j} + K_i,new m_{i+1} + C_i z_i

and that corrected value is what step ``i + 1`` starts from (a PECE method,
``evaluate_corrected``, evaluates the model again there). A method is then a
rule that fills the table (:meth:`LinearMultistep.plan`), and one ``step``
serves them all. The tables are built once per grid, in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

import torch

from ..denoiser import Prediction
from .base import Knots, Solver, coefficient

__all__ = ["StepPlan", "LinearMultistep", "MultistepState", "step_orders", "finite_nodes", "estimate",
           "LOWER_ORDER_FINAL_BELOW", "OrderedMultistep"]

# diffusers' rule for DPM-Solver++: below this many steps the last steps of a multistep
# solver are taken at lower order, which avoids the artefacts of large final steps.
LOWER_ORDER_FINAL_BELOW = 15


def finite_nodes(lam, i: int, k: int) -> int:
    """At most ``k`` history nodes ending at knot ``i`` whose log-SNR is finite: no node at ``t = 1`` of a
    flow, where alpha = 0 and the estimates there carry no information the expansion can use."""
    while k > 1 and not math.isfinite(lam[i - k + 1]):
        k -= 1
    return k


def step_orders(knots: Knots, order: int, lower_order_final: str) -> list[int]:
    """The order of each step of a multistep method of nominal ``order``.

    Warm-up from order 1 as history accumulates; no history point at infinite
    log-SNR (``t = 1`` of a flow, where alpha = 0) is used; a step into ``t = 0`` is
    first order. ``lower_order_final`` is ``"always"`` (step ``i`` of ``n`` at most
    order ``n - i``, UniPC's rule), ``"short"`` (the same below 15 steps,
    DPM-Solver++'s rule in diffusers) or ``"never"``.
    """
    n = len(knots)
    orders = []
    for i in range(n):
        k = finite_nodes(knots.lam, i, min(order, i + 1))
        if lower_order_final == "always" or (lower_order_final == "short" and n < LOWER_ORDER_FINAL_BELOW):
            k = min(k, n - i)
        if knots.sigma[i + 1] == 0.0:
            k = 1
        orders.append(k)
    return orders


class StepPlan(NamedTuple):
    """The numbers of one step (see the module docstring)."""

    t: float                                  # where the model is evaluated
    A: float                                  # weight of x_i
    P: tuple[float, ...]                      # weights of m_i, m_{i-1}, ...
    C: float = 0.0                            # weight of the noise
    K: Optional[tuple[float, ...]] = None     # corrector weights of m_i, m_{i-1}, ... then m_{i+1} last
    kind: str = "x0"                          # which estimate m is: "x0" (data) or "eps" (noise)


class MultistepState(NamedTuple):
    plans: tuple[StepPlan, ...]
    keep: int                                 # how many past estimates any later step reads
    history: tuple[Prediction, ...]           # the model's answers at i-1, i-2, ... (most recent first)
    x_base: Optional[torch.Tensor]            # x_{i} before prediction, kept for the corrector
    A: tuple = ()                             # per step, plan.A as a multiplier (see base.coefficient)
    z_base: Optional[torch.Tensor] = None     # the predictor's noise, kept for a corrector that reuses it


def estimate(pred: Prediction, kind: str) -> torch.Tensor:
    """The model's data estimate (``kind == "x0"``) or noise estimate (``"eps"``)."""
    return pred.x0 if kind == "x0" else pred.eps


def _combine(x: torch.Tensor, A, weights, predictions, kind: str) -> torch.Tensor:
    out = torch.mul(x, A)
    for w, pred in zip(weights, predictions):
        if w != 0.0:
            out.add_(estimate(pred, kind), alpha=w)
    return out


class LinearMultistep(Solver):
    """Base of the methods that are a table of weights over past data estimates."""

    # PECE: evaluate the model again at each corrected point (one more evaluation per corrected step).
    evaluate_corrected: ClassVar[bool] = False

    def plan(self, knots: Knots) -> tuple[StepPlan, ...]:
        raise NotImplementedError

    def init(self, knots: Knots, x: torch.Tensor) -> MultistepState:
        plans = tuple(self.plan(knots))
        keep = max(max(len(p.P), len(p.K) - 1 if p.K else 0) for p in plans)
        return MultistepState(plans, keep, (), None, tuple(coefficient(p.A, x) for p in plans))

    def step(self, model, x, i, state, noise):
        plan = state.plans[i]
        pred = model(x, plan.t)
        if i > 0:
            prev = state.plans[i - 1]
            if prev.K is not None:  # correct x_i with the model output just computed there
                x = _combine(state.x_base, state.A[i - 1], prev.K[:-1], state.history, prev.kind)
                x.add_(estimate(pred, prev.kind), alpha=prev.K[-1])
                if prev.C != 0.0:  # the predictor's own noise
                    x.add_(state.z_base, alpha=prev.C)
                if self.evaluate_corrected:
                    pred = model(x, plan.t)
        answers = (pred,) + state.history
        out = _combine(x, state.A[i], plan.P, answers, plan.kind)
        z = None
        if plan.C != 0.0:
            z = noise.draw(i)
            out.add_(z, alpha=plan.C)
        corrected = plan.K is not None
        # (a new tuple directly: NamedTuple._replace costs about 2 us, a tenth of the step)
        return out, MultistepState(state.plans, state.keep, answers[:state.keep], x if corrected else None,
                                   state.A, z if corrected else None)


@dataclass(frozen=True)
class OrderedMultistep:
    """Options shared by the multistep methods of selectable order (DPM-Solver, DEIS).

    ``solver_order`` 1 to 3 with warm-up, ``lower_order_final`` with diffusers'
    rule (below 15 steps). ``order`` is the order of the steps; the first step,
    first order for lack of history, caps the global order at 2.
    """

    solver_order: int = 2
    lower_order_final: bool = True

    def __post_init__(self):
        self._require(self.solver_order in (1, 2, 3), "solver_order", "1, 2 or 3")
        self._require(isinstance(self.lower_order_final, bool), "lower_order_final", "True or False")

    @property
    def order(self) -> int:  # type: ignore[override]
        return self.solver_order

    @property
    def global_order(self) -> int:
        return min(self.solver_order, 2)

    def step_orders(self, knots: Knots) -> list[int]:
        return step_orders(knots, self.solver_order, "short" if self.lower_order_final else "never")
