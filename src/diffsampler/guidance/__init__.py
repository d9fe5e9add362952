"""Transforms of a Denoiser: functions ``Denoiser -> Denoiser`` that compose with every solver.

Classifier-free guidance (with rescale and the guidance interval) and the x0
corrections of the peers, static clipping and dynamic thresholding.
"""

from .base import DenoiserTransform
from .cfg import cfg
from .thresholding import clip_x0, dynamic_threshold

__all__ = ["DenoiserTransform", "cfg", "clip_x0", "dynamic_threshold"]
