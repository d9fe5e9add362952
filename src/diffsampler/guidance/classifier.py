"""Guidance by a classifier: classifier guidance and gradient-free classifier guidance (below).

Classifier guidance (Dhariwal & Nichol, 2021, arXiv:2105.05233, section 4; the
score form of Song et al., 2021): with a noise-conditioned classifier
``log p(y | x_t)``, the guided noise estimate is
``eps - scale * sigma(t) * grad_x log p(y | x_t)``. At scale 1 with the exact
classifier this is exactly the class-conditional model, because
``grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

from ..denoiser import Prediction, _broadcast, time_dtype
from .base import DenoiserTransform
from .cfg import _check_scale

__all__ = ["classifier_guidance", "gradient_free_guidance"]


def _label_of(cond: dict, key: str, batch: int, who: str) -> torch.Tensor:
    if key not in cond:
        raise ValueError(f"{who}: the class to guide towards must be passed as {key}= (a LongTensor of "
                         "one class per sample, or one class)")
    label = torch.as_tensor(cond[key], dtype=torch.long)
    if label.ndim == 0:
        label = label.expand(batch)
    if label.shape != (batch,):
        raise ValueError(f"{who}: {key} must be one class or one per sample ({batch}), got shape "
                         f"{tuple(label.shape)}")
    return label


_NO_GRADIENT = ("classifier_guidance: the classifier's output has no gradient path to x ({what}): it must "
                "compute its logits from x with differentiable torch operations, not under torch.no_grad() or "
                "inference_mode, from x.detach(), or through numpy; for a classifier without gradients use "
                "ds.guidance.gradient_free_guidance")


def time_tensor(t, x: torch.Tensor) -> torch.Tensor:
    """Process time as a tensor of shape ``(batch,)``: float64 for float64 samples, else float32
    (the classifiers' time input, as a Denoiser hands time to its network)."""
    dtype = time_dtype(x)
    if isinstance(t, torch.Tensor) and t.ndim > 0:
        return t.to(device=x.device, dtype=dtype)
    return torch.full((x.shape[0],), float(t), dtype=dtype, device=x.device)


class classifier_guidance(DenoiserTransform):  # noqa: N801 - used like a function
    """Steer ``model`` towards class ``label`` with a noise-conditioned ``classifier``.

    Parameters
    ----------
    classifier:
        ``classifier(x_t, time) -> logits`` of shape ``(batch, classes)``, ``time`` the
        process time of ``model`` as a ``(batch,)`` tensor (float64 for float64 samples) (the shipped
        ``digits-classifier`` and ``GaussianMixture.noisy_classifier`` are of this form).
        Gradients flow through the classifier only; the network is not differentiated.
    scale:
        The guidance scale ``s`` (1: sample ``p(x | y)`` with an exact classifier).
    key:
        The conditioning keyword that carries the class (default ``label``).
    condition_model:
        Pass the class to ``model`` too (guidance of a conditional model, as in ADM);
        by default the model is called without it, i.e. unconditionally.
    """

    def __init__(self, model, classifier: Callable, scale: float = 1.0, *, key: str = "label",
                 condition_model: bool = False):
        super().__init__(model)
        if not callable(classifier):
            raise TypeError(f"classifier_guidance: classifier must be callable, got {type(classifier).__name__}")
        self.classifier = classifier
        self.scale = _check_scale("classifier_guidance: scale", scale)
        self.key = key
        self.condition_model = bool(condition_model)

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        label = _label_of(cond, self.key, x.shape[0], "classifier_guidance")
        model_cond = cond if self.condition_model else {k: v for k, v in cond.items() if k != self.key}
        pred = self.model(x, t, **model_cond)
        if self.scale == 0.0:
            return pred
        grad = self.log_prob_gradient(x, t, label)
        sigma = _broadcast(self.process.sigma(t), x)
        eps = pred.eps - (self.scale * sigma) * grad
        alpha = _broadcast(self.process.alpha(t), x)
        return Prediction((x - sigma * eps) / alpha, eps)

    def log_prob_gradient(self, x: torch.Tensor, t, label: torch.Tensor) -> torch.Tensor:
        """``grad_x log p(label | x_t)`` at ``(x, t)``, in the dtype of ``x``."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.classifier(xg, time_tensor(t, x))
            if not isinstance(logits, torch.Tensor) or not logits.requires_grad:
                raise ValueError(_NO_GRADIENT.format(what="its output does not require grad"))
            chosen = F.log_softmax(logits.to(torch.float64 if x.dtype == torch.float64 else torch.float32), dim=-1)
            (grad,) = torch.autograd.grad(chosen.gather(1, label.to(x.device)[:, None]).sum(), xg, allow_unused=True)
            if grad is None:
                raise ValueError(_NO_GRADIENT.format(what="its output does not depend on x through autograd"))
        if not bool(torch.isfinite(grad).all()):
            raise FloatingPointError(f"classifier_guidance: the classifier's gradient is not finite at t = {t}")
        return grad.to(x.dtype)



class gradient_free_guidance(DenoiserTransform):  # noqa: N801 - used like a function
    """Gradient-free classifier guidance (after Shenoy et al., 2024, arXiv:2411.15393): a classifier
    of clean data, run in inference mode only, picks at every evaluation a reference class ``c_r``
    (its most probable class other than the target ``c``, judged on the conditional data estimate),
    and the model is pushed away from it: ``D(x|c) + w_t (D(x|c) - D(x|c_r))``.

    The reference pass replaces the unconditional pass of CFG (2 network calls per evaluation, one
    after the other since the reference depends on the first). ``w_t``: with ``adaptive=True``,
    ``scale * p(c_r | x0) / (p(c | x0) + p(c_r | x0))``, strong where the classifier confuses the
    target with the reference and fading where it is sure of the target; otherwise ``scale``.
    This adaptive rule is ours: the paper states that its scale adapts to the classifier's
    confidence, but we could not read its exact formula (see the issue note).

    ``classifier(x0) -> logits`` takes clean data; ``key`` carries the target class.
    """

    def __init__(self, model, classifier: Callable, scale: float = 1.0, *, adaptive: bool = True,
                 key: str = "label"):
        super().__init__(model)
        if not callable(classifier):
            raise TypeError(f"gradient_free_guidance: classifier must be callable, got {type(classifier).__name__}")
        self.classifier = classifier
        self.scale = _check_scale("gradient_free_guidance: scale", scale)
        self.adaptive = bool(adaptive)
        self.key = key

    def reference(self, x0: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_r, w)``: the reference class of each sample and its guidance weight."""
        with torch.no_grad():
            probs = self.classifier(x0).to(torch.float64).softmax(-1)
        label = label.to(probs.device)
        others = probs.scatter(1, label[:, None], -1.0)
        ref = others.argmax(1)
        if not self.adaptive:
            return ref, torch.full((len(ref),), self.scale, dtype=torch.float64, device=probs.device)
        p_ref, p_target = probs.gather(1, ref[:, None])[:, 0], probs.gather(1, label[:, None])[:, 0]
        return ref, self.scale * p_ref / (p_ref + p_target).clamp_min(1e-300)

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        label = _label_of(cond, self.key, x.shape[0], "gradient_free_guidance")
        c = self.model(x, t, **cond)
        if self.scale == 0.0:
            return c
        ref, w = self.reference(c.x0, label)
        r = self.model(x, t, **{**cond, self.key: ref.to(label.device)})
        w = _broadcast(w.to(x.device), x)
        return Prediction(c.x0 + w * (c.x0 - r.x0), c.eps + w * (c.eps - r.eps))
