"""The one model boundary: a network, its process and its prediction type.

``Denoiser(fn, process, prediction)`` wraps any callable ``fn(x, time, **cond)``
and answers ``model(x, t, **cond) -> Prediction``, from which the clean-data
estimate ``x0``, the noise estimate ``eps``, the score and the velocity are all
available. This is the only place that knows the network's parameterisation;
no solver ever branches on it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._scalars import coefficient
from .process import Process

__all__ = ["Denoiser", "Prediction", "PREDICTIONS", "convert_prediction"]

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")


class Prediction:
    """A network's answer at ``(x, t)`` in the two forms every solver uses.

    ``x0`` is the posterior-mean estimate of the data and ``eps`` the matching
    noise estimate, with ``x = alpha x0 + sigma eps``. The other forms are
    derived from these on request.

    A Denoiser answers with the network's output ``raw`` and, for each form, the
    numbers ``(p, q)`` with ``form = p x + q raw`` (every prediction type is such a
    pair of linear maps). A form is computed when it is first read, so a solver
    that reads neither pays for neither, and :func:`~diffsampler.solvers.base.combine`
    folds a form it has not read into the weights of ``x`` and ``raw``: an Euler or
    DDIM step is then two kernels in all. ``Prediction(x0, eps)`` holds both forms.

    ``renoise`` is set only by classifier-free guidance with ``plus_plus=True``:
    the unconditional noise estimate, which the CFG++ solvers (``euler_cfg_pp``,
    ``euler_ancestral_cfg_pp``) re-noise with. Every other solver ignores it.
    """

    __slots__ = ("_x0", "_eps", "renoise", "at", "raw", "_maps")

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor, renoise: torch.Tensor | None = None):
        self._x0, self._eps, self.renoise = x0, eps, renoise
        self.at = self.raw = self._maps = None

    @classmethod
    def of_output(cls, x: torch.Tensor, raw: torch.Tensor, x0_map: tuple, eps_map: tuple) -> "Prediction":
        """The answer ``raw`` of a network at ``x``, with ``x0 = p x + q raw`` for ``(p, q) = x0_map`` and
        ``eps`` likewise. ``p`` and ``q`` are floats, or tensors that broadcast against ``x`` (one time per
        sample); a map ``(0, 1)`` is ``raw`` itself."""
        self = cls.__new__(cls)
        self._x0 = raw if x0_map is _RAW else None
        self._eps = raw if eps_map is _RAW else None
        self.renoise = None
        self.at, self.raw, self._maps = x, raw, (x0_map, eps_map)
        return self

    @property
    def x0(self) -> torch.Tensor:
        if self._x0 is None:
            self._x0 = _apply(self._maps[0], self.at, self.raw)
        return self._x0

    @property
    def eps(self) -> torch.Tensor:
        if self._eps is None:
            self._eps = _apply(self._maps[1], self.at, self.raw)
        return self._eps

    def __repr__(self) -> str:
        formed = [name for name, value in (("x0", self._x0), ("eps", self._eps)) if value is not None]
        return f"Prediction(formed: {', '.join(formed) or 'none'}{', renoise' if self.renoise is not None else ''})"

    def chunk(self, n: int) -> list["Prediction"]:
        """The answer split in ``n`` along the batch (the passes of one batched network call)."""
        if self._maps is not None and _floats(self._maps):
            return [Prediction.of_output(a, r, *self._maps) for a, r in zip(self.at.chunk(n), self.raw.chunk(n))]
        return [Prediction(x0, eps) for x0, eps in zip(self.x0.chunk(n), self.eps.chunk(n))]

    @staticmethod
    def extrapolate(base: "Prediction", towards: "Prediction", w: float, x: torch.Tensor) -> "Prediction":
        """``base + w (towards - base)`` in both forms, for two answers at the sample ``x`` and one time
        (classifier-free guidance). The forms are linear in the network output, so two answers of one
        network mix their outputs (one kernel) and stay unformed."""
        maps = base._maps
        if maps is not None and towards._maps is not None and _floats(maps) and _floats(towards._maps) \
                and maps == towards._maps:
            return Prediction.of_output(x, torch.lerp(base.raw, towards.raw, w), *maps)
        return Prediction(base.x0 + w * (towards.x0 - base.x0), base.eps + w * (towards.eps - base.eps))

    def with_renoise(self, renoise: torch.Tensor) -> "Prediction":
        """This answer, its forms still unformed where they were, carrying ``renoise`` (CFG++)."""
        other = Prediction.__new__(Prediction)
        for name in Prediction.__slots__:
            setattr(other, name, getattr(self, name))
        other.renoise = renoise
        return other

    def linear_form(self, kind: str):
        """``(p, q)`` floats with ``estimate = p * self.at + q * self.raw`` for the estimate ``kind`` (``"x0"``
        or ``"eps"``) when it has not been computed yet, else ``None`` (use the tensor)."""
        if self._maps is None or (self._x0 if kind == "x0" else self._eps) is not None:
            return None
        pq = self._maps[0] if kind == "x0" else self._maps[1]
        # (spelled out rather than _floats: this runs for every term of every step)
        return pq if type(pq[0]) is float and type(pq[1]) is float else None

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


_RAW = (0.0, 1.0)


def _floats(maps) -> bool:
    """Whether every ``(p, q)`` pair in ``maps`` is Python floats (one time for the batch), not tensors."""
    return all(type(v) is float for pq in maps for v in pq)


def _apply(pq, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """``p x + q raw``."""
    p, q = pq
    if type(p) is float and type(q) is float:
        if p == 0.0:
            return raw * coefficient(q, raw)
        out = torch.mul(x, coefficient(p, x))
        return out.add_(raw, alpha=q) if q != 0.0 else out
    return x * p + raw * q


def _ratio(n, d):
    """``n / d``; NaN (an undefined form) where ``d`` is a float zero, as tensor division gives for tensors."""
    if type(d) is float and d == 0.0:
        return math.nan
    return n / d


def _coefficients(process: Process, t, prediction: str):
    """The process values ``prediction_maps`` needs at ``t``: (alpha, sigma, d_alpha, d_sigma)."""
    derivs = prediction == "velocity"
    return (process.alpha(t), process.sigma(t),
            process.d_alpha(t) if derivs else None, process.d_sigma(t) if derivs else None)


def prediction_maps(prediction: str, a, s, da=None, ds=None) -> tuple[tuple, tuple]:
    """``((p, q), (p', q'))`` with ``x0 = p x + q out`` and ``eps = p' x + q' out`` for a network output ``out``
    of type ``prediction`` at ``x``, where ``x = a x0 + s eps`` (and ``u = da x0 + ds eps`` for a velocity).
    Floats in, floats out; per-sample tensors in, tensors out (the constant entries stay floats)."""
    if prediction == "eps":
        return (_ratio(1.0, a), _ratio(-s, a)), _RAW
    if prediction == "x0":
        return _RAW, (_ratio(1.0, s), _ratio(-a, s))
    if prediction == "v":
        # [x; v] = [[a, s], [-s, a]] [x0; eps]; the determinant is a^2 + s^2 (1 for VP).
        det = a * a + s * s
        return (_ratio(a, det), _ratio(-s, det)), (_ratio(s, det), _ratio(a, det))
    if prediction == "score":
        # score = -eps / s
        return (_ratio(1.0, a), _ratio(s * s, a)), (0.0, -s)
    if prediction == "velocity":
        # [x; u] = [[a, s], [a', s']] [x0; eps]
        det = a * ds - s * da
        return (_ratio(ds, det), _ratio(-s, det)), (_ratio(-da, det), _ratio(a, det))
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def _float_or_broadcast(c, x: torch.Tensor):
    return None if c is None else _broadcast(c, x)


def convert_prediction(out: torch.Tensor, x: torch.Tensor, prediction: str, process: Process,
                       t, coefficients=None) -> Prediction:
    """Turn a network output of type ``prediction`` at ``(x, t)`` into a :class:`Prediction`.

    ``t`` is a float, or a float64 tensor with one time per sample.
    ``coefficients`` may carry ``_coefficients(process, t, prediction)`` computed earlier.
    """
    values = coefficients if coefficients is not None else _coefficients(process, t, prediction)
    maps = prediction_maps(prediction, *(_float_or_broadcast(c, x) for c in values))
    return Prediction.of_output(x, out, *maps)


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
        time and batch shape: networks must treat their inputs as read-only, and return
        a fresh tensor (the answer refers to it until the solver is done with it).
        """
        if type(t) is not float:
            if isinstance(t, torch.Tensor) and t.ndim > 0:
                out = self.fn(x, self.time_input(t).to(device=x.device, dtype=time_dtype(x)), **cond)
                self.nfe += 1
                return self._convert(out, x, t, None)
            t = float(t)
        key = (t, x.shape[0], x.dtype, x.device)
        cached = self._cache.get(key)
        if cached is None:
            # Solvers evaluate at the same few grid times over and over: compute the process
            # values, the time tensor and the prediction's maps there once (a pure memo).
            if len(self._cache) > 4096:
                self._cache.clear()
            coefficients = _coefficients(self.process, t, self.prediction)
            tin = torch.full((x.shape[0],), float(self.time_input(t)), dtype=time_dtype(x), device=x.device)
            maps = prediction_maps(self.prediction, *(None if c is None else float(c) for c in coefficients))
            cached = self._cache[key] = (coefficients, tin, maps)
        coefficients, tin, maps = cached
        out = self.fn(x, tin, **cond) if cond else self.fn(x, tin)
        self.nfe += 1
        if type(out) is torch.Tensor and out.dtype == x.dtype and out.shape == x.shape:
            return Prediction.of_output(x, out, *maps)  # the hot path: no kernel until a form is read
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
