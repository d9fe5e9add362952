"""Classifier-free guidance (Ho & Salimans, 2022, arXiv:2207.12598) with guidance
rescale (Lin et al., 2024, arXiv:2305.08891, section 3.4) and the guidance
interval (Kynkaanniemi et al., 2024, arXiv:2404.07724).

The guided prediction is ``u + scale (c - u)`` for the conditional ``c`` and
unconditional ``u`` predictions; it is applied to ``x0`` and ``eps`` alike,
which is the same as applying it to either one, since both are affine in the
network output with the same coefficients. Both passes go through the network
in one call on a doubled batch. The unconditional pass is skipped at scale 1
and, with ``interval``, wherever the noise level is outside it.
"""

from __future__ import annotations

import math

import torch

from ..denoiser import Prediction, _broadcast
from .base import DenoiserTransform, with_x0

__all__ = ["cfg", "null_condition", "batch_calls"]


def null_condition(model, cond: dict, uncond: dict | None = None) -> dict:
    """The conditioning of the unconditional pass: ``uncond`` if given, else the model's own null.

    A Denoiser built with ``null=`` (the shipped class-conditional models are)
    knows its null condition; other models need ``uncond=``.
    """
    if uncond is not None:
        return {**cond, **uncond}
    inner = model
    while inner is not None:
        null = getattr(inner, "null", None)
        if null is not None:
            return null(cond)
        inner = getattr(inner, "model", None)
    raise ValueError("guidance needs the unconditional conditioning: this model has no null condition "
                     "(Denoiser(..., null=...)); pass uncond={...} with the keywords of the unconditional pass")


def _stack(values: list, batch: int):
    """Concatenate per-pass conditioning values along the batch (tensors) or check they agree (others).

    A 0-d tensor (one class for the whole batch) that differs between passes, as a label and the
    null label do, is expanded to the batch first. Dicts are stacked key by key (SDXL's
    ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``), so nested conditioning goes
    through every transform that batches its passes."""
    first = values[0]
    if isinstance(first, dict):
        if not all(isinstance(v, dict) and v.keys() == first.keys() for v in values[1:]):
            keys = [sorted(v) if isinstance(v, dict) else type(v).__name__ for v in values]
            raise ValueError(f"guidance: a nested conditioning dict must have the same keys in every pass, got {keys}")
        return {k: _stack([v[k] for v in values], batch) for k in first}
    if isinstance(first, torch.Tensor) and first.ndim == 0 and all(isinstance(v, torch.Tensor) and v.ndim == 0
                                                                   for v in values):
        if not all(bool(v == first) for v in values[1:]):
            return torch.cat([v.expand(batch) for v in values], 0)
        return first
    if isinstance(first, torch.Tensor) and first.ndim > 0:
        return torch.cat(values, 0)
    if all(v is first or v == first for v in values[1:]):
        return first
    raise ValueError("guidance: a conditioning value that is not a batched tensor must be the same in every "
                     f"pass, got {values!r}")


def batch_calls(model, x: torch.Tensor, t, conds: list[dict]) -> list[Prediction]:
    """Evaluate ``model`` at ``(x, t)`` under each conditioning in ``conds``, in one network call.

    Conditioning tensors are concatenated along the batch; the predictions come back split.
    """
    n = len(conds)
    if n == 1:
        return [model(x, t, **conds[0])]
    keys = set().union(*conds)
    missing = [k for k in keys if not all(k in c for c in conds)]
    if missing:
        raise ValueError(f"guidance: the keyword(s) {sorted(missing)} must be given in every pass")
    merged = {k: _stack([c[k] for c in conds], x.shape[0]) for k in keys}
    tt = t.repeat(n) if isinstance(t, torch.Tensor) and t.ndim > 0 else t
    pred = model(torch.cat([x] * n, 0), tt, **merged)
    return pred.chunk(n)


def _per_sample_std(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).std(dim=1).reshape(-1, *[1] * (v.ndim - 1))


def _check_scale(name: str, value, low: float = -math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
    return float(value)


class cfg(DenoiserTransform):  # noqa: N801 - used like a function: cfg(model, scale)
    """Classifier-free guidance of ``model`` with weight ``scale`` (1 is the conditional model).

    Parameters
    ----------
    scale:
        Guidance weight ``w`` in ``u + w (c - u)`` (Stable Diffusion's ``guidance_scale``).
    rescale:
        ``phi`` in [0, 1] of guidance rescale: the guided prediction is rescaled to the
        per-sample standard deviation of the conditional one and mixed back with weight
        ``phi`` (the paper recommends 0.7).
    rescale_space:
        ``"x0"`` (the paper, which rescales the data estimate) or ``"eps"`` (diffusers'
        ``guidance_rescale``, which rescales the noise prediction).
    interval:
        ``(sigma_high, sigma_low)``: guide only where ``sigma_low < sigma <= sigma_high``,
        with ``sigma`` the noise level in EDM terms (``process.ode_sigma(t)``, which is
        ``sqrt((1 - alphabar) / alphabar)`` for VP). Elsewhere the conditional model
        alone is evaluated.
    uncond:
        Conditioning keywords of the unconditional pass (e.g. negative-prompt embeddings);
        by default the model's null condition.
    plus_plus:
        CFG++ (Chung et al., 2024, arXiv:2406.08070): also hand the solver the unconditional
        noise estimate (``Prediction.renoise``), with which the CFG++ solvers
        (``euler_cfg_pp``, ``euler_ancestral_cfg_pp``) re-noise the guided data estimate:
        ``x' = alpha' x0_guided + sigma' eps_uncond``. ``scale`` is then the paper's
        ``lambda``, typically in [0, 1]. Other solvers ignore it and do plain CFG.
    """

    def __init__(self, model, scale: float, *, rescale: float = 0.0, rescale_space: str = "x0",
                 interval: tuple[float, float] | None = None, uncond: dict | None = None,
                 plus_plus: bool = False):
        super().__init__(model)
        self.plus_plus = bool(plus_plus)
        self.scale = _check_scale("cfg: scale", scale)
        self.rescale = _check_scale("cfg: rescale", rescale, 0.0)
        if self.rescale > 1:
            raise ValueError(f"cfg: rescale must be in [0, 1], got {rescale!r}")
        if rescale_space not in ("x0", "eps"):
            raise ValueError(f"cfg: rescale_space must be 'x0' or 'eps', got {rescale_space!r}")
        self.rescale_space = rescale_space
        if interval is not None:
            if (not isinstance(interval, (tuple, list)) or len(interval) != 2
                    or not all(isinstance(v, (int, float)) and v >= 0 for v in interval)
                    or not interval[0] > interval[1]):
                raise ValueError(f"cfg: interval must be (sigma_high, sigma_low) with sigma_high > sigma_low >= 0, "
                                 f"got {interval!r}")
            interval = (float(interval[0]), float(interval[1]))
        self.interval = interval
        self.uncond = uncond

    def _inside(self, t):
        """Whether ``t`` is inside the guidance interval: a bool, or a bool tensor for per-sample times."""
        if self.interval is None:
            return True
        sigma = self.process.ode_sigma(t)
        high, low = self.interval
        return (sigma > low) & (sigma <= high)

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        inside = self._inside(t)
        if self.scale == 1.0 or inside is False:
            return self.model(x, t, **cond)
        c, u = batch_calls(self.model, x, t, [cond, null_condition(self.model, cond, self.uncond)])
        guided = self.combine(c, u, x, t)
        if isinstance(inside, torch.Tensor):
            keep = _broadcast(inside.to(x.dtype), x)
            guided = Prediction(c.x0 + keep * (guided.x0 - c.x0), c.eps + keep * (guided.eps - c.eps))
        if self.plus_plus:
            renoise = u.eps if not isinstance(inside, torch.Tensor) else c.eps + keep * (u.eps - c.eps)
            guided = guided.with_renoise(renoise)
        return guided

    def combine(self, c: Prediction, u: Prediction, x: torch.Tensor, t) -> Prediction:
        """The guided prediction from the conditional and unconditional ones."""
        guided = Prediction.extrapolate(u, c, self.scale, x)
        if self.rescale == 0.0:
            return guided
        if self.rescale_space == "x0":
            x0 = self._rescaled(guided.x0, c.x0)
            return with_x0(x0, x, self.process, t)
        eps = self._rescaled(guided.eps, c.eps)
        a, s = _broadcast(self.process.alpha(t), x), _broadcast(self.process.sigma(t), x)
        return Prediction((x - s * eps) / a, eps)

    def _rescaled(self, guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        matched = guided * (_per_sample_std(cond) / _per_sample_std(guided))
        return self.rescale * matched + (1 - self.rescale) * guided
