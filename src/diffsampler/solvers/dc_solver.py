"""DC-Solver (Zhao et al. 2024, "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic
Compensation", arXiv:2409.03755): UniPC whose newest data estimate is replaced, before each predictor,
by a Lagrange interpolant of the last ``dc_order + 1`` estimates evaluated at a compensated time.

At step ``i >= dc_order``, with ratio ``rho_i``, the compensated time is
``t~ = t_{i-1} + rho_i (t_i - t_{i-1})`` in the process time (the authors' raw timestep, not log-SNR) and

    m~_i = sum_k m_{i-k} prod_{j != k} (t~ - t_{i-j}) / (t_{i-k} - t_{i-j}),      k, j = 0 .. dc_order

over the newest model estimate ``m_i`` and the compensated earlier ones ``m~_{i-1}, ...`` (the authors
overwrite their buffer, so the compensation compounds). ``m~_i`` stands for ``m_i`` in this step's
predictor, in the next step's corrector and in every later step; the corrector of point ``i`` itself uses
the raw estimate there, as theirs does. ``rho = 1`` is the identity: the weights are exactly ``(1, 0, ...)``.

The compensation is linear in the estimates with weights fixed by the grid and the ratios, so it is folded
into this step's predictor weights (UniPC's table over the multistep engine) and only the stored history
entry is replaced after the step. All ratios 1 (the default) is UniPC, bit for bit.
Fitting the ratios and predicting them for other budgets: :mod:`diffsampler.calibrate.dc`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

from ..denoiser import Prediction
from .base import Knots
from .multistep import LinearMultistep, MultistepState, StepPlan
from .unipc import UniPC

__all__ = ["DCSolver", "compensation_weights"]


def compensation_weights(t: tuple, i: int, ratio: float, dc_order: int) -> Optional[tuple[float, ...]]:
    """Lagrange weights of ``m~_i`` over ``(m_i, m~_{i-1}, .., m~_{i-dc_order})`` at ``t~`` (see the module
    docstring); ``None`` where nothing is compensated (``ratio == 1`` or too little history)."""
    if ratio == 1.0 or i < dc_order:
        return None
    t_comp = t[i - 1] + ratio * (t[i] - t[i - 1])
    nodes = [t[i - k] for k in range(dc_order + 1)]
    return tuple(math.prod((t_comp - nodes[j]) / (nodes[k] - nodes[j]) for j in range(dc_order + 1) if j != k)
                 for k in range(dc_order + 1))


class DCState(NamedTuple):
    inner: MultistepState
    compensation: tuple                      # per step: Lagrange weights or None


@dataclass(frozen=True)
class DCSolver(UniPC):
    """UniPC (its options: ``solver_order``, ``variant``, ``corrector``, ``predictor``,
    ``lower_order_final``) with dynamic compensation of ratios ``ratios``, one per step.

    ``ratios=None`` (default) is all 1, no compensation: exactly UniPC. Ratios of steps ``i < dc_order``
    must be 1 (there is not enough history to interpolate; the authors fix them at 1). Fitted with
    :func:`diffsampler.calibrate.dc.fit_ratios` or predicted for a budget by
    :func:`~diffsampler.calibrate.dc.predict_ratios`. Order and cost are UniPC's (1 NFE per step):
    fitted ratios tend to 1 as steps shrink (they correct the error of a coarse grid).
    """

    ratios: Optional[tuple] = None
    dc_order: int = 2

    name = "dc_solver"
    paper = "Zhao et al. 2024, arXiv:2409.03755"

    def __post_init__(self):
        super().__post_init__()
        self._require(isinstance(self.dc_order, int) and not isinstance(self.dc_order, bool)
                      and 1 <= self.dc_order <= 3, "dc_order", "1, 2 or 3")
        if self.ratios is not None:
            ok = isinstance(self.ratios, tuple) and all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in self.ratios)
            self._require(ok, "ratios", "None or a tuple of finite numbers, one per step")

    def _ratios(self, steps: int) -> tuple[float, ...]:
        if self.ratios is None:
            return (1.0,) * steps
        if len(self.ratios) != steps:
            raise ValueError(f"dc_solver: ratios has {len(self.ratios)} entries for a grid of {steps} steps; "
                             f"allowed: one ratio per step ({steps})")
        early = [i for i, r in enumerate(self.ratios[:self.dc_order]) if float(r) != 1.0]
        if early:
            raise ValueError(f"dc_solver: ratios = {self.ratios!r} sets steps {early} != 1; allowed: 1 for the "
                             f"first dc_order = {self.dc_order} steps (too little history to compensate there)")
        return tuple(float(r) for r in self.ratios)

    def plan(self, knots: Knots):
        ratios = self._ratios(len(knots))
        for i, plan in enumerate(super().plan(knots)):
            c = compensation_weights(knots.t, i, ratios[i], self.dc_order)
            if c is None:
                yield plan
                continue
            # P over (m~_i, m~_{i-1}, ...) with m~_i = sum_k c_k (m_i, m~_{i-1}, ..)_k
            P = list(plan.P) + [0.0] * (len(c) - len(plan.P))
            folded = [P[0] * c[0]] + [P[k] + P[0] * c[k] if k < len(c) else P[k] for k in range(1, len(P))]
            yield plan._replace(P=tuple(folded))

    def init(self, knots: Knots, x) -> DCState:
        inner = super().init(knots, x)
        ratios = self._ratios(len(knots))
        compensation = tuple(compensation_weights(knots.t, i, ratios[i], self.dc_order) for i in range(len(knots)))
        return DCState(inner, compensation)

    def step(self, model, x, i, state, noise):
        out, inner = LinearMultistep.step(self, model, x, i, state.inner, noise)
        c = state.compensation[i]
        if c is not None:  # the history's newest entry becomes m~_i (see the module docstring)
            answers = (inner.history[0],) + state.inner.history
            m = sum(w * a.x0 for w, a in zip(c, answers))
            inner = inner._replace(history=(Prediction(m, None),) + inner.history[1:])
        return out, DCState(inner, state.compensation)
