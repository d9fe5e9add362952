"""BDIA: bi-directional integration approximation, exact diffusion inversion.

Zhang, Lewis & Kleijn 2024, "Exact diffusion inversion via bi-directional integration approximation"
(ECCV 2024, arXiv:2307.10829). With DDIM's map ``Phi(z; t_k -> t_j) = alpha_j x0_hat(z) + sigma_j eps_hat(z)``
(the answer at ``(z, t_k)``), a sampling step over the grid ``t_0 > t_1 > ... > t_N`` is

    z_{k+1} = gamma [z_{k-1} - Phi(z_k; t_k -> t_{k-1})] + Phi(z_k; t_k -> t_{k+1}),   k >= 1,

one network evaluation per step, and it is solved exactly for ``z_{k-1}``:

    z_{k-1} = (z_{k+1} - Phi(z_k; t_k -> t_{k+1})) / gamma + Phi(z_k; t_k -> t_{k-1}),

at the same evaluation points, so the inversion is exact up to rounding whatever the network
computes. The state is the pair ``(z_0, z_1)``; the first inversion step (data to ``t_{N-1}``) is plain
DDIM, and generation from an inverted pair runs BDIA from its first step (it never recomputes ``z_1``
from ``z_0``; the authors' code: fresh sampling takes one DDIM step first, an inverted pair none).

Each inverse step divides the previous error by ``gamma``: rounding grows like ``gamma^(-N/2)``, so
``gamma = 1`` (the authors' Stable Diffusion script; 0.5 in their editing script) keeps float32
usable and smaller ``gamma`` wants float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Inversion, InversionMethod, finite_number, first_step, move, nfe_of, phi

__all__ = ["bdia"]


@dataclass(frozen=True)
class bdia(InversionMethod):  # noqa: N801 - used like a function
    """BDIA with ``gamma`` in (0, 1] (0 would be DDIM, not invertible); ``refine`` as for the
    DDIM-style first step out of ``t = 0``."""

    gamma: float = 1.0
    refine: int = 2

    name = "bdia"
    paper = "Zhang, Lewis & Kleijn 2024, arXiv:2307.10829"

    def __post_init__(self):
        self._require(finite_number(self.gamma) and 0 < self.gamma <= 1, "gamma", "a number in (0, 1]")
        self._require(isinstance(self.refine, int) and not isinstance(self.refine, bool) and self.refine >= 0,
                      "refine", "an integer >= 0")

    def _knots(self, process, grid):
        t = grid.tolist()
        if len(t) < 3:
            raise ValueError(f"inversion 'bdia': the grid needs at least 2 steps (BDIA's state is a pair of "
                             f"consecutive samples), got {len(t) - 1}")
        return t, [float(process.alpha(v)) for v in t], [abs(float(process.sigma(v))) for v in t]

    def invert(self, model, x0, grid, *, generator=None, **cond) -> Inversion:
        process = model.process
        t, a, s = self._knots(process, grid)
        n = len(t) - 1
        before = nfe_of(model)
        # plain DDIM for the first inversion step
        if t[-1] == 0.0:
            z_prev = first_step(model, x0, t[-2], self.refine, cond)
        else:
            z_prev = move(process, model(x0, t[-1], **cond), t[-2])
        z_next = x0                               # z_{k+1}, z_k with k = N - 1
        z = z_prev
        for k in range(n - 1, 0, -1):
            pred = model(z, t[k], **cond)
            z_back = (z_next - phi(pred, a[k + 1], s[k + 1])) / self.gamma + phi(pred, a[k - 1], s[k - 1])
            z_next, z = z, z_back
        # z = z_0, z_next = z_1
        return Inversion(z, self, grid, {"next": z_next}, nfe_of(model) - before)

    def regenerate(self, model, inv, grid, **cond) -> torch.Tensor:
        g = self.check(inv, grid, model.process)
        t, a, s = self._knots(model.process, g)
        z_prev, z = inv.x, inv.data["next"]
        for k in range(1, len(t) - 1):
            pred = model(z, t[k], **cond)
            z_new = (z_prev - phi(pred, a[k - 1], s[k - 1])) * self.gamma + phi(pred, a[k + 1], s[k + 1])
            z_prev, z = z, z_new
        return z
