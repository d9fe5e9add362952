"""Minority guidance (Um, Lee and Ye, ICLR 2024, "Don't Play Favorites: Minority Guidance for Diffusion
Models", arXiv:2301.12334): classifier guidance towards the samples a model reconstructs worst.

Tweedie's denoiser pulls a noised sample towards the features common in the data, so how badly one
noising-and-denoising step reconstructs a clean sample measures how rare it is. The paper's
*minority score* is

    l(x0) = E_eps d(x0, x0_hat(alpha_t x0 + sigma_t eps, t))

at one small time ``t`` (60 of 1000 DDPM steps in the paper), with ``d`` the LPIPS distance; here
``d`` is the squared Euclidean error (no perceptual network is shipped; on 8x8 digits and on
Gaussian mixtures a pixel distance is the natural one). The scores of the training data are cut at their quantiles into
``L`` ordinal *minority classes* (:func:`minority_classes`), a noise-aware classifier
``p(l | x_t)`` is trained on them (the shipped ``digits-minority`` for the ``digits`` model), and
sampling is classifier guidance towards the highest class (:class:`minority_guidance`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..noise import StepNoise, sample_keys
from ..process import VP
from .cfg import _check_scale
from .classifier import classifier_guidance, time_tensor

__all__ = ["minority_score", "minority_classes", "minority_guidance", "paper_time"]

#: The paper's time: step 60 of ADM's 1000 DDPM steps.
PAPER_FRACTION = 0.06

#: The conditioning keyword that carries the target level inside the transform; users never pass it,
#: so ``label=`` stays free for a class-conditional model.
_TARGET_KEY = "_minority_target"


def paper_time(process) -> float:
    """The paper's ``t = 60/1000`` in the time of ``process``.

    Processes whose time runs over ``[0, 1]`` (every VP, discrete or continuous, and the flow) use
    ``t = 0.06`` itself: step 60 of 1000 for a DDPM schedule. A process with another time axis (EDM,
    whose time is the noise level ``sigma``) uses the time with the noise-to-signal ratio
    ``sigma / alpha`` of the paper's models there: ADM's linear DDPM schedule at step 60 (about 0.21).
    """
    if 0.0 <= process.t_min and process.t_max <= 1.0:
        return max(PAPER_FRACTION, float(process.t_min))
    ratio = float(VP.linear_discrete().ode_sigma(PAPER_FRACTION))
    return float(process.t_of_ode_sigma(ratio))


def minority_score(model, x0: torch.Tensor, t: float | None = None, draws: int = 5, *,
                   generator: torch.Generator | None = None, batch: int | None = None, **cond) -> torch.Tensor:
    """The minority score of each clean sample: ``mean over draws of ||x0 - x0_hat(alpha x0 + sigma eps, t)||^2``.

    Um et al. 2024 (arXiv:2301.12334), the minority score, with the squared error (summed over the sample's
    entries) in place of LPIPS. Higher is rarer.

    Parameters
    ----------
    model:
        A Denoiser (or a transform of one); called without gradients. ``cond`` is passed to it
        (e.g. ``label=`` for class-conditional minority scores); without it a class-conditional
        digits model is unconditional.
    x0:
        Clean samples, shape ``(batch, ...)``.
    t:
        The time of the noising step; default :func:`paper_time` (0.06 for VP and flow processes).
    draws:
        The number of noise draws averaged (the paper's 5).
    generator:
        Every draw comes from it (one draw of the generator whatever the batch size; sample ``k``'s
        noise, hence its score, does not depend on the batch it is in: :mod:`diffsampler.noise`).
    batch:
        Evaluate the model on at most this many samples at a time (default: all at once).
    """
    if not callable(model) or getattr(model, "process", None) is None:
        raise TypeError(f"minority_score: model must be a Denoiser or a transform of one, got {type(model).__name__}")
    if not isinstance(x0, torch.Tensor) or x0.ndim < 2 or x0.shape[0] < 1:
        got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"minority_score: x0 must be a tensor of shape (batch, ...) with batch >= 1, got {got}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"minority_score: draws must be a positive integer, got {draws!r}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"minority_score: batch must be a positive integer or None, got {batch!r}")
    process = model.process
    t = paper_time(process) if t is None else float(t)
    if not (math.isfinite(t) and process.t_min <= t <= process.t_max):
        raise ValueError(f"minority_score: t must be in the process's range [{process.t_min}, {process.t_max}], "
                         f"got {t}")
    alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
    noise = StepNoise(sample_keys(x0.shape[0], generator), x0.shape, x0.dtype, x0.device)
    step = batch or x0.shape[0]
    total = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    with torch.no_grad():
        for d in range(draws):
            eps = noise.draw(d)  # draw d of every sample: a pure function of its key
            for lo in range(0, x0.shape[0], step):
                part = slice(lo, lo + step)
                piece = {k: v[part] if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in cond.items()}
                x0_hat = model(alpha * x0[part] + sigma * eps[part], t, **piece).x0
                total[part] += (x0[part] - x0_hat).to(torch.float64).flatten(1).pow(2).sum(1)
    return total / draws


def minority_classes(scores: torch.Tensor, levels: int | None = None, *,
                     thresholds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes, thresholds)``: the scores cut at their quantiles into ``levels`` ordinal classes.

    ``thresholds`` are the ``levels - 1`` quantiles ``k / levels`` of ``scores`` (float64, increasing);
    class ``k`` holds the scores between thresholds ``k - 1`` and ``k``, so class 0 is the most
    common data and class ``levels - 1`` the rarest (Um et al. 2024: equal-count bins,
    as their ``construct_ms_dataset``). Given ``thresholds`` (those of the training data), new scores
    are classified with them and ``levels`` may be left out.
    """
    scores = torch.as_tensor(scores)
    if scores.ndim != 1 or scores.numel() < 1 or not bool(torch.isfinite(scores).all()):
        raise ValueError(f"minority_classes: scores must be a non-empty 1-D tensor of finite numbers, got shape "
                         f"{tuple(scores.shape)}")
    s = scores.to(torch.float64)
    if thresholds is None:
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= s.numel():
            raise ValueError(f"minority_classes: levels must be an integer in [2, {s.numel()}] (the number of "
                             f"scores), got {levels!r}")
        q = torch.arange(1, levels, dtype=torch.float64, device=s.device) / levels
        thresholds = torch.quantile(s, q)
    else:
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64, device=s.device)
        if thresholds.ndim != 1 or thresholds.numel() < 1 or bool((thresholds.diff() < 0).any()):
            raise ValueError("minority_classes: thresholds must be a non-empty increasing 1-D tensor")
        if levels is not None and levels != thresholds.numel() + 1:
            raise ValueError(f"minority_classes: {thresholds.numel()} thresholds make {thresholds.numel() + 1} "
                             f"levels, not {levels}")
    return torch.bucketize(s, thresholds, right=True), thresholds


def _levels_of(classifier) -> int | None:
    """The number of minority levels a classifier declares (``levels`` or ``num_classes``), if any."""
    for name in ("levels", "num_classes"):
        value = getattr(classifier, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class minority_guidance(classifier_guidance):  # noqa: N801 - used like a function
    """Minority guidance (Um et al. 2024, arXiv:2301.12334): classifier guidance of
    ``model`` towards the minority level ``target`` of a noise-aware minority ``classifier``.

    The guided noise estimate is ``eps - scale * sigma(t) * grad_x log p(target | x_t)``, the
    gradient computed by :class:`classifier_guidance` (this transform only fixes the class). At
    ``scale`` 1 with the exact ``p(l | x_t)`` it samples ``p(x0 | l = target)``; larger scales
    sharpen towards the rarest data (the paper's default is 3.5 towards level 99 of 100).

    Parameters
    ----------
    classifier:
        ``classifier(x_t, time) -> logits`` over the ``L`` minority levels (as for
        :class:`classifier_guidance`; the shipped ``digits-minority`` is one).
    scale:
        The guidance scale, ``>= 0`` (0: the model itself).
    target:
        The level to guide towards; default the highest (rarest), ``L - 1``, read from the
        classifier's ``levels`` or ``num_classes`` attribute, or else from the width of its first
        output.

    The model's own keywords (e.g. ``label=`` of a class-conditional model, for minority samples of
    one class) are passed to it unchanged; the classifier sees only ``(x_t, time)``.
    """

    def __init__(self, model, classifier: Callable, scale: float = 1.0, *, target: int | None = None):
        if not callable(classifier):
            raise TypeError(f"minority_guidance: classifier must be callable, got {type(classifier).__name__}")
        scale = _check_scale("minority_guidance: scale", scale, low=0.0)
        super().__init__(model, classifier, scale, key=_TARGET_KEY)
        if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 0):
            raise ValueError(f"minority_guidance: target must be a non-negative integer level or None, got {target!r}")
        self.levels = _levels_of(classifier)
        self.target = target
        if self.levels is not None:
            self._resolve(self.levels)

    def _resolve(self, levels: int) -> None:
        if levels < 2:
            raise ValueError(f"minority_guidance: the classifier has {levels} level(s); minority guidance needs >= 2")
        if self.target is None:
            self.target = levels - 1
        elif self.target >= levels:
            raise ValueError(f"minority_guidance: target must be a level in [0, {levels - 1}] of the classifier's "
                             f"{levels}, got {self.target}")
        self.levels = levels

    def __call__(self, x: torch.Tensor, t, **cond):
        if _TARGET_KEY in cond:
            raise ValueError(f"minority_guidance: {_TARGET_KEY} is the transform's own keyword; set target= instead")
        if self.levels is None and self.scale != 0.0:
            # a classifier that does not declare its levels: read them off one (gradient-free) output
            with torch.no_grad():
                self._resolve(int(self.classifier(x[:1], time_tensor(t, x)[:1]).shape[-1]))
        target = torch.full((x.shape[0],), self.target if self.target is not None else 0, dtype=torch.long)
        return super().__call__(x, t, **cond, **{_TARGET_KEY: target})
