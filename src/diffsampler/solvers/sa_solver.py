"""SA-Solver: stochastic Adams predictor-corrector methods (Xue et al. 2023, "SA-Solver: Stochastic Adams
Solver for Fast Sampling of Diffusion Models", arXiv:2309.05019), in the data-prediction form that
diffusers' ``SASolverScheduler`` and ComfyUI's ``sa_solver`` / ``sa_solver_pece`` ship.

The reverse SDE family with noise strength ``tau`` (0: the probability-flow ODE, 1: the reverse SDE),
integrated exactly in its linear part over a step from log-SNR ``l_s`` to ``l_t`` (``h = l_t - l_s``):

    x_t = (sigma_t / sigma_s) e^{-tau^2 h} x_s
          + alpha_t (1 + tau^2) int_{l_s}^{l_t} e^{-(1 + tau^2)(l_t - l)} x0(l) dl
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) z

The predictor (stochastic Adams-Bashforth) replaces ``x0(l)`` by the Lagrange polynomial through the
last ``predictor_order`` data estimates; once the model has been evaluated at the predicted point, the
corrector (stochastic Adams-Moulton) takes the same step again with the polynomial through the new
estimate and the last ``corrector_order - 1`` old ones, and the same noise ``z``. Both are rows of the
multistep engine's table; the integrals are computed once per grid (closed form at order 1, 24-point
Gauss-Legendre above). ``simple_order_2`` uses the paper's simplified order-2 weights (Appendix D),
which diffusers always uses at order 2.

``tau`` is ``eta`` inside a window of the process's time range and 0 outside: by default the middle
60 % (diffusers' ``200 <= timestep <= 800``, ComfyUI's 20 %-80 % of the schedule), judged at each step's
start (diffusers; ComfyUI judges at the step's end). The window's position runs from 0 (clean) to 1
(noise): ``t / t_max`` for VP processes and flows, log-linear in the noise level for EDM (ComfyUI's
percentages for EDM models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..process import EDM
from .base import Knots
from .lms import gauss_legendre, lagrange_basis
from .multistep import LinearMultistep, StepPlan, finite_nodes

__all__ = ["SASolver", "SASolverPECE", "stochastic_adams_weights"]


def stochastic_adams_weights(nodes: list[float], l_s: float, l_t: float, tau: float) -> list[float]:
    """``[(1 + tau^2) int_{l_s}^{l_t} e^{-(1 + tau^2)(l_t - l)} L_j(l) dl for j]``, ``L_j`` the Lagrange basis
    through the log-SNR ``nodes`` (without the factor ``alpha_t``)."""
    rate = 1.0 + tau * tau
    if len(nodes) == 1:
        return [-math.expm1(-rate * (l_t - l_s))]

    def integrand(j):
        return lambda lam: rate * np.exp(-rate * (l_t - lam)) * lagrange_basis(nodes, j, lam)

    return [gauss_legendre(integrand(j), l_s, l_t) for j in range(len(nodes))]


def _simple_order_2(l_prev: float, l_s: float, l_t: float, tau: float, corrector: bool) -> list[float]:
    """The paper's simplified order-2 weights (Appendix D), newest node first: the first-order weight
    ``1 - e^{-(1 + tau^2) h}`` split by a plain ``(1 + tau^2) h / 2`` (corrector) or ``(1 + tau^2) h^2 /
    (2 (l_s - l_prev))`` (predictor) difference term."""
    rate, h = 1.0 + tau * tau, l_t - l_s
    total = -math.expm1(-rate * h)
    if corrector:  # nodes l_t (new), l_s
        new = 0.5 * rate * h
        return [new, total - new]
    old = -0.5 * rate * h * h / (l_s - l_prev)  # nodes l_s, l_prev
    return [total - old, old]


@dataclass(frozen=True)
class SASolver(LinearMultistep):
    """SA-Solver predictor-corrector (ComfyUI's ``sa_solver``): ``predictor_order`` 1 to 4,
    ``corrector_order`` 0 (off) to 4, ``eta`` (tau inside the window), ``tau_window`` (fractions of the
    process's time, see the module docstring), ``s_noise``, ``simple_order_2``, ``lower_order_final``
    (diffusers' rule: the predictor of the ``k``-th last step at most order ``k``, its corrector at most
    ``k + 1``). Orders warm up from 1. 1 NFE per step.

    With ``eta = 0`` it is a deterministic predictor-corrector of order ``max(predictor_order,
    min(corrector_order, predictor_order + 1))`` in its steps (global order at most 2, the first step
    being first order); with noise, weak order 1.
    """

    predictor_order: int = 3
    corrector_order: int = 4
    eta: float = 1.0
    tau_window: tuple[float, float] = (0.2, 0.8)
    s_noise: float = 1.0
    simple_order_2: bool = False
    lower_order_final: bool = True

    name = "sa_solver"
    nfe_per_step = 1
    paper = "Xue et al. 2023, arXiv:2309.05019 (SA-Solver)"

    def __post_init__(self):
        self._require(self.predictor_order in (1, 2, 3, 4), "predictor_order", "1, 2, 3 or 4")
        self._require(self.corrector_order in (0, 1, 2, 3, 4), "corrector_order", "0 (no corrector) to 4")
        self._require_finite_nonneg("eta")
        self._require_finite_nonneg("s_noise")
        w = self.tau_window
        self._require(isinstance(w, (tuple, list)) and len(w) == 2
                      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w)
                      and 0.0 <= w[0] <= w[1] <= 1.0, "tau_window", "a pair (low, high) with 0 <= low <= high <= 1")
        self._require(isinstance(self.simple_order_2, bool), "simple_order_2", "True or False")
        self._require(isinstance(self.lower_order_final, bool), "lower_order_final", "True or False")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0 and self.s_noise > 0 and self.tau_window[1] > self.tau_window[0]

    @property
    def order(self) -> int:  # type: ignore[override]
        if self.stochastic:
            return 1
        return max(self.predictor_order, min(self.corrector_order, self.predictor_order + 1))

    @property
    def global_order(self) -> int:
        return min(self.order, 2)

    def tau(self, process, t: float) -> float:
        """The noise strength of a step that starts at time ``t``."""
        if isinstance(process, EDM):
            lo, hi = math.log(process.t_min), math.log(process.t_max)
            position = (math.log(t) - lo) / (hi - lo) if t > 0 else 0.0
        else:
            position = t / process.t_max
        low, high = self.tau_window
        return self.eta if low <= position <= high else 0.0

    def plan(self, knots: Knots):
        n, lam = len(knots), knots.lam
        into_zero = knots.sigma[n] == 0.0
        last = n - 1 if into_zero else n  # integration steps; into t = 0 the last step returns x0
        for i in range(n):
            if i == last:
                yield StepPlan(knots.t[i], 0.0, (knots.alpha[n],))
                continue
            tau = self.tau(knots.process, knots.t[i])
            h = lam[i + 1] - lam[i]
            a_t, s_t = knots.alpha[i + 1], knots.sigma[i + 1]
            decay = math.exp(-tau * tau * h) if tau > 0 else 1.0
            A = s_t / knots.sigma[i] * decay
            C = s_t * math.sqrt(-math.expm1(-2.0 * tau * tau * h)) * self.s_noise if tau > 0 else 0.0
            k_p = finite_nodes(lam, i, min(self.predictor_order, i + 1))
            k_c = finite_nodes(lam, i + 1, min(self.corrector_order, i + 2))
            if self.lower_order_final:
                k_p, k_c = min(k_p, last - i), min(k_c, last - i + 1)
            P = self._weights([lam[i - j] for j in range(k_p)], lam[i], lam[i + 1], tau, corrector=False)
            K = None
            # The corrector of a step followed by the final denoising step changes nothing but the point
            # where x0 is taken; without PECE that point is never evaluated again, so it is skipped.
            if k_c > 0 and (i + 1 < last or self.evaluate_corrected):
                w = self._weights([lam[i + 1 - j] for j in range(k_c)], lam[i], lam[i + 1], tau, corrector=True)
                K = tuple(w[1:]) + (w[0],)  # the engine takes the new estimate's weight last
            yield StepPlan(knots.t[i], A, tuple(a_t * v for v in P), C,
                           None if K is None else tuple(a_t * v for v in K))

    def _weights(self, nodes, l_s, l_t, tau, corrector):
        if self.simple_order_2 and len(nodes) == 2:
            return _simple_order_2(nodes[1] if not corrector else l_s, l_s, l_t, tau, corrector)
        return stochastic_adams_weights(nodes, l_s, l_t, tau)


@dataclass(frozen=True)
class SASolverPECE(SASolver):
    """SA-Solver in PECE mode (ComfyUI's ``sa_solver_pece``): the model is evaluated again at each
    corrected point, so the next predictor extrapolates from estimates at the corrected states.
    2 NFE per step (1 on the first)."""

    name = "sa_solver_pece"
    nfe_per_step = 2
    evaluate_corrected = True

    def __post_init__(self):
        super().__post_init__()
        self._require(self.corrector_order >= 1, "corrector_order", "1 to 4 (PECE needs a corrector)")

    @classmethod
    def run_nfe(cls, steps: int, into_zero: bool = False) -> int:
        return 2 * steps - 1
