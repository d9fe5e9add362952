"""The one model boundary: a network, its process and its prediction type.

``Denoiser(fn, process, prediction)`` wraps any callable ``fn(x, time, **cond)``
and answers ``model(x, t, **cond) -> Prediction``, from which the clean-data
estimate ``x0``, the noise estimate ``eps``, the score and the velocity are all
available. This is the only place that knows the network's parameterisation;
no solver ever branches on it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ._scalars import coefficient
from .process import Process

__all__ = ["Denoiser", "Prediction", "PREDICTIONS", "convert_prediction"]

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")


class Prediction(NamedTuple):
    """A network's answer at ``(x, t)`` in the two forms every solver uses.

    ``x0`` is the posterior-mean estimate of the data and ``eps`` the matching
    noise estimate, with ``x = alpha x0 + sigma eps``. The other forms are
    derived from these on request.

    ``renoise`` is set only by classifier-free guidance with ``plus_plus=True``:
    the unconditional noise estimate, which the CFG++ solvers (``euler_cfg_pp``,
    ``euler_ancestral_cfg_pp``) re-noise with. Every other solver ignores it.
    """

    x0: torch.Tensor
    eps: torch.Tensor
    renoise: torch.Tensor | None = None

    def score(self, process: Process, t: float) -> torch.Tensor:
        """``grad log p_t(x) = -eps / sigma``."""
        return self.eps * _broadcast(-1.0 / process.sigma(t), self.eps)

    def velocity(self, process: Process, t: float) -> torch.Tensor:
        """Probability-flow velocity ``dx/dt = alpha'(t) x0 + sigma'(t) eps``."""
        return self.x0 * _broadcast(process.d_alpha(t), self.x0) + self.eps * _broadcast(process.d_sigma(t), self.x0)

    def v(self, process: Process, t: float) -> torch.Tensor:
        """The ``v`` of Salimans & Ho (2022): ``alpha eps - sigma x0``."""
        return self.eps * _broadcast(process.alpha(t), self.x0) - self.x0 * _broadcast(process.sigma(t), self.x0)

    def as_(self, prediction: str, process: Process, t: float) -> torch.Tensor:
        """This prediction expressed as ``prediction`` (one of ``PREDICTIONS``)."""
        if prediction == "x0":
            return self.x0
        if prediction == "eps":
            return self.eps
        if prediction == "v":
            return self.v(process, t)
        if prediction == "score":
            return self.score(process, t)
        if prediction == "velocity":
            return self.velocity(process, t)
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def time_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the time handed to networks with samples ``x``: float64 for float64 samples, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _broadcast(c, x: torch.Tensor):
    """A per-sample coefficient (shape (B,)) as a tensor that broadcasts against ``x``."""
    if isinstance(c, torch.Tensor) and c.ndim > 0:
        return c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return float(c)


def _coefficients(process: Process, t, prediction: str):
    """The process values ``convert_prediction`` needs at ``t``: (alpha, sigma, d_alpha, d_sigma)."""
    derivs = prediction == "velocity"
    return (process.alpha(t), process.sigma(t),
            process.d_alpha(t) if derivs else None, process.d_sigma(t) if derivs else None)


def convert_prediction(out: torch.Tensor, x: torch.Tensor, prediction: str, process: Process,
                       t, coefficients=None) -> Prediction:
    """Turn a network output of type ``prediction`` at ``(x, t)`` into ``Prediction(x0, eps)``.

    ``t`` is a float, or a float64 tensor with one time per sample.
    ``coefficients`` may carry ``_coefficients(process, t, prediction)`` computed earlier.
    """
    a, s, da, ds = coefficients if coefficients is not None else _coefficients(process, t, prediction)
    if isinstance(a, float) and prediction == "eps":  # the common case, in two fused kernels
        return Prediction(torch.add(x, out, alpha=-s).mul_(1.0 / a), out)
    a, s = _broadcast(a, x), _broadcast(s, x)
    if prediction == "eps":
        return Prediction((x - s * out) / a, out)
    if prediction == "x0":
        return Prediction(out, (x - a * out) / s)
    if prediction == "v":
        # [x; v] = [[a, s], [-s, a]] [x0; eps]; the determinant is a^2 + s^2 (1 for VP).
        det = a * a + s * s
        return Prediction((a * x - s * out) / det, (s * x + a * out) / det)
    if prediction == "score":
        eps = out * (-s)
        return Prediction((x - s * eps) / a, eps)
    if prediction == "velocity":
        da, ds = _broadcast(da, x), _broadcast(ds, x)
        # [x; u] = [[a, s], [a', s']] [x0; eps]
        det = a * ds - s * da
        return Prediction((ds * x - s * out) / det, (a * out - da * x) / det)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


class Denoiser:
    """Wrap a network ``fn(x, time, **cond)`` trained on ``process`` to predict ``prediction``.

    Parameters
    ----------
    fn:
        The network. It receives ``x`` and a tensor of shape ``(batch,)`` holding
        ``time_input(t)`` (float32, or float64 when ``x`` is float64), and any
        conditioning keywords given to ``sample`` or to the call.
    process:
        The noise process the network was trained on.
    prediction:
        One of ``"eps"``, ``"x0"``, ``"v"``, ``"score"``, ``"velocity"``.
    time_input:
        Maps process time to the network's time input. Defaults to
        ``process.time_input`` (integer-like timesteps for discrete VP, sigma for
        EDM, t for continuous VP and flows).
    null:
        For conditional networks: maps the conditioning keywords of a call to those
        of the unconditional call (classifier-free guidance's null condition).

    ``nfe`` counts the network evaluations made through this object.
    """

    def __init__(self, fn: Callable, process: Process, prediction: str = "eps", *,
                 time_input: Callable | None = None, name: str | None = None,
                 null: Callable[[dict], dict] | None = None):
        if not callable(fn):
            raise TypeError(f"Denoiser: fn must be callable, got {type(fn).__name__}")
        if not isinstance(process, Process):
            raise TypeError(f"Denoiser: process must be a diffsampler Process, got {type(process).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"Denoiser: prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if null is not None and not callable(null):
            raise TypeError(f"Denoiser: null must be callable (conditioning -> null conditioning), got {null!r}")
        self.fn = fn
        self.null = null
        self.process = process
        self.prediction = prediction
        self.time_input = time_input if time_input is not None else process.time_input
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.nfe = 0
        self._cache: dict[tuple, tuple] = {}

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        """Evaluate the network at ``(x, t)``; ``t`` is a float or one float64 time per sample.

        The time tensor handed to the network is shared between calls at the same
        time and batch shape: networks must treat their inputs as read-only.
        """
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            coefficients = None
            tin = self.time_input(t).to(device=x.device, dtype=time_dtype(x))
        else:
            t = float(t)
            key = (t, x.shape[0], x.dtype, x.device)
            cached = self._cache.get(key)
            if cached is None:
                # Solvers evaluate at the same few grid times over and over: compute the
                # process values, the time tensor and the eps -> x0 multiplier there once (a pure memo).
                if len(self._cache) > 4096:
                    self._cache.clear()
                coefficients = _coefficients(self.process, t, self.prediction)
                tin = torch.full((x.shape[0],), float(self.time_input(t)), dtype=time_dtype(x), device=x.device)
                a = coefficients[0]
                fast = (coefficient(1.0 / a, x) if self.prediction == "eps" and a > 0 else None)
                cached = self._cache[key] = (coefficients, tin, fast)
            coefficients, tin, fast = cached
            out = self.fn(x, tin, **cond)
            self.nfe += 1
            if type(out) is torch.Tensor and out.shape == x.shape and out.dtype == x.dtype and fast is not None:
                # eps models at one time for the batch (the hot path): x0 = (x - sigma eps) / alpha, two kernels
                return Prediction(torch.add(x, out, alpha=-coefficients[1]).mul_(fast), out)
            return self._convert(out, x, t, coefficients)
        out = self.fn(x, tin, **cond)
        self.nfe += 1
        return self._convert(out, x, t, coefficients)

    def _convert(self, out, x: torch.Tensor, t, coefficients) -> Prediction:
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"Denoiser {self.name!r}: the network returned {got} for an input of "
                             f"shape {tuple(x.shape)}; it must return a tensor of the input's shape")
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return convert_prediction(out, x, self.prediction, self.process, t, coefficients)

    def __repr__(self) -> str:
        return f"Denoiser({self.name}, {self.process!r}, prediction={self.prediction!r})"
