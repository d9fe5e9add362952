"""Autoguidance (Karras et al., 2024, "Guiding a Diffusion Model with a Bad Version of Itself",
arXiv:2406.02507): ``D_weak + scale (D - D_weak)``, where the weak model is a smaller or
less trained version of the same model with the same conditioning."""

from __future__ import annotations

import torch

from ..denoiser import Prediction
from .base import DenoiserTransform
from .cfg import _check_scale

__all__ = ["autoguidance"]


class autoguidance(DenoiserTransform):  # noqa: N801 - used like a function
    """Guide ``model`` by the weaker ``weak`` model of the same process with weight ``scale``.

    Both are called with the same conditioning (two network calls per
    evaluation; ``nfe`` counts both). Scale 1 is ``model`` alone.
    """

    def __init__(self, model, weak, scale: float):
        super().__init__(model)
        if not callable(weak) or getattr(weak, "process", None) is None:
            raise TypeError(f"autoguidance: weak must be a Denoiser or a transform of one, got {type(weak).__name__}")
        probe = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64) * (self.process.t_max - self.process.t_min) \
            + self.process.t_min
        same = type(weak.process) is type(self.process) and torch.allclose(
            weak.process.lambda_(probe), self.process.lambda_(probe), rtol=1e-6, atol=1e-9)
        if not same:
            raise ValueError(f"autoguidance: the weak model's process {weak.process!r} differs from the model's "
                             f"{self.process!r}; both must be trained on the same process")
        self.weak = weak
        self.scale = _check_scale("autoguidance: scale", scale)

    @property
    def nfe(self) -> int:
        return self.model.nfe + self.weak.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        self.model.nfe = value
        self.weak.nfe = 0

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        good = self.model(x, t, **cond)
        if self.scale == 1.0:
            return good
        return Prediction.extrapolate(self.weak(x, t, **cond), good, self.scale, x)
