"""Inversion and editing: run a sampling grid backward from data to noise, and forward again.

    inv = ds.invert(model, x0, grid, "dpmpp_2m", label=y)          # DDIM-style, any deterministic solver
    inv = ds.invert(model, x0, grid, ds.inversion.edict(p=0.93))   # exact: also "bdia"
    x = ds.regenerate(ds.guidance.cfg(model, 3.0), inv, grid, label=other)   # edit

``grid`` is the ordinary decreasing sampling grid (ending at ``t = 0`` by default); the inversion runs
it from ``grid[-1]`` to ``grid[0]`` and ``inv.x`` is the noise at ``grid[0]``. Methods:

* a deterministic registered solver's name or object: DDIM-style inversion (:mod:`.ddim`), the solver
  itself stepping backward; the round trip is exact in the limit, its error falls at the solver's order;
* ``"bdia"`` (:class:`bdia`, Zhang et al. 2024) and ``"edict"`` (:class:`edict`, Wallace et al. 2023):
  exact inversions, the round trip exact up to rounding (run them in float64);
* ``"edit_friendly"`` (:class:`edit_friendly`, Huberman-Spiegelglas et al. 2024): DDPM noise maps that
  reproduce the image exactly with the same model and condition; draws from ``generator``;
* ``"polaris"`` (:class:`polaris`): DDIM inversion under CFG with a step-wise scale, replayed.

Options go on the method object (``ds.inversion.bdia(gamma=0.5)``); keywords of ``invert`` and
``regenerate`` are conditioning passed to the network. Both run without an autograd graph.
Image-to-image helpers: :func:`noise_to` (forward noising with keyed per-sample noise) and
:func:`strength_grid` (diffusers' ``strength`` as a grid slice).
"""

from __future__ import annotations

import torch

from .. import solvers as _solvers
from ..noise import standard_normal
from .base import Inversion, InversionMethod, check_model, check_x0, decreasing, first_step
from .bdia import bdia
from .ddim import deterministic_names, solver_inversion
from .edict import edict
from .edit_friendly import edit_friendly
from .polaris import polaris

__all__ = ["invert", "regenerate", "noise_to", "strength_grid", "resolve", "Inversion", "InversionMethod",
           "bdia", "edict", "edit_friendly", "polaris", "solver_inversion", "first_step", "METHODS"]

#: The named inversion methods besides the solvers (DDIM-style inversion).
METHODS = {"bdia": bdia, "edict": edict, "edit_friendly": edit_friendly, "polaris": polaris}


def resolve(method) -> InversionMethod:
    """An inversion method object from a name, a solver (name or object) or a method object."""
    if isinstance(method, InversionMethod):
        return method
    if isinstance(method, str):
        if method in METHODS:
            return METHODS[method]()
        if method in _solvers.REGISTRY or method in _solvers.ALIASES:
            return solver_inversion(method)
        raise ValueError(f"invert: unknown method {method!r}; allowed: {', '.join(METHODS)}, or a deterministic "
                         f"solver ({', '.join(deterministic_names())}), or a method object "
                         f"(ds.inversion.edict(p=0.93))")
    if isinstance(method, _solvers.Solver):
        return solver_inversion(method)
    raise TypeError(f"invert: method must be a name ({', '.join(METHODS)} or a solver's), a Solver or an "
                    f"inversion method object, got {type(method).__name__}")


def _refuse_options(method, cond: dict, who: str) -> None:
    """A keyword that is an option of the named method was meant for the method, not the network."""
    if not isinstance(method, str) or not cond:
        return
    cls = METHODS.get(method)
    options = cls.options() if cls is not None else (
        _solvers.REGISTRY[method].options() if method in _solvers.REGISTRY else [])
    clash = sorted(set(cond) & set(options))
    if clash:
        given = ", ".join(f"{k}={cond[k]!r}" for k in clash)
        maker = f"ds.inversion.{method}({given})" if cls is not None else f"ds.solvers.get({method!r}, {given})"
        raise ValueError(f"{who}: {', '.join(clash)} is an option of method {method!r}, but keywords of {who}() are "
                         f"conditioning passed to the network; pass the method with its options: {maker}")


def invert(model, x0: torch.Tensor, grid, method="ddim", *, generator: torch.Generator | None = None,
           **cond) -> Inversion:
    """Invert ``x0`` (data at ``grid[-1]``) to the noise at ``grid[0]`` with ``method``.

    ``model`` is a Denoiser or a guidance transform of one (``ds.guidance.cfg(model, w)``); ``grid`` the
    decreasing sampling grid; ``method`` a deterministic solver (name or object), ``"bdia"``, ``"edict"``,
    ``"edit_friendly"``, ``"polaris"``, or such a method's object with options. ``generator`` is the
    source of the random draws of ``edit_friendly`` (the others draw nothing). ``**cond`` is the
    conditioning passed to the network. Returns an :class:`Inversion` (``inv.x`` the noise sample).
    """
    process = check_model(model, "invert")
    check_x0(x0, "invert")
    _refuse_options(method, cond, "invert")
    m = resolve(method)
    g = decreasing(process, grid)
    with torch.no_grad():
        return m.invert(model, x0, g, generator=generator, **cond)


def regenerate(model, inv: Inversion, grid, **cond) -> torch.Tensor:
    """Run ``inv`` forward over ``grid`` (the grid it was inverted over) to data, with ``model`` and
    ``**cond``: the same ones reconstruct, others edit."""
    check_model(model, "regenerate")
    if not isinstance(inv, Inversion):
        raise TypeError(f"regenerate: inv must be the Inversion that diffsampler.invert returned, got "
                        f"{type(inv).__name__}; to sample from a plain noise tensor use ds.sample")
    with torch.no_grad():
        return inv.method.regenerate(model, inv, grid, **cond)


def noise_to(process, x0: torch.Tensor, t, generator: torch.Generator | None = None) -> torch.Tensor:
    """``alpha(t) x0 + sigma(t) eps``: ``x0`` noised to time ``t`` (a float, or one time per sample).

    ``eps`` is the library's keyed per-sample noise (:func:`~diffsampler.noise.standard_normal`), so a
    sample's noise does not depend on its batch. Image-to-image starts here: ``ds.sample(model,
    noise_to(process, x0, grid[0], g), grid, solver)`` with ``grid = strength_grid(full_grid, 0.8)``.
    """
    check_x0(x0, "noise_to")
    tt = torch.as_tensor(t, dtype=torch.float64)
    if tt.ndim > 1 or (tt.ndim == 1 and tt.shape[0] != x0.shape[0]):
        raise ValueError(f"noise_to: t must be one time or one per sample ({x0.shape[0]}), got shape "
                         f"{tuple(tt.shape)}")
    lo, hi = 0.0, process.t_max
    if bool(((tt < lo) | (tt > hi) | ~torch.isfinite(tt)).any()):
        raise ValueError(f"noise_to: t must lie in [0, {hi}] for {process!r}, got {t!r}")
    eps = standard_normal(x0.shape, generator, dtype=x0.dtype, device=x0.device)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a = process.alpha(tt).to(x0.dtype).to(x0.device).reshape(shape if tt.ndim else ())
    s = process.sigma(tt).abs().to(x0.dtype).to(x0.device).reshape(shape if tt.ndim else ())
    return x0 * a + eps * s


def strength_grid(grid, strength: float) -> torch.Tensor:
    """The tail of ``grid`` that diffusers' image-to-image ``strength`` runs: ``grid[k:]``.

    diffusers takes ``int(steps * strength)`` of the ``steps`` steps, the last ones (``t_start = steps -
    int(steps * strength)``); ``strength = 1`` is the whole grid. The sample to start from is the image
    noised to the slice's first time (:func:`noise_to`) or inverted to it (:func:`invert` over the slice).
    """
    g = torch.as_tensor(grid, dtype=torch.float64)
    if g.ndim != 1 or g.numel() < 2:
        raise ValueError(f"strength_grid: grid must be 1-D with at least 2 times, got shape {tuple(g.shape)}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength_grid: strength must be a number in (0, 1], got {strength!r}")
    steps = g.numel() - 1
    init = min(int(steps * strength), steps)
    if init < 1:
        raise ValueError(f"strength_grid: strength {strength} of {steps} steps leaves no step "
                         f"(int({steps} * {strength}) = 0); allowed: strength >= {1 / steps:.4g}")
    return g[steps - init:].clone()
