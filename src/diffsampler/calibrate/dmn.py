"""DMN: a data-free grid minimising a bound on the local errors of a data-prediction multistep solver.

Xue, Liu, Chen, Ma & Li, "Accelerating Diffusion Sampling with Optimized Time Steps", CVPR 2024
(arXiv:2402.17376; code: scxue/DM-NonUniform, ``step_optim.py``). A data-prediction multistep step from
``lambda_s`` to ``lambda_{s+1}`` integrates ``e^lambda x0(lambda)`` with the Lagrange polynomial through
the last ``p`` data estimates, so an error ``delta_j`` in the estimate at knot ``j`` enters ``x / sigma``
with the weight ``J_j = int e^lambda l_j(lambda) d lambda`` (``l_j`` the Lagrange basis). Assuming the
estimate's error is bounded by ``sigma_j^2 / alpha_j`` (the VP ``alpha, sigma`` of the knot's log-SNR, the
paper's choice), the objective is:

* steps of order 1 add ``|J e|``;
* the first ``trunc`` (3) steps of higher order add ``sqrt(sum_j (J_j e_j)^2)`` (independent errors);
* later steps add their ``J_j e_j`` into a per-knot sum, and ``sum_j |sum|`` is added (the errors of one
  knot's estimate, met by several steps, are the same error).

Step ``s`` of ``N`` has order ``min(s + 1, N - s, p)`` (warm-up and lower order at the end, as DPM-Solver++(3M)
with ``lower_order_final``), ``p`` the solver's order capped at 3. The interior log-SNRs are optimised with
L-BFGS over a softmax parameterisation of the increments (which keeps them ordered; the paper uses
``trust-constr`` with linear constraints) from the uniform log-SNR grid. The knots run from ``lambda(t_max)``
to ``lambda(t_min)``; where the process reaches data the last one is replaced by ``t = 0`` (a data-prediction
step into 0 returns the estimate, which the bound's last order-1 step already charges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .base import GridMethod, finish_grid, into_zero

__all__ = ["DMN", "dmn_objective", "lagrange_weights", "step_orders"]

TRUNC = 3


def _exp_moments(h: float, order: int) -> list[float]:
    """``H_m(h) = int_0^h e^u u^m du`` for ``m = 0 .. order - 1`` (``H_m = e^h h^m - m H_{m-1}``)."""
    out = [math.expm1(h)]
    for m in range(1, order):
        out.append(math.exp(h) * h ** m - m * out[-1])
    return out


def lagrange_weights(lams, a: float, b: float) -> list[float]:
    """``int_a^b e^lambda l_j(lambda) d lambda`` for the Lagrange basis ``l_j`` through the nodes ``lams``."""
    u = [lam - a for lam in lams]
    moments = _exp_moments(b - a, len(lams))
    weights = []
    for j, uj in enumerate(u):
        others = [uk for k, uk in enumerate(u) if k != j]
        coefs = np.atleast_1d(np.poly(others))[::-1] / np.prod([uj - uk for uk in others])   # increasing powers of u
        weights.append(math.exp(a) * float(sum(c * moments[m] for m, c in enumerate(coefs))))
    return weights


def step_orders(steps: int, max_order: int) -> list[int]:
    return [min(s + 1, steps - s, max_order) for s in range(steps)]


def _data_error(lam: float) -> float:
    """The bound on the data estimate's error at log-SNR ``lam``: ``sigma^2 / alpha`` of VP."""
    return (1.0 / (1.0 + math.exp(2 * lam))) * math.sqrt(1.0 + math.exp(-2 * lam))


def dmn_objective(lams, max_order: int) -> float:
    """DMN's bound for the knots ``lams`` (increasing log-SNRs, ``len(lams) - 1`` steps)."""
    lams = [float(v) for v in lams]
    steps = len(lams) - 1
    err = [_data_error(v) for v in lams]
    total, per_knot = 0.0, [0.0] * len(lams)
    for s, p in enumerate(step_orders(steps, max_order)):
        nodes = list(range(s - p + 1, s + 1))
        terms = [w * err[j] for w, j in zip(lagrange_weights([lams[j] for j in nodes], lams[s], lams[s + 1]), nodes)]
        if p == 1:
            total += abs(terms[0])
        elif s < TRUNC:
            total += math.sqrt(sum(v * v for v in terms))
        else:
            for j, v in zip(nodes, terms):
                per_knot[j] += v
    return total + sum(abs(v) for v in per_knot)


@dataclass(frozen=True)
class DMN(GridMethod):
    """Options of the DMN optimiser: ``max_order`` caps the multistep order the bound assumes (``None``: the
    solver's order, at most 3)."""

    max_order: int | None = None

    name = "dmn"
    paper = "Xue et al. 2024, arXiv:2402.17376"

    def __post_init__(self):
        self._require(self.max_order is None or (isinstance(self.max_order, int) and 1 <= self.max_order <= 3),
                      "max_order", "None or 1, 2 or 3")

    def optimise(self, model, x, solver, steps, cond):
        from scipy.optimize import minimize

        process = model.process
        lam_hi, lam_lo = float(process.lambda_(process.t_max)), float(process.lambda_(process.t_min))
        if not (math.isfinite(lam_hi) and math.isfinite(lam_lo)):
            raise ValueError(f"calibrate method 'dmn': the log-SNR must be finite at t_max and t_min of {process!r} "
                             f"(got {lam_hi} and {lam_lo}); allowed: a process with finite log-SNR there (a flow "
                             f"with t_max < 1), or method='gits' / 'oss'")
        order = self.max_order or max(1, min(3, solver.order))
        span = lam_lo - lam_hi

        def knots(u):
            # floored: two equal knots would make the Lagrange weights divide by zero
            inc = np.exp(u - u.max()) + 1e-12
            return np.concatenate([[lam_hi], lam_hi + span * np.cumsum(inc / inc.sum())])

        res = minimize(lambda u: dmn_objective(knots(u), order), np.zeros(steps), method="L-BFGS-B")
        lams = knots(res.x)
        times = process.t_of_lambda(torch.tensor(lams, dtype=torch.float64))
        times[0], times[-1] = process.t_max, process.t_min
        if into_zero(process):
            times[-1] = 0.0
        return finish_grid(process, times)
