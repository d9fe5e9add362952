"""Singlestep DPM-Solver and DPM-Solver++ (Lu et al. 2022, arXiv:2206.00927, Algorithms 1 and 2;
Lu et al. 2022b, arXiv:2211.01095), with the grid's own knots as the intermediate points.

The grid is cut into groups of up to ``solver_order`` intervals (DPM-Solver's "fast"
order schedule, which is also diffusers' ``DPMSolverSinglestepScheduler`` order list).
Inside a group every step starts again from the group's first point ``x_b`` and uses
all the model evaluations made in the group so far: step ``k`` of a group is the
``k``-th order singlestep update over ``[t_b, t_{b+k}]``. Each such update is linear
in ``x_b`` and the evaluations, and ``x_b`` is linear in the current ``x`` and the
same evaluations, so the whole method is a table of weights over the shared
multistep engine, computed once per grid.

``solver_type`` chooses the second- and third-order forms: ``"midpoint"`` and
``"heun"`` as diffusers names them, and ``"paper"``, the forms of DPM-Solver-2 and
DPM-Solver-3 in Lu et al. 2022 (the midpoint form for second-order groups; in
third-order groups the Heun-like form for the interior point and the midpoint form
for the last), which is k-diffusion's ``sample_dpm_fast`` on its grids
(:func:`diffsampler.grids.dpm_fast`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Knots
from .expint import data_step
from .multistep import LinearMultistep, StepPlan

__all__ = ["DPMSolverSinglestep", "DPMppSinglestep", "group_orders"]


def group_orders(steps: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """The position of each step in its group (1 starts a group), diffusers' rule.

    With ``lower_order_final`` the last group is shortened so that no group runs past the
    end with fewer points than it needs; into ``t = 0`` the last step always starts its
    own group (a higher-order step there would divide by an infinite log-SNR step).
    """
    block = list(range(1, order + 1))
    full, rest = divmod(steps, order)
    if lower_order_final and rest == 0 and full > 0 and order > 1:
        positions = block * (full - 1) + block[:-1] + [1]
    else:
        positions = block * full + block[:rest]
    if final_zero and positions:
        positions[-1] = 1
    return positions


def _forms(solver_type: str, k: int, group_size: int) -> str:
    """The update form of the ``k``-th step of a group of ``group_size`` steps."""
    if solver_type != "paper":
        return solver_type
    if k == 2 and group_size == 3:
        return "heun"
    return "midpoint"


@dataclass(frozen=True)
class DPMSolverSinglestep(LinearMultistep):
    """Singlestep DPM-Solver with noise prediction, ``solver_order`` 1 to 3 (DPM-Solver-1/2/3).

    ``solver_type`` ``"midpoint"`` (default, diffusers' default), ``"heun"`` or ``"paper"``;
    ``lower_order_final`` shortens the last group (diffusers' rule). Order ``solver_order``,
    1 NFE per step (the intermediate points are the grid's knots).
    """

    solver_order: int = 3
    solver_type: str = "midpoint"
    lower_order_final: bool = True

    name = "dpm_solver_singlestep"
    paper = "Lu et al. 2022, arXiv:2206.00927 (DPM-Solver-2/3, singlestep)"
    nfe_per_step = 1
    data_prediction = False

    def __post_init__(self):
        self._require(self.solver_order in (1, 2, 3), "solver_order", "1, 2 or 3")
        self._require(self.solver_type in ("midpoint", "heun", "paper"), "solver_type",
                      "'midpoint', 'heun' or 'paper'")
        self._require(isinstance(self.lower_order_final, bool), "lower_order_final", "True or False")

    @property
    def order(self) -> int:  # type: ignore[override]
        return self.solver_order

    def _update(self, knots: Knots, b: int, e: int, form: str) -> tuple[float, list[float]]:
        """``(c, w)`` of the update ``x_e = c x_b + sum_j w_j m_{b+j}`` from the evaluations at ``b..e-1``."""
        k = e - b
        h = knots.lam[e] - knots.lam[b]
        if self.data_prediction:
            a_e = knots.alpha[e]
            c = knots.sigma[e] / knots.sigma[b]
            phi1 = -math.expm1(-h)                                   # 1 - e^{-h}
            phi2 = (math.expm1(-h) / h + 1.0) if math.isfinite(h) else 1.0
            phi3 = ((math.expm1(-h) + h) / (h * h) - 0.5) if math.isfinite(h) else -0.5
            first, second, third = a_e * phi1, a_e * phi2, -a_e * phi3
            half = 0.5 * a_e * phi1
        else:
            a_e, s_e = knots.alpha[e], knots.sigma[e]
            c = a_e / knots.alpha[b]
            # sigma_e (e^h - 1) = alpha_e sigma_b / alpha_b - sigma_e: finite into t = 0
            grow = a_e * knots.sigma[b] / knots.alpha[b] - s_e
            first = -grow
            second = -s_e * (math.expm1(h) / h - 1.0)
            third = -s_e * ((math.expm1(h) - h) / (h * h) - 0.5)
            half = -0.5 * grow
        if k == 1:
            return c, [first]
        if k == 2:
            r0 = (knots.lam[b + 1] - knots.lam[b]) / h
            d1 = [-1.0 / r0, 1.0 / r0]  # D1 = (m_{b+1} - m_b) / r0
            coef = half if form == "midpoint" else second
            return c, [first + coef * d1[0], coef * d1[1]]
        r1 = (knots.lam[b + 1] - knots.lam[b]) / h
        r0 = (knots.lam[b + 2] - knots.lam[b]) / h
        d10 = [-1.0 / r1, 1.0 / r1, 0.0]      # (m_{b+1} - m_b) / r1
        d11 = [-1.0 / r0, 0.0, 1.0 / r0]      # (m_{b+2} - m_b) / r0
        if form == "midpoint":
            w = [first + second * d11[0], 0.0, second * d11[2]]
            return c, w
        d1 = [(r0 * p - r1 * q) / (r0 - r1) for p, q in zip(d10, d11)]
        d2 = [2.0 * (q - p) / (r0 - r1) for p, q in zip(d10, d11)]
        return c, [(first if j == 0 else 0.0) + second * d1[j] + third * d2[j] for j in range(3)]

    def plan(self, knots: Knots):
        n = len(knots)
        positions = group_orders(n, self.solver_order, self.lower_order_final, knots.t[-1] == 0.0)
        for i in range(n):
            # A group cannot start where the log-SNR is infinite (alpha = 0, a flow at t = 1): that step
            # is a first-order data step of its own and the group starts again after it.
            if not math.isfinite(knots.lam[i]):
                j, shift = i, positions[i] - 1
                positions[i] = 1
                while j + 1 < n and positions[j + 1] > 1:
                    positions[j + 1] -= shift + 1
                    j += 1
        sizes = []
        for i, pos in enumerate(positions):  # the size of the group each step belongs to
            end = i
            while end + 1 < n and positions[end + 1] == positions[end] + 1:
                end += 1
            sizes.append(end - i + pos)
        kind = "x0" if self.data_prediction else "eps"
        prev = None  # (c, w) of the step that produced x_i, relative to the group start
        for i, pos in enumerate(positions):
            if not math.isfinite(knots.lam[i]):
                A, B, _ = data_step(knots, i)
                prev = None
                yield StepPlan(knots.t[i], A, (B,))
                continue
            b = i - pos + 1
            c, w = self._update(knots, b, i + 1, _forms(self.solver_type, pos, sizes[i]))
            if pos == 1:
                A, P = c, w
            else:
                c_prev, w_prev = prev
                A = c / c_prev
                # x_b = (x_i - sum_j w_prev_j m_{b+j}) / c_prev
                full = [wj - A * (w_prev[j] if j < len(w_prev) else 0.0) for j, wj in enumerate(w)]
                P = tuple(reversed(full))  # weights of m_i, m_{i-1}, ..., m_b
            prev = (c, w)
            yield StepPlan(knots.t[i], A, tuple(P), 0.0, None, kind)


@dataclass(frozen=True)
class DPMppSinglestep(DPMSolverSinglestep):
    """Singlestep DPM-Solver++ (data prediction), ``solver_order`` 1 to 3 (default 2, diffusers').

    Order ``solver_order``, 1 NFE per step.
    """

    solver_order: int = 2

    name = "dpmpp_singlestep"
    paper = "Lu et al. 2022, arXiv:2211.01095 (DPM-Solver++, singlestep)"
    data_prediction = True
