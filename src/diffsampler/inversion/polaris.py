"""POLARIS: a step-wise guidance scale computed during DDIM inversion, replayed in regeneration.

Chen et al. 2025 ("POLARIS", authors' code Chatonz/POLARIS). DDIM inversion under classifier-free
guidance assumes the guided noise estimate is constant over each step; that assumption is what breaks
its reconstruction. With the unconditional and conditional noise estimates of two consecutive
inversion steps, ``du = eps_u(t) - eps_u(t_prev)`` and ``dc = eps_c(t) - eps_c(t_prev)``, the scale

    omega = (|du|^2 - <du, dc>) / |du - dc|^2,   clamped to [0, 15],

minimises ``|(1 - omega) du + omega dc|^2``, the change of the guided estimate across the step. It is
computed per sample (a sample's scale does not depend on its batch), it is 1 at the first step (no
previous estimate; also on the step out of ``t = 0``, which takes the conditional model), and the
inversion records it. Regeneration replays it: ``replay="reversed"`` gives each interval the scale its
own inversion step computed (the authors' ``score_flow.py``), ``"forward"`` the order their ``ddim.py``
demo uses (the first regeneration step gets the first inversion step's scale, which looks like a bug
there; kept as an option to compare). Their editing pipeline does not use the scales (fixed CFG 7.5):
to edit, sample forward from ``inv.x`` with the model you want.

The model given may be ``ds.guidance.cfg(model, w)`` (its scale is ignored: POLARIS chooses its own,
its ``uncond`` is used) or a conditional Denoiser that knows its null condition. The noise estimate
is ``eps`` for diffusion and flow models alike (the authors' flow variant uses velocity; here every
model answers eps, so one rule serves both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..denoiser import Prediction, _broadcast
from ..guidance.cfg import batch_calls, cfg, null_condition
from .base import Inversion, InversionMethod, finite_number, first_step, move, nfe_of

__all__ = ["polaris"]

REPLAYS = ("reversed", "forward")


def _inner(model):
    """The model to evaluate twice (conditional and unconditional) and the unconditional keywords."""
    if isinstance(model, cfg):
        return model.model, model.uncond
    return model, None


class _Scaled:
    """The guided model with one scale per sample at one step (a Denoiser's call and process)."""

    def __init__(self, model, uncond, omega):
        self.model, self.uncond, self.omega = model, uncond, omega
        self.process = model.process

    def __call__(self, x, t, **cond):
        return _guided(self.model, self.uncond, x, t, cond, self.omega)[0]


def _guided(model, uncond, x, t, cond, omega):
    """``(guided answer, eps_c, eps_u)`` at ``(x, t)`` with per-sample scale ``omega`` (None: the conditional)."""
    if omega is None:
        c = model(x, t, **cond)
        return c, c.eps, None
    c, u = batch_calls(model, x, t, [cond, null_condition(model, cond, uncond)])
    w = _broadcast(omega, x)
    return Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps)), c.eps, u.eps


@dataclass(frozen=True)
class polaris(InversionMethod):  # noqa: N801 - used like a function
    """POLARIS DDIM inversion; ``clamp`` bounds the scale, ``replay`` its order in regeneration."""

    replay: str = "reversed"
    clamp: tuple = (0.0, 15.0)
    refine: int = 2

    name = "polaris"
    paper = "POLARIS (Chatonz/POLARIS): step-wise guidance scale for DDIM inversion"

    def __post_init__(self):
        self._require(self.replay in REPLAYS, "replay", " or ".join(map(repr, REPLAYS)))
        ok = (isinstance(self.clamp, (tuple, list)) and len(self.clamp) == 2 and all(map(finite_number, self.clamp))
              and self.clamp[0] <= self.clamp[1])
        self._require(ok, "clamp", "(low, high) finite numbers with low <= high")
        object.__setattr__(self, "clamp", (float(self.clamp[0]), float(self.clamp[1])))
        self._require(isinstance(self.refine, int) and not isinstance(self.refine, bool) and self.refine >= 0,
                      "refine", "an integer >= 0")

    def invert(self, model, x0, grid, *, generator=None, **cond) -> Inversion:
        inner, uncond = _inner(model)
        process = model.process
        t = grid.tolist()
        n = len(t) - 1
        before = nfe_of(model)
        ones = torch.ones(x0.shape[0], dtype=torch.float64)
        omegas = [None] * n          # per interval k (t_k -> t_{k+1}), as regeneration reads them
        x, last = x0, n
        if t[-1] == 0.0:             # out of t = 0: the conditional model (omega = 1)
            x = first_step(inner, x0, t[-2], self.refine, cond)
            omegas[n - 1] = ones
            last = n - 1
        prev = None
        for k in range(last - 1, -1, -1):   # interval k: from t_{k+1} up to t_k
            c, u = batch_calls(inner, x, t[k + 1], [cond, null_condition(inner, cond, uncond)])
            ec, eu = c.eps, u.eps
            if prev is None:
                omega = ones
            else:
                du, dc = (eu - prev[1]).flatten(1), (ec - prev[0]).flatten(1)
                num = (du * du).sum(1) - (du * dc).sum(1)
                den = ((du - dc) ** 2).sum(1)
                omega = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))
                omega = omega.to(torch.float64).cpu().clamp(*self.clamp)
            w = _broadcast(omega, x)
            pred = Prediction(u.x0 + w * (c.x0 - u.x0), eu + w * (ec - eu))
            x = move(process, pred, t[k])
            omegas[k] = omega
            prev = (ec, eu)
        table = torch.stack(omegas)           # (steps, batch), interval order
        return Inversion(x, self, grid, {"omega": table}, nfe_of(model) - before)

    def regenerate(self, model, inv, grid, **cond) -> torch.Tensor:
        g = self.check(inv, grid, model.process)
        inner, uncond = _inner(model)
        t = g.tolist()
        n = len(t) - 1
        table = inv.data["omega"]
        if self.replay == "forward":          # generation step k takes inversion step k's scale
            table = table.flip(0)
        x = inv.x
        for k in range(n):
            omega = table[k]
            plain = t[-1] == 0.0 and k == n - 1 and self.replay == "reversed"
            pred = _guided(inner, uncond, x, t[k], cond, None if plain else omega)[0]
            x = move(model.process, pred, t[k + 1])
        return x


