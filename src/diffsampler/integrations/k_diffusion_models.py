"""k-diffusion style denoisers ``D(x, sigma, **cond) -> x0`` as Denoisers."""

from __future__ import annotations

from typing import Callable

from ..denoiser import Denoiser
from ..process import EDM

__all__ = ["from_k_diffusion"]


def from_k_diffusion(denoiser: Callable, sigma_min: float = 0.002, sigma_max: float = 80.0,
                     *, null: Callable[[dict], dict] | None = None) -> Denoiser:
    """A Denoiser for a k-diffusion style ``D(x, sigma, **cond) -> x0`` in EDM coordinates.

    k-diffusion's wrappers of VP models (``DiscreteEpsDDPMDenoiser`` and the like)
    have this form too, with ``x`` in the EDM scale ``x_t / alpha``; pass their
    ``sigma_min`` and ``sigma_max``.
    """
    if not callable(denoiser):
        raise TypeError(f"from_k_diffusion: denoiser must be callable, got {type(denoiser).__name__}")
    return Denoiser(denoiser, EDM(sigma_min, sigma_max), "x0", null=null,
                    name=getattr(denoiser, "__name__", type(denoiser).__name__))
