"""Transforms of a Denoiser: functions ``Denoiser -> Denoiser`` that compose with every solver.

Classifier-free guidance (with rescale and the guidance interval), classifier
guidance, gradient-free classifier guidance, autoguidance, perturbed-attention guidance, and the x0 corrections of the peers, static clipping and
dynamic thresholding.
"""

from .autoguidance import autoguidance
from .base import DenoiserTransform
from .cfg import cfg
from .classifier import classifier_guidance, gradient_free_guidance
from .pag import perturbed_attention
from .thresholding import clip_x0, dynamic_threshold

__all__ = ["DenoiserTransform", "cfg", "classifier_guidance", "gradient_free_guidance", "autoguidance", "perturbed_attention", "clip_x0", "dynamic_threshold"]
