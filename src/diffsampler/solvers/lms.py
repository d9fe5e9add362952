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

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from .base import Knots, Solver
from .multistep import OrderedMultistep

__all__ = ["LMS", "DEIS", "lagrange_integrals", "log_lagrange_integrals"]

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


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


def log_lagrange_integrals(nodes: list[float], lo: float, hi: float) -> list[float]:
    """``[integral_lo^hi L_j(log s) ds for j]`` for the Lagrange basis in ``log s`` through ``nodes``."""
    u_nodes = [np.log(v) for v in nodes]
    a, b = np.log(lo), np.log(hi)
    u = 0.5 * (b - a) * _GL_NODES + 0.5 * (a + b)
    out = []
    for j, uj in enumerate(u_nodes):
        basis = np.ones_like(u)
        for k, uk in enumerate(u_nodes):
            if k != j:
                basis *= (u - uk) / (uj - uk)
        out.append(float(0.5 * (b - a) * np.sum(_GL_WEIGHTS * basis * np.exp(u))))
    return out


class LMSState(NamedTuple):
    t: tuple[float, ...]
    scale: tuple[float, ...]
    s: tuple[float, ...]
    coef: tuple[tuple[float, ...], ...]     # per step, weights of d_i, d_{i-1}, ...
    keep: int                               # how many past derivatives any later step reads
    history: tuple[torch.Tensor, ...]       # past derivatives, most recent first


@dataclass(frozen=True)
class _AdamsBashforth(Solver):
    """Base of LMS and DEIS: the weights ``c_j`` once per grid, then ``y' = y + sum_j c_j d_{i-j}``."""

    nfe_per_step = 1

    def _orders(self, knots: Knots) -> list[int]:
        raise NotImplementedError

    def _weights(self, nodes: list[float], lo: float, hi: float) -> list[float]:
        raise NotImplementedError

    def init(self, knots: Knots, x) -> LMSState:
        coef = []
        for i, k in enumerate(self._orders(knots)):
            nodes = [knots.s[i - j] for j in range(k)]
            coef.append(tuple(self._weights(nodes, knots.s[i], knots.s[i + 1])))
        return LMSState(knots.t, knots.scale, knots.s, tuple(coef), max(len(c) for c in coef) - 1, ())

    def step(self, model, x, i, state, noise):
        y = x / state.scale[i]
        d = (y - model(x, state.t[i]).x0) / state.s[i]
        history = (d,) + state.history
        for c, d_j in zip(state.coef[i], history):
            y = y.add(d_j, alpha=c)
        return y * state.scale[i + 1], state._replace(history=history[: state.keep])


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
        return [min(i + 1, self.lms_order) for i in range(len(knots))]

    def _weights(self, nodes, lo, hi):
        return lagrange_integrals(nodes, lo, hi)


@dataclass(frozen=True)
class DEIS(OrderedMultistep, _AdamsBashforth):
    """DEIS rho-AB in log rho (diffusers' ``DEISMultistepScheduler``), ``solver_order`` 1 to 3.

    Order 1 is DDIM. With ``lower_order_final`` the last steps drop order on grids
    of fewer than 15 steps (diffusers' rule). ``order`` is ``solver_order``; the
    global order is at most 2 (first-order first step). 1 NFE per step.
    """

    name = "deis"
    paper = "Zhang & Chen 2023, arXiv:2204.13902"

    def _orders(self, knots):
        return self.step_orders(knots)

    def _weights(self, nodes, lo, hi):
        if hi == 0.0:  # log s is unbounded into t = 0: take the Euler step, which returns the data estimate
            return [-lo]
        return log_lagrange_integrals(nodes, lo, hi)

