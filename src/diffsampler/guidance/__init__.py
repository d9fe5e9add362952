"""Transforms of a Denoiser: functions ``Denoiser -> Denoiser`` that compose with every solver.

So far: the x0 corrections of the peers, static clipping and dynamic thresholding.
"""

from .base import DenoiserTransform
from .thresholding import clip_x0, dynamic_threshold

__all__ = ["DenoiserTransform", "clip_x0", "dynamic_threshold"]
