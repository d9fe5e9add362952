"""What every inversion method shares: the result record, the method protocol and the step out of data.

An inversion runs an ordinary (decreasing) sampling grid backward, from ``grid[-1]`` (data, usually
``t = 0``) to ``grid[0]`` (noise), and records what its method needs to run it forward again:
:class:`Inversion`. A method is a small frozen object of options with ``invert`` and ``regenerate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import grids as _grids
from .._options import Options
from ..denoiser import Prediction

__all__ = ["Inversion", "InversionMethod", "first_step", "check_model", "check_x0", "decreasing", "move",
           "phi"]


@dataclass(frozen=True, eq=False)
class Inversion:
    """The result of :func:`diffsampler.inversion.invert`.

    ``x`` is the noise sample at ``grid[0]``; ``method`` the method object that made it (its options
    included); ``grid`` the sampling grid it was inverted over (float64); ``data`` what the method
    needs besides ``x`` to regenerate (BDIA's and EDICT's second state, the edit-friendly noise maps,
    POLARIS's guidance scales); ``nfe`` the network evaluations the inversion spent.
    """

    x: torch.Tensor
    method: "InversionMethod"
    grid: torch.Tensor
    data: dict = field(default_factory=dict)
    nfe: int = 0

    def __repr__(self) -> str:
        return (f"Inversion({self.method!r}, x {tuple(self.x.shape)} {self.x.dtype}, {len(self.grid) - 1} steps, "
                f"data: {', '.join(self.data) or 'none'})")


class InversionMethod(Options):
    """Base of the inversion methods: frozen dataclasses of options with ``invert`` and ``regenerate``."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""

    def invert(self, model, x0: torch.Tensor, grid, *, generator=None, **cond) -> Inversion:
        raise NotImplementedError

    def regenerate(self, model, inv: Inversion, grid, **cond) -> torch.Tensor:
        raise NotImplementedError

    def _label(self) -> str:
        return f"inversion {self.name!r}"

    def check(self, inv, grid, process) -> torch.Tensor:
        """``grid`` validated, after checking that ``inv`` was made by this method over this grid."""
        if not isinstance(inv, Inversion):
            raise TypeError(f"regenerate: inv must be the Inversion that diffsampler.invert returned, got "
                            f"{type(inv).__name__}; to sample from a plain noise tensor use ds.sample")
        if inv.method != self:
            raise ValueError(f"regenerate: inv was made by {inv.method!r}, not by {self!r}; regenerate it with the "
                             f"method that inverted it (ds.regenerate(model, inv, grid) uses inv.method)")
        g = decreasing(process, grid)
        if g.shape != inv.grid.shape or not torch.equal(g, inv.grid):
            raise ValueError(f"regenerate: grid must be the grid inv was inverted over ({len(inv.grid)} times from "
                             f"{float(inv.grid[0]):.6g} to {float(inv.grid[-1]):.6g}), got {len(g)} times from "
                             f"{float(g[0]):.6g} to {float(g[-1]):.6g}; invert again over the new grid")
        return g


def check_model(model, who: str):
    process = getattr(model, "process", None)
    if process is None or not callable(model):
        raise TypeError(f"{who}: model must be a diffsampler Denoiser or a guidance transform of one, got "
                        f"{type(model).__name__}")
    return process


def check_x0(x0, who: str) -> None:
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"{who}: x0 must be a floating-point tensor, got "
                        f"{x0.dtype if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    if x0.ndim < 1 or x0.shape[0] < 1:
        raise ValueError(f"{who}: x0 must have a batch dimension, got shape {tuple(x0.shape)}")


def decreasing(process, grid) -> torch.Tensor:
    """The ordinary sampling grid (decreasing), validated; inversion runs it backward itself."""
    return _grids.validate(process, grid)


def phi(pred: Prediction, alpha: float, sigma: float) -> torch.Tensor:
    """DDIM's map of an answer to another time: ``alpha x0_hat + sigma eps_hat`` (Song et al. 2021, eq. 12)."""
    if alpha == 0.0:
        return pred.eps * sigma
    if sigma == 0.0:
        return pred.x0 * alpha
    return pred.x0 * alpha + pred.eps * sigma


def move(process, pred: Prediction, t_to: float) -> torch.Tensor:
    """The DDIM (eta = 0) move of the point ``pred`` was evaluated at to time ``t_to`` (either direction)."""
    return phi(pred, float(process.alpha(t_to)), abs(float(process.sigma(t_to))))


def first_step(model, x0: torch.Tensor, t: float, refine: int, cond: dict) -> torch.Tensor:
    """The inversion's step out of a data point at ``t = 0`` to the grid's smallest positive time ``t``.

    No solver can step from ``t = 0``: the network is not trained there and log-SNR is infinite. Every
    sampler's last step into ``t = 0`` returns the data estimate at ``t``, ``x0 = x0_hat(x_t, t)``, so this
    step inverts that: it solves ``x = alpha x0 + sigma eps_hat(x, t)`` (the point at ``t`` whose data
    estimate is ``x0``) by fixed-point iteration from ``x = alpha x0``, ``refine`` times (one network
    evaluation each). The map's contraction is ``sigma |d eps_hat / dx|``, small at the smallest noise
    level, so one or two iterations reach it. ``refine = 1`` is diffusers' first DDIM-inversion step
    (the noise estimate at the data point and the smallest positive time); ``refine = 0`` takes the data
    point, scaled by ``alpha``, as the sample at ``t``.
    """
    process = model.process
    a, s = float(process.alpha(t)), abs(float(process.sigma(t)))
    base = x0 * a
    x = base
    for _ in range(refine):
        pred = model(x, t, **cond)
        x = base + pred.eps * s
    return x


def nfe_of(model) -> int:
    return int(getattr(model, "nfe", 0))


def finite_number(value, low: float = -math.inf, high: float = math.inf) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)

