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
from .base import Knots, Solver, combine

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
    z_base: Optional[torch.Tensor] = None     # the predictor's noise, kept for a corrector that reuses it
    # per step, for each weight of P (and of the previous step's K): whether that read of an estimate
    # is its last (see last_reads; init computes them)
    last_P: Optional[tuple[tuple[bool, ...], ...]] = None
    last_K: Optional[tuple[tuple[bool, ...], ...]] = None


def last_reads(plans, evaluate_corrected: bool = False) -> tuple[tuple, tuple]:
    """For each step, which of its reads of past estimates are their last: ``(last_P, last_K)``,
    aligned with each plan's ``P`` and with the ``K`` of the plan before it (empty without one).

    An estimate read again later is formed once (two kernels) and then costs one kernel a read;
    at its last read, :func:`~diffsampler.solvers.base.combine` takes it straight from the network
    output (two kernels, and none to form it). DPM-Solver++(2M) reads each estimate twice, so
    this saves a kernel a step.
    """
    events = []  # (step, phase, position, estimate); phase 0 corrector, 1 predictor, in execution order
    for s, plan in enumerate(plans):
        K = plans[s - 1].K if s > 0 else None
        if K is not None:
            for j, w in enumerate(K[:-1]):
                if w != 0.0:
                    events.append((s, 0, j, s - 1 - j))
            if K[-1] != 0.0:  # the estimate at the uncorrected point, read by the predictor too unless PECE
                events.append((s, 0, len(K) - 1, ("uncorrected", s) if evaluate_corrected else s))
        for j, w in enumerate(plan.P):
            if w != 0.0:
                events.append((s, 1, j, s - j))
    final = {}
    for event in events:
        final[event[3]] = event
    last_P = [[False] * len(p.P) for p in plans]
    last_K = [[False] * (len(plans[s - 1].K) if s > 0 and plans[s - 1].K else 0) for s in range(len(plans))]
    for s, phase, j, _ in final.values():
        (last_P if phase else last_K)[s][j] = True
    return tuple(map(tuple, last_P)), tuple(map(tuple, last_K))


def estimate(pred: Prediction, kind: str) -> torch.Tensor:
    """The model's data estimate (``kind == "x0"``) or noise estimate (``"eps"``)."""
    return pred.x0 if kind == "x0" else pred.eps


class LinearMultistep(Solver):
    """Base of the methods that are a table of weights over past data estimates."""

    # PECE: evaluate the model again at each corrected point (one more evaluation per corrected step).
    evaluate_corrected: ClassVar[bool] = False

    def plan(self, knots: Knots) -> tuple[StepPlan, ...]:
        raise NotImplementedError

    def init(self, knots: Knots, x: torch.Tensor) -> MultistepState:
        plans = tuple(self.plan(knots))
        # step i reads answers (m_i, m_{i-1}, ...)[:len(P)], its history being the previous step's answers
        # cut to `keep`; the corrector after step i reads that step's answers[:len(K) - 1]
        keep = max(max(len(p.P) - 1, len(p.K) - 1 if p.K else 0) for p in plans)
        for i, p in enumerate(plans):
            if len(p.P) > i + 1 or (p.K is not None and len(p.K) > i + 2):
                raise ValueError(f"{self.name}: step {i} weighs more past estimates than exist there "
                                 f"(P has {len(p.P)}, K {len(p.K) if p.K else 0}; at most {i + 1} and {i + 2})")
        return MultistepState(plans, keep, (), None, None, *last_reads(plans, self.evaluate_corrected))

    def step(self, model, x, i, state, noise):
        plan = state.plans[i]
        pred = model(x, plan.t)
        if i > 0:
            prev = state.plans[i - 1]
            if prev.K is not None:  # correct x_i with the model output just computed there
                base = state.x_base
                # K weighs the history, then (last) the answer just computed
                terms = _reads(prev.K, (*state.history[:len(prev.K) - 1], pred), state.last_K[i], base, prev.kind)
                if prev.C != 0.0:  # the predictor's own noise
                    terms.append((prev.C, state.z_base))
                x = combine(base, prev.A, terms, prev.kind)
                if self.evaluate_corrected:
                    pred = model(x, plan.t)
        answers = (pred,) + state.history
        terms = _reads(plan.P, answers, state.last_P[i], x, plan.kind)
        z = None
        if plan.C != 0.0:
            z = noise.draw(i)
            terms.append((plan.C, z))
        out = combine(x, plan.A, terms, plan.kind)
        corrected = plan.K is not None
        # (a new tuple directly: NamedTuple._replace costs about 2 us, a tenth of the step)
        return out, MultistepState(state.plans, state.keep, answers[:state.keep], x if corrected else None,
                                   z if corrected else None, state.last_P, state.last_K)


def _reads(weights, answers, last, base, kind) -> list:
    """``(weight, estimate)`` terms for :func:`combine`: the answer itself where that is cheaper (the
    estimate's last read, see ``last_reads``, or an answer at ``base``, which merges with it), else the
    formed estimate."""
    return [(w, a if f or a.at is base else estimate(a, kind)) for w, a, f in zip(weights, answers, last)]


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
