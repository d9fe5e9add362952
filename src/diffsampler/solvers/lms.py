"""Adams-Bashforth methods in the k-diffusion coordinates: LMS and DEIS.

Both advance ``y' = y + sum_j c_j d_{i-j}`` with ``d = (y - x0_hat) / s`` the ODE
derivative in the coordinates ``y = x / ode_scale``, ``s = ode_sigma`` (for VP
and EDM, ``d`` is the noise estimate and ``s`` DEIS's ``rho``). ``c_j`` is the
integral over ``[s_i, s_{i+1}]`` of the Lagrange basis polynomial of node
``i - j`` through the last ``order`` nodes, the polynomial being in ``s`` for
k-diffusion's ``sample_lms`` (Karras et al. 2022) and in ``log s`` for DEIS's
rho-AB (Zhang & Chen 2023, arXiv:2204.13902, diffusers' ``DEISMultistepScheduler``).
The integrals are computed exactly (polynomials) or by 24-point Gauss-Legendre
quadrature (polynomial times exponential), once per grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from .base import Knots, Solver, combine
from .multistep import OrderedMultistep

__all__ = ["LMS", "DEIS", "IPNDM", "IPNDMV", "GradientEstimation", "lagrange_integrals", "log_lagrange_integrals",
           "ipndm_v_weights", "time_lagrange_integrals", "lagrange_basis",
           "AB_EQUAL_STEPS"]

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


def gauss_legendre(f, lo: float, hi: float) -> float:
    """``integral_lo^hi f`` by 24-point Gauss-Legendre quadrature (``f`` vectorised over numpy arrays);
    exact for polynomials up to degree 47, round-off for smooth integrands over a solver step."""
    mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    return float(half * np.sum(_GL_WEIGHTS * f(mid + half * _GL_NODES)))


def lagrange_integrals(nodes: list[float], lo: float, hi: float) -> list[float]:
    """``[integral_lo^hi L_j(s) ds for j]`` for the Lagrange basis through ``nodes``."""
    out = []
    for j, sj in enumerate(nodes):
        poly = np.array([1.0])
        for k, sk in enumerate(nodes):
            if k != j:
                poly = P.polymul(poly, np.array([-sk, 1.0]) / (sj - sk))
        anti = P.polyint(poly)
        out.append(float(P.polyval(hi, anti) - P.polyval(lo, anti)))
    return out


def lagrange_basis(nodes, j: int, u):
    """The ``j``-th Lagrange basis polynomial through ``nodes``, evaluated at ``u`` (a numpy array)."""
    out = np.ones_like(u)
    for k, uk in enumerate(nodes):
        if k != j:
            out = out * (u - uk) / (nodes[j] - uk)
    return out


def log_lagrange_integrals(nodes: list[float], lo: float, hi: float) -> list[float]:
    """``[integral_lo^hi L_j(log s) ds for j]`` for the Lagrange basis in ``log s`` through ``nodes``."""
    u_nodes = [np.log(v) for v in nodes]
    # in u = log s the integrand is L_j(u) e^u
    return [gauss_legendre(lambda u, j=j: np.exp(u) * lagrange_basis(u_nodes, j, u), np.log(lo), np.log(hi))
            for j in range(len(u_nodes))]


class LMSState(NamedTuple):
    t: tuple[float, ...]
    slope: tuple[tuple[float, float], ...]  # per step, d = w_x x + w_m x0 (the derivative in y = x / scale, s)
    keep_x: tuple[float, ...]               # per step, scale_{i+1} / scale_i: the weight of x_i in x_{i+1}
    coef: tuple[tuple[float, ...], ...]     # per step, weights of d_i, d_{i-1}, ... in x_{i+1}
    keep: int                               # how many past derivatives any later step reads
    history: tuple[torch.Tensor, ...]       # past derivatives, most recent first


@dataclass(frozen=True)
class _AdamsBashforth(Solver):
    """Base of LMS and DEIS: the weights ``c_j`` once per grid, then ``y' = y + sum_j c_j d_{i-j}``."""

    nfe_per_step = 1

    def _orders(self, knots: Knots) -> list[int]:
        raise NotImplementedError

    @staticmethod
    def _warm_up(knots: Knots, order: int) -> list[int]:
        """Orders 1, 2, ... up to ``order``: each step uses the derivatives computed so far."""
        return [min(i + 1, order) for i in range(len(knots))]

    def _weights(self, nodes: list[float], lo: float, hi: float) -> list[float]:
        raise NotImplementedError

    def _step_weights(self, knots: Knots, i: int, k: int) -> list[float]:
        """Weights of ``d_i, ..., d_{i-k+1}`` over step ``i``: by default Lagrange in ``s`` through the last
        ``k`` knots."""
        return self._weights([knots.s[i - j] for j in range(k)], knots.s[i], knots.s[i + 1])

    def init(self, knots: Knots, x) -> LMSState:
        # y' = y + sum_j c_j d_{i-j} with y = x / scale and d = dy/ds = (y - x0) / s, written for x itself
        n = len(knots)
        coef = [self._step_weights(knots, i, k) for i, k in enumerate(self._orders(knots))]
        return LMSState(knots.t, tuple((1.0 / (knots.scale[i] * knots.s[i]), -1.0 / knots.s[i]) for i in range(n)),
                        tuple(knots.scale[i + 1] / knots.scale[i] for i in range(n)),
                        tuple(tuple(knots.scale[i + 1] * c for c in coef[i]) for i in range(n)),
                        max(len(c) for c in coef) - 1, ())

    def step(self, model, x, i, state, noise):
        w_x, w_m = state.slope[i]
        history = (combine(x, w_x, ((w_m, model(x, state.t[i])),)),) + state.history
        out = combine(x, state.keep_x[i], tuple(zip(state.coef[i], history)))
        return out, LMSState(state.t, state.slope, state.keep_x, state.coef, state.keep, history[:state.keep])


@dataclass(frozen=True)
class LMS(_AdamsBashforth):
    """k-diffusion's linear multistep method of ``lms_order`` 1 to 4 (warm-up from order 1).

    ``order`` is ``lms_order``, the order of its steps; the first-order first step
    caps the global order at 2 (measured slopes 3.1 to 3.8 at practical step counts
    for order 4). 1 NFE per step.
    """

    lms_order: int = 4

    name = "lms"
    paper = "Karras et al. 2022 / k-diffusion (Adams-Bashforth in sigma)"

    def __post_init__(self):
        self._require(self.lms_order in (1, 2, 3, 4), "lms_order", "1, 2, 3 or 4")

    @property
    def order(self) -> int:  # type: ignore[override]
        return self.lms_order

    @property
    def global_order(self) -> int:
        return min(self.lms_order, 2)

    def _orders(self, knots):
        return self._warm_up(knots, self.lms_order)

    def _weights(self, nodes, lo, hi):
        return lagrange_integrals(nodes, lo, hi)


@dataclass(frozen=True)
class DEIS(OrderedMultistep, _AdamsBashforth):
    """DEIS's Adams-Bashforth exponential integrators (Zhang & Chen 2023, arXiv:2204.13902),
    ``solver_order`` 1 to 3.

    The noise estimate is extrapolated by a polynomial through the last ``solver_order``
    estimates and integrated exactly against ``d rho`` (``rho = ode_sigma``); ``deis_mode`` picks the
    variable of the polynomial:

    * ``"logrho"`` (default): ``log rho``, diffusers' ``DEISMultistepScheduler`` (``solver_type="logrho"``);
    * ``"rhoab"``: ``rho``, the paper's rho-AB (the weights of k-diffusion's ``sample_lms``);
    * ``"tab"``: the process time ``t``, the paper's t-AB. ComfyUI's ``deis`` (mode ``"tab"``) maps
      every model onto one VP-linear time and integrates with a 10,000-point Riemann sum; we use the
      model's own process time and 24-point Gauss-Legendre quadrature in ``rho``.

    Order 1 is DDIM in every mode. With ``lower_order_final`` the last steps drop order on grids of
    fewer than 15 steps (diffusers' rule). ``order`` is ``solver_order``; the global order is at most
    2 (first-order first step). 1 NFE per step.
    """

    deis_mode: str = "logrho"

    name = "deis"
    paper = "Zhang & Chen 2023, arXiv:2204.13902"

    def __post_init__(self):
        super().__post_init__()
        self._require(self.deis_mode in ("logrho", "rhoab", "tab"), "deis_mode", '"logrho", "rhoab" or "tab"')

    def _orders(self, knots):
        return self.step_orders(knots)

    def _step_weights(self, knots, i, k):
        lo, hi = knots.s[i], knots.s[i + 1]
        if k == 1:  # every mode's first-order step is DDIM (the Euler step in rho)
            return [hi - lo]
        if self.deis_mode == "rhoab":
            return lagrange_integrals([knots.s[i - j] for j in range(k)], lo, hi)
        if self.deis_mode == "tab":
            return time_lagrange_integrals(knots.process, [knots.t[i - j] for j in range(k)], lo, hi)
        if hi == 0.0:  # log rho is unbounded into t = 0: take the Euler step, which returns the data estimate
            return [-lo]
        return log_lagrange_integrals([knots.s[i - j] for j in range(k)], lo, hi)


def time_lagrange_integrals(process, t_nodes: list[float], lo: float, hi: float) -> list[float]:
    """``[integral_lo^hi L_j(t(rho)) d rho for j]``: the Lagrange basis in process time through ``t_nodes``,
    integrated in ``rho = ode_sigma`` (DEIS's t-AB weights)."""

    def time_of(rho):
        return process.t_of_ode_sigma(torch.as_tensor(rho, dtype=torch.float64)).numpy()

    return [gauss_legendre(lambda rho, j=j: lagrange_basis(t_nodes, j, time_of(rho)), lo, hi)
            for j in range(len(t_nodes))]


# Adams-Bashforth weights for equal steps, of d_i, d_{i-1}, ... (orders 1 to 4).
AB_EQUAL_STEPS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm_v_weights(nodes: list[float], lo: float, hi: float) -> list[float]:
    """The variable-step weights of iPNDM-v (Zhang & Chen's iPNDM with step-ratio corrections, as shipped
    in zju-pi's diff-solvers and ComfyUI), times the step ``hi - lo``.

    ``nodes`` are ``s_i, s_{i-1}, ...`` (most recent first). Orders 1 and 2 are the exact
    variable-step Adams-Bashforth weights; the order 3 and 4 corrections are built from the
    step ratios ``h_i / h_{i-1}``, ... and differ from the exact Lagrange integrals (LMS) on
    uneven grids. As shipped, the order-4 weights are third order even on equal steps
    ((57, -65, 43, -11) / 24 instead of (55, -59, 37, -9) / 24) and sum to the step only on
    geometric step sequences; we keep them, since ``ipndm_v`` names that method (see the tests).
    """
    k = len(nodes)
    h = hi - lo
    if k == 1:
        return [h]
    back = [nodes[j] - nodes[j + 1] for j in range(k - 1)]  # h_{i-1}, h_{i-2}, ... (previous steps)
    r = h / back[0]
    first = [1 + r / 2, -r / 2]
    if k == 2:
        return [h * c for c in first]
    h1, h2 = back[0], back[1]
    a = (1 - h / (3 * (h + h1)) * h * (h + h1) / (h1 * (h1 + h2))) / 2
    third = [a, -(1 + h1 / h2) * a, a * h1 / h2]
    coef = [first[0] + third[0], first[1] + third[1], third[2]]
    if k == 3:
        return [h * c for c in coef]
    h3 = back[2]
    ratio = h1 * (h1 + h2) / (h2 * (h2 + h3))
    b = ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))) \
        * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    fourth = [b, -(1 + h1 / h2 + ratio) * b, (h1 / h2 + ratio * (1 + h2 / h3)) * b, -b * ratio * h1 / h2]
    return [h * (c + f) for c, f in zip(coef + [0.0], fourth)]


@dataclass(frozen=True)
class IPNDM(_AdamsBashforth):
    """iPNDM (Zhang & Chen 2023, arXiv:2204.13902, "improved PNDM"): Adams-Bashforth in sigma with the
    equal-step weights of ``max_order`` 1 to 4 whatever the grid, warming up from order 1
    (ComfyUI's ``ipndm``). Into ``t = 0`` it returns the data estimate.

    ``order`` is ``max_order``, the order of its steps on equal steps in sigma. Equal-step weights on an
    uneven grid lose a factor of the step change per step: on grids from a smooth spacing (Karras,
    log-SNR) the steps are second order, and so is the run (the first-order first step caps it at 2
    anyway). 1 NFE per step.
    """

    max_order: int = 4

    name = "ipndm"
    paper = "Zhang & Chen 2023, arXiv:2204.13902 (iPNDM; ComfyUI's form)"

    def __post_init__(self):
        self._require(self.max_order in (1, 2, 3, 4), "max_order", "1, 2, 3 or 4")

    @property
    def order(self) -> int:  # type: ignore[override]
        return self.max_order

    @property
    def global_order(self) -> int:
        return min(self.max_order, 2)

    def _orders(self, knots):
        return self._warm_up(knots, self.max_order)

    def _weights(self, nodes, lo, hi):
        if hi == 0.0:  # the denoising step: y' = y - s d = x0_hat
            return [-lo]
        return [(hi - lo) * c for c in AB_EQUAL_STEPS[len(nodes)]]


@dataclass(frozen=True)
class IPNDMV(IPNDM):
    """iPNDM-v: iPNDM with variable-step weights (ComfyUI's ``ipndm_v``, from zju-pi's diff-solvers),
    see :func:`ipndm_v_weights`. 1 NFE per step.

    ``order`` is ``min(max_order, 3)``: the order-4 weights as shipped are third order (they integrate
    cubics wrongly), so its steps are third order on equal and geometric steps in sigma (log-SNR grids of
    VP and EDM; measured 2.9 to 3.2). On other uneven grids (Karras) those weights are consistent only up
    to a relative O(h^2), and its steps are second order at best. Globally second order, as iPNDM.
    """

    name = "ipndm_v"
    paper = "Zhang & Chen 2023, arXiv:2204.13902 (iPNDM, variable step; zju-pi diff-solvers' form)"

    @property
    def order(self) -> int:  # type: ignore[override]
        return min(self.max_order, 3)

    def _weights(self, nodes, lo, hi):
        if hi == 0.0:
            return [-lo]
        return ipndm_v_weights(nodes, lo, hi)


@dataclass(frozen=True)
class GradientEstimation(_AdamsBashforth):
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and Improving Diffusion Models from an
    Optimization Perspective", arXiv:2306.04848; ComfyUI's ``gradient_estimation``): Euler in sigma with
    the derivative extrapolated as ``ge_gamma d_i + (1 - ge_gamma) d_{i-1}`` (first step plain Euler; the
    step into ``t = 0`` returns the data estimate, as ComfyUI's does).

    The default ``ge_gamma = 2`` over-extrapolates on purpose (it is not Adams-Bashforth's 3/2): the method
    is first order, and reaches that slope only beyond ~200 steps (measured local slopes 0.5-0.8 at 16-64
    steps, 0.93-0.96 at 256-512). 1 NFE per step.
    """

    ge_gamma: float = 2.0

    name = "gradient_estimation"
    order = 1
    paper = "Permenter & Yuan 2024, arXiv:2306.04848 (ComfyUI's form)"

    def __post_init__(self):
        self._require(isinstance(self.ge_gamma, (int, float)) and math.isfinite(self.ge_gamma), "ge_gamma",
                      "a finite number")

    def _orders(self, knots):
        return self._warm_up(knots, 2)

    def _weights(self, nodes, lo, hi):
        h = hi - lo
        if hi == 0.0 or len(nodes) == 1:  # into t = 0 the step returns the data estimate, as ComfyUI's does
            return [h]
        return [self.ge_gamma * h, (1.0 - self.ge_gamma) * h]
