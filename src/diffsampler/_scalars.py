"""Python numbers as tensor multipliers on the sampling hot path."""

from __future__ import annotations

import torch

__all__ = ["coefficient"]


def coefficient(value: float, like: torch.Tensor):
    """``value`` as a multiplier of tensors like ``like``: a 0-dim tensor of its dtype and device for float32
    and float64, else the float itself.

    Multiplying by a Python number costs PyTorch a second dispatch (measured on CPU for a (1024, 2) float32
    tensor: 5.7 us against 2.9 us with a 0-dim tensor), which is most of a solver's own work per step.
    Half precision keeps the float, so the product is still formed in float32.
    """
    if like.dtype in (torch.float32, torch.float64):
        return torch.tensor(value, dtype=like.dtype, device=like.device)
    return float(value)
