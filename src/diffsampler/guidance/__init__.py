"""Transforms of a Denoiser: functions ``Denoiser -> Denoiser`` that compose with every solver.

Classifier-free guidance (with rescale and the guidance interval), classifier
guidance, gradient-free classifier guidance, minority guidance, autoguidance, perturbed-attention guidance, and the x0 corrections of the peers, static clipping and
dynamic thresholding.
"""

from .autoguidance import autoguidance
from .base import DenoiserTransform
from .cfg import cfg
from .classifier import classifier_guidance, gradient_free_guidance
from .minority import minority_classes, minority_guidance, minority_score
from .pag import perturbed_attention
from .thresholding import clip_x0, dynamic_threshold

__all__ = ["DenoiserTransform", "cfg", "classifier_guidance", "gradient_free_guidance", "minority_guidance", "minority_score",
           "minority_classes", "autoguidance", "perturbed_attention", "clip_x0", "dynamic_threshold"]
