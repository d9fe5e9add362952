"""x0 corrections: static clipping and dynamic thresholding.

Dynamic thresholding is from Saharia et al. 2022 (Imagen, arXiv:2205.11487,
section 2.3): per sample, ``s`` is the ``ratio`` quantile of ``|x0|``, clamped to
``[1, max_value]``, and ``x0`` becomes ``clamp(x0, -s, s) / s``. Both keep the
noise estimate consistent with the corrected ``x0`` at the same ``x``.
"""

from __future__ import annotations

import math

import torch

from .base import DenoiserTransform, with_x0

__all__ = ["clip_x0", "dynamic_threshold"]


class clip_x0(DenoiserTransform):  # noqa: N801 - used like a function: clip_x0(model, value)
    """Clip the data estimate to ``[-value, value]`` (diffusers' ``clip_sample``)."""

    def __init__(self, model, value: float = 1.0):
        super().__init__(model)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"clip_x0: value must be a finite number > 0, got {value!r}")
        self.value = float(value)

    def transform(self, pred, x, t):
        return with_x0(pred.x0.clamp(-self.value, self.value), x, self.process, t)


class dynamic_threshold(DenoiserTransform):  # noqa: N801
    """Imagen's dynamic thresholding of the data estimate (diffusers' ``thresholding=True``).

    ``ratio`` in (0, 1], ``max_value`` >= 1; the quantile is taken in float32 at
    least, over all of a sample's values.
    """

    def __init__(self, model, ratio: float = 0.995, max_value: float = 1.0):
        super().__init__(model)
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ValueError(f"dynamic_threshold: ratio must be in (0, 1], got {ratio!r}")
        if not (isinstance(max_value, (int, float)) and math.isfinite(max_value) and max_value >= 1):
            raise ValueError(f"dynamic_threshold: max_value must be a finite number >= 1, got {max_value!r}")
        self.ratio, self.max_value = float(ratio), float(max_value)

    def transform(self, pred, x, t):
        x0 = pred.x0
        work = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()
        flat = work.reshape(work.shape[0], -1)
        s = torch.quantile(flat.abs(), self.ratio, dim=1).clamp(1.0, self.max_value)
        s = s.reshape(-1, *[1] * (x0.ndim - 1))
        return with_x0((work.clamp(-s, s) / s).to(x0.dtype), x, self.process, t)
