"""EDICT: exact inversion with two coupled DDIM chains.

Wallace, Gokul & Naik 2023, "EDICT: Exact Diffusion Inversion via Coupled Transformations" (CVPR 2023,
arXiv:2211.12446). The state is a pair ``(x, y)``, both ``x_T`` when sampling from noise and both the
image when inverting. A step from ``t_k`` to ``t_{k+1}`` with DDIM's coefficients ``a, b``
(``x' = a x + b eps_hat``: ``a = alpha_{k+1} / alpha_k``, ``b = sigma_{k+1} - a sigma_k``) is

    x' = a x + b eps(y, t_k),      y' = a y + b eps(x', t_k),
    x'' = p x' + (1 - p) y',       y'' = p y' + (1 - p) x'',

and each line is solved exactly for its left input, so the inverse evaluates the network at the same
points (exact up to rounding). With ``leapfrog`` the chains swap roles on odd steps (the authors' code).
From ``alpha_k = 0`` (a flow's ``t = 1``) the coupling is written on the data estimate instead
(``x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0_hat(y)``), which is as invertible.

The inverse mixing divides by ``p`` twice a step, so rounding grows like ``p^(-2N)``: the authors run
everything in float64, and so should you (their float32 drift is measured in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..solvers.expint import data_move, noise_move
from .base import Inversion, InversionMethod, finite_number, nfe_of

__all__ = ["edict"]


@dataclass(frozen=True)
class edict(InversionMethod):  # noqa: N801 - used like a function
    """EDICT with mixing ``p`` in (0, 1] (the paper's 0.93) and ``leapfrog`` alternation."""

    p: float = 0.93
    leapfrog: bool = True

    name = "edict"
    paper = "Wallace, Gokul & Naik 2023, arXiv:2211.12446"

    def __post_init__(self):
        self._require(finite_number(self.p) and 0 < self.p <= 1, "p", "a number in (0, 1]")
        self._require(isinstance(self.leapfrog, bool), "leapfrog", "True or False")

    @staticmethod
    def _steps(process, grid):
        """Per step ``(t_k, A, B, kind)`` with ``x' = A x + B estimate_kind``."""
        t = grid.tolist()
        out = []
        for k in range(len(t) - 1):
            a0, s0 = float(process.alpha(t[k])), abs(float(process.sigma(t[k])))
            a1, s1 = float(process.alpha(t[k + 1])), abs(float(process.sigma(t[k + 1])))
            if a0 > 0:
                A, B = noise_move(a0, s0, a1, s1)
                out.append((t[k], A, B, "eps"))
            else:
                A, B = data_move(a0, s0, a1, s1)
                out.append((t[k], A, B, "x0"))
        return out

    def invert(self, model, x0, grid, *, generator=None, **cond) -> Inversion:
        steps = self._steps(model.process, grid)
        before = nfe_of(model)
        p, q = self.p, 1.0 - self.p
        x, y = x0, x0
        for k in range(len(steps) - 1, -1, -1):
            t, A, B, kind = steps[k]
            swap = self.leapfrog and k % 2 == 1
            if swap:
                x, y = y, x
            y1 = (y - x * q) / p
            x1 = (x - y1 * q) / p
            y = (y1 - _est(model(x1, t, **cond), kind) * B) / A
            x = (x1 - _est(model(y, t, **cond), kind) * B) / A
            if swap:
                x, y = y, x
        return Inversion(x, self, grid, {"y": y}, nfe_of(model) - before)

    def regenerate(self, model, inv, grid, **cond) -> torch.Tensor:
        g = self.check(inv, grid, model.process)
        steps = self._steps(model.process, g)
        p, q = self.p, 1.0 - self.p
        x, y = inv.x, inv.data["y"]
        for k, (t, A, B, kind) in enumerate(steps):
            swap = self.leapfrog and k % 2 == 1
            if swap:
                x, y = y, x
            x1 = x * A + _est(model(y, t, **cond), kind) * B
            y1 = y * A + _est(model(x1, t, **cond), kind) * B
            x = x1 * p + y1 * q
            y = y1 * p + x * q
            if swap:
                x, y = y, x
        return x


def _est(pred, kind: str) -> torch.Tensor:
    return pred.eps if kind == "eps" else pred.x0
