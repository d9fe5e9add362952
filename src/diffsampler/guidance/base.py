"""The base of Denoiser transforms: same call, same process, NFE counted by the wrapped model."""

from __future__ import annotations

import torch

from ..denoiser import Prediction, _broadcast

__all__ = ["DenoiserTransform", "with_x0"]


def with_x0(x0: torch.Tensor, x: torch.Tensor, process, t) -> Prediction:
    """The prediction whose data estimate is ``x0`` at ``(x, t)``, its noise estimate made consistent."""
    a, s = _broadcast(process.alpha(t), x), _broadcast(process.sigma(t), x)
    return Prediction(x0, (x - a * x0) / s)


class DenoiserTransform:
    """Wraps a Denoiser (or another transform); subclasses implement :meth:`transform`.

    It answers ``model(x, t, **cond) -> Prediction`` like a Denoiser, exposes the
    wrapped model's ``process``, and reports the wrapped model's ``nfe``, so it can
    be passed to :func:`diffsampler.sample` with any solver and wrapped again.
    """

    def __init__(self, model):
        if not callable(model) or getattr(model, "process", None) is None:
            raise TypeError(f"{type(self).__name__}: model must be a Denoiser or a transform of one, "
                            f"got {type(model).__name__}")
        self.model = model
        self.process = model.process

    @property
    def nfe(self) -> int:
        return self.model.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        self.model.nfe = value

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        pred = self.model(x, t, **cond)
        out = self.transform(pred, x, t)
        if pred.renoise is not None and out.renoise is None:
            # CFG++ underneath: the corrected data estimate is still re-noised with the unconditional noise
            out = out.with_renoise(pred.renoise)
        return out

    def transform(self, pred: Prediction, x: torch.Tensor, t) -> Prediction:
        raise NotImplementedError
