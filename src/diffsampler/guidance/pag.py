"""Perturbed-attention guidance (Ahn et al., 2024, "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance", arXiv:2403.17377).

A second pass through the network with the attention map of selected
self-attention layers replaced by the identity (each position attends only to
itself, so such a layer returns its projected values) gives a degraded
prediction ``p``; the guided prediction is ``c + scale (c - p)``, and with
classifier-free guidance ``u + w (c - u) + scale (c - p)``. All passes go
through the network in one call on a stacked batch; the perturbation is
applied per sample, to the perturbed part of the batch only.

The perturbation reaches the network through a hook on its attention layers:
``diffsampler.models.nets.SelfAttention2d`` (the shipped digits models) reads a
per-sample mask, and diffusers ``Attention`` layers get a processor that mixes
identity attention into the perturbed samples.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..denoiser import Prediction
from ..models.nets import SelfAttention2d
from .base import DenoiserTransform
from .cfg import _check_scale, batch_calls, null_condition

__all__ = ["perturbed_attention", "self_attention_layers", "perturb_attention", "IdentityAttentionProcessor"]


def _network_of(model) -> torch.nn.Module:
    inner = model
    while not hasattr(inner, "fn") and hasattr(inner, "model"):
        inner = inner.model
    fn = getattr(inner, "fn", None)
    net = getattr(fn, "module", fn)
    if not isinstance(net, torch.nn.Module):
        raise TypeError("perturbed_attention needs the model's network as a torch.nn.Module with self-attention "
                        f"layers (a shipped model, or from_diffusers); got {type(net).__name__}")
    return net


def _is_diffusers_self_attention(module: torch.nn.Module) -> bool:
    return (type(module).__name__ == "Attention" and hasattr(module, "to_v") and hasattr(module, "processor")
            and not getattr(module, "is_cross_attention", False))


def self_attention_layers(network: torch.nn.Module, layers=None) -> list[tuple[str, torch.nn.Module]]:
    """The self-attention layers of ``network`` whose names contain one of ``layers``.

    ``layers=None`` picks those of the middle block (names containing ``mid``),
    the default of the paper for Stable Diffusion, or every self-attention layer
    when there is no middle block.
    """
    found = [(name, m) for name, m in network.named_modules()
             if isinstance(m, SelfAttention2d) or _is_diffusers_self_attention(m)]
    if not found:
        raise ValueError(f"perturbed_attention: {type(network).__name__} has no self-attention layers")
    if layers is None:
        mid = [(name, m) for name, m in found if "mid" in name]
        return mid or found
    if isinstance(layers, str):
        layers = [layers]
    chosen = [(name, m) for name, m in found if any(part in name for part in layers)]
    if not chosen:
        raise ValueError(f"perturbed_attention: layers {list(layers)!r} match none of the self-attention layers "
                         f"{[name for name, _ in found]}")
    return chosen


class IdentityAttentionProcessor:
    """A diffusers attention processor: ``base`` for the samples where ``mask`` is False, identity
    attention (the output projection of the values) where it is True."""

    def __init__(self, base, mask: torch.Tensor):
        self.base, self.mask = base, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        normal = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if not bool(self.mask.any()):
            return normal
        identity = self.identity(attn, hidden_states, temb)
        keep = self.mask.to(normal.device).reshape(-1, *[1] * (normal.ndim - 1))
        return torch.where(keep, identity, normal)

    @staticmethod
    def identity(attn, hidden_states: torch.Tensor, temb=None) -> torch.Tensor:
        """The layer's output when every position attends only to itself: ``to_out(to_v(h))``,
        with the layer's own normalisation, residual and output scaling around it."""
        residual = hidden_states
        h = hidden_states if attn.spatial_norm is None else attn.spatial_norm(hidden_states, temb)
        image = h.ndim == 4
        if image:
            b, c, height, width = h.shape
            h = h.reshape(b, c, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        out = attn.to_out[1](attn.to_out[0](attn.to_v(h)))
        if image:
            out = out.transpose(-1, -2).reshape(b, c, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def perturb_attention(layers: list[tuple[str, torch.nn.Module]], mask: torch.Tensor) -> Iterator[None]:
    """Within the block, ``layers`` use identity attention for the samples where ``mask`` is True."""
    saved = []
    try:
        for _, module in layers:
            if isinstance(module, SelfAttention2d):
                saved.append((module, module.perturbed))
                module.perturbed = mask
            else:
                saved.append((module, module.processor))
                module.processor = IdentityAttentionProcessor(module.processor, mask)
        yield
    finally:
        for module, state in saved:
            if isinstance(module, SelfAttention2d):
                module.perturbed = state
            else:
                module.processor = state


class perturbed_attention(DenoiserTransform):  # noqa: N801 - used like a function
    """Perturbed-attention guidance of ``model`` with weight ``scale``, optionally with CFG.

    Parameters
    ----------
    scale:
        PAG weight ``s`` (0: no PAG).
    layers:
        Substrings of the names of the self-attention layers to perturb (see
        :func:`self_attention_layers`); default the middle block's.
    adaptive_scale:
        diffusers' ``pag_adaptive_scale``: the weight falls linearly as sampling proceeds,
        ``max(0, s - adaptive_scale * 1000 (1 - t / t_max))`` (``1000 (1 - t / t_max)`` is
        diffusers' ``1000 - timestep`` on a 1000-step schedule).
    cfg_scale:
        Classifier-free guidance weight combined with PAG (1: none); the unconditional
        conditioning is the model's null condition or ``uncond``.
    """

    def __init__(self, model, scale: float, *, layers=None, adaptive_scale: float = 0.0, cfg_scale: float = 1.0,
                 uncond: dict | None = None):
        super().__init__(model)
        self.scale = _check_scale("perturbed_attention: scale", scale)
        self.adaptive_scale = _check_scale("perturbed_attention: adaptive_scale", adaptive_scale, 0.0)
        self.cfg_scale = _check_scale("perturbed_attention: cfg_scale", cfg_scale)
        self.layers = self_attention_layers(_network_of(model), layers)
        self.uncond = uncond

    def scale_at(self, t) -> float:
        """The PAG weight at time ``t`` (a float time)."""
        if self.adaptive_scale == 0.0:
            return self.scale
        progress = 1000.0 * (1.0 - float(t) / self.process.t_max)
        return max(0.0, self.scale - self.adaptive_scale * progress)

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        if isinstance(t, torch.Tensor) and t.ndim > 0 and self.adaptive_scale:
            raise ValueError("perturbed_attention: adaptive_scale needs one time for the whole batch")
        s = self.scale_at(t)
        w = self.cfg_scale
        conds = [cond]
        if w != 1.0:
            conds.append(null_condition(self.model, cond, self.uncond))
        if s != 0.0:
            conds.append(cond)
        if len(conds) == 1:
            return self.model(x, t, **cond)
        mask = torch.zeros(len(conds) * x.shape[0], dtype=torch.bool, device=x.device)
        if s != 0.0:
            mask[-x.shape[0]:] = True
        with perturb_attention(self.layers, mask):
            preds = batch_calls(self.model, x, t, conds)
        c = preds[0]
        x0, eps = c.x0, c.eps
        if w != 1.0:
            u = preds[1]
            x0, eps = u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps)
        if s != 0.0:
            p = preds[-1]
            x0, eps = x0 + s * (c.x0 - p.x0), eps + s * (c.eps - p.eps)
        return Prediction(x0, eps)
