"""Measurement operators ``y = A(x) + n`` for posterior sampling, and the likelihood term ``mu_y``.

An operator maps a batch of samples ``(batch, ...)`` to a batch of measurements ``(batch, ...)``
with differentiable torch operations: :func:`diffsampler.posterior.dps` differentiates it through
the denoiser, :func:`diffsampler.posterior.afdps` at the noisy state. ``linear`` says whether it is
linear; then ``mu_y``'s Laplacian ``tr(A^T A) / sigma_y^2`` is a constant, which AFDPS's normalised
weights do not see, so it is never computed. Any other differentiable callable is accepted as a
general (nonlinear) operator: AFDPS with a reverse-SDE solver then needs ``Laplacian mu_y`` at every
step, taken as the exact autograd trace of the Hessian (one extra backward pass per dimension of the
sample: affordable for toys and 8x8 digits, not for large images).

The Gaussian likelihood ``p(y | x) ∝ exp(-mu_y(x))`` has ``mu_y(x) = |y - A(x)|^2 / (2 sigma_y^2)``,
one number per sample (:func:`mu_y`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.nn import functional as F

__all__ = ["Operator", "Inpaint", "Blur", "Downsample", "Linear", "General", "as_operator", "mu_y",
           "grad_mu_y", "laplacian_mu_y"]


class Operator:
    """A measurement operator: ``op(x) -> measurements`` (batch first) and a ``linear`` flag."""

    linear: bool = False
    name: str = "operator"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class Inpaint(Operator):
    """Keep the pixels where ``mask`` is true (1), drop the others: ``y = mask * x``.

    ``mask`` broadcasts against one sample (e.g. ``(C, H, W)``, ``(H, W)`` or ``(d,)``). The
    measurement keeps the sample's shape, with zeros where nothing is observed (zero residual there,
    whatever the sample), so ``y`` can be built as ``op(x_true) + noise * mask``.
    """

    linear = True

    def __init__(self, mask):
        m = torch.as_tensor(mask)
        if m.dtype == torch.bool:
            m = m.to(torch.float64)
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("Inpaint: mask must hold only 0/1 (or booleans)")
        self.mask = m
        self.name = f"Inpaint(mask {tuple(m.shape)}, {int(m.sum())} observed)"

    def __call__(self, x):
        return x * self.mask.to(device=x.device, dtype=x.dtype)


def _gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = torch.outer(k, k)
    return k / k.sum()


class Blur(Operator):
    """A 2-D convolution of each channel with ``kernel`` (a ``(k, k)`` tensor) or a Gaussian of std
    ``sigma`` and width ``size`` (odd), zero padding, same size out. Samples are ``(batch, C, H, W)``
    or ``(batch, H, W)``."""

    linear = True

    def __init__(self, kernel=None, *, sigma: float | None = None, size: int | None = None):
        if kernel is None:
            if sigma is None or not sigma > 0:
                raise ValueError(f"Blur: give a kernel or sigma > 0, got sigma={sigma!r}")
            size = size if size is not None else 2 * int(math.ceil(3 * sigma)) + 1
            kernel = _gaussian_kernel(float(sigma), int(size))
        k = torch.as_tensor(kernel, dtype=torch.float64)
        if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
            raise ValueError(f"Blur: kernel must be square with an odd side, got {tuple(k.shape)}")
        self.kernel = k
        self.name = f"Blur(kernel {tuple(k.shape)})"

    def __call__(self, x):
        if x.ndim not in (3, 4):
            raise ValueError(f"Blur: samples must be (batch, C, H, W) or (batch, H, W), got {tuple(x.shape)}")
        z = x[:, None] if x.ndim == 3 else x
        c = z.shape[1]
        w = self.kernel.to(device=x.device, dtype=x.dtype).expand(c, 1, *self.kernel.shape)
        out = F.conv2d(z, w, padding=self.kernel.shape[0] // 2, groups=c)
        return out[:, 0] if x.ndim == 3 else out


class Downsample(Operator):
    """Average over ``factor x factor`` blocks of the last two dimensions (super-resolution's operator)."""

    linear = True

    def __init__(self, factor: int):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"Downsample: factor must be an integer >= 1, got {factor!r}")
        self.factor = factor
        self.name = f"Downsample({factor})"

    def __call__(self, x):
        if x.ndim < 3 or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"Downsample({self.factor}): samples must be (batch, ..., H, W) with H and W "
                             f"multiples of {self.factor}, got {tuple(x.shape)}")
        f = self.factor
        *lead, h, w = x.shape
        return x.reshape(*lead, h // f, f, w // f, f).mean(dim=(-3, -1))


class Linear(Operator):
    """``y = M x`` on flattened samples: ``matrix`` is ``(m, d)`` with ``d`` the values per sample."""

    linear = True

    def __init__(self, matrix):
        m = torch.as_tensor(matrix)
        if m.ndim == 1:
            m = m[None]
        if m.ndim != 2 or not m.is_floating_point():
            raise ValueError(f"Linear: matrix must be a floating-point (m, d) tensor, got {tuple(m.shape)} {m.dtype}")
        self.matrix = m
        self.name = f"Linear({m.shape[0]}x{m.shape[1]})"

    def __call__(self, x):
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.matrix.shape[1]:
            raise ValueError(f"{self.name}: samples have {flat.shape[1]} values each, the matrix takes "
                             f"{self.matrix.shape[1]}")
        return flat @ self.matrix.to(device=x.device, dtype=x.dtype).T


class General(Operator):
    """Any callable ``fn(x) -> measurements`` (differentiable torch operations), taken as nonlinear
    unless ``linear=True`` is promised."""

    def __init__(self, fn: Callable, linear: bool = False, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"operator must be callable, got {type(fn).__name__}")
        self.fn, self.linear = fn, bool(linear)
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, x):
        return self.fn(x)


def as_operator(op) -> Operator:
    """An :class:`Operator` from an operator, a matrix (:class:`Linear`) or a callable (:class:`General`)."""
    if isinstance(op, Operator):
        return op
    if isinstance(op, torch.Tensor):
        return Linear(op)
    if callable(op):
        return General(op)
    raise TypeError(f"operator must be a ds.posterior operator (Inpaint, Blur, Downsample, Linear), a matrix or a "
                    f"differentiable callable x -> measurements, got {type(op).__name__}")


def check_sigma_y(sigma_y, who: str) -> float:
    if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float)) or not math.isfinite(sigma_y) \
            or not sigma_y > 0:
        raise ValueError(f"{who}: sigma_y (the measurement noise's standard deviation) must be a number > 0, "
                         f"got {sigma_y!r}")
    return float(sigma_y)


def measurement_shape(op: Operator, x: torch.Tensor, who: str) -> tuple:
    """The shape of one sample's measurement, from the operator applied to the first sample."""
    with torch.no_grad():
        out = op(x[:1])
    if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{who}: operator {op!r} must map a batch of samples to a batch of measurements "
                         f"(batch first); for 1 sample of shape {tuple(x.shape[1:])} it returned {got}")
    return tuple(out.shape[1:])


def broadcast_y(y, op: Operator, x: torch.Tensor, groups: int, who: str, per: str = "group") -> torch.Tensor:
    """``y`` as one measurement per sample ``(batch, *m)``: from one shared measurement ``m`` or one per
    group ``(groups, *m)`` (consecutive ``batch // groups`` samples share it)."""
    m = measurement_shape(op, x, who)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{who}: y must be a tensor (the measurement), got {type(y).__name__}")
    y = y.to(device=x.device, dtype=x.dtype)
    batch = x.shape[0]
    if tuple(y.shape) == m:
        return y.expand(batch, *m)
    if tuple(y.shape) == (groups, *m):
        return y.repeat_interleave(batch // groups, dim=0)
    raise ValueError(f"{who}: y has shape {tuple(y.shape)}, but operator {op!r} gives measurements of shape {m} "
                     f"per sample: y must be one measurement {m} shared by the batch or one per {per} "
                     f"{(groups, *m)}")


def _residual_norm2(op: Operator, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r = (y - op(x)).reshape(x.shape[0], -1)
    return r.square().sum(1)


def mu_y(op: Operator, x: torch.Tensor, y: torch.Tensor, sigma_y: float) -> torch.Tensor:
    """``|y - A(x)|^2 / (2 sigma_y^2)`` per sample, ``(batch,)`` float64 (``y`` one per sample)."""
    return _residual_norm2(op, x, y).to(torch.float64) / (2.0 * sigma_y ** 2)


NOT_DIFFERENTIABLE = ("{who}: operator {op!r} is not differentiable ({what}); it must compute the measurements "
                      "from x with differentiable torch operations (not under torch.no_grad(), from x.detach(), or "
                      "through numpy)")


def _grad(out: torch.Tensor, xg: torch.Tensor, op, who: str, create_graph: bool = False) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise ValueError(NOT_DIFFERENTIABLE.format(who=who, op=op, what="its output does not require grad"))
    (g,) = torch.autograd.grad(out.sum(), xg, allow_unused=True, create_graph=create_graph)
    if g is None:
        raise ValueError(NOT_DIFFERENTIABLE.format(who=who, op=op, what="its output does not depend on x"))
    return g


def call_differentiably(op: Operator, x: torch.Tensor, who: str) -> torch.Tensor:
    """``op(x)`` with ``x`` requiring grad; an operator that cannot be differentiated gets a clear error."""
    try:
        return op(x)
    except RuntimeError as e:  # x.numpy() on a tensor that requires grad, in-place ops on leaves, ...
        if "grad" in str(e) or "numpy" in str(e):
            raise ValueError(NOT_DIFFERENTIABLE.format(who=who, op=op, what=str(e).split("\n")[0])) from e
        raise


def grad_mu_y(op: Operator, x: torch.Tensor, y: torch.Tensor, sigma_y: float, who: str = "afdps"):
    """``(mu_y(x), grad_x mu_y(x))``: the operator's VJP at ``x`` (no network involved)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = call_differentiably(op, xg, who)
        if isinstance(out, torch.Tensor) and out.shape != y.shape:
            raise ValueError(f"{who}: operator {op!r} returned measurements of shape {tuple(out.shape)}, y is "
                             f"{tuple(y.shape)} per batch")
        r2 = (y - out).reshape(x.shape[0], -1).square().sum(1) if isinstance(out, torch.Tensor) else out
        mu = r2 / (2.0 * sigma_y ** 2)
        g = _grad(mu, xg, op, who)
    return mu.detach().to(torch.float64), g.detach()


def laplacian_mu_y(op: Operator, x: torch.Tensor, y: torch.Tensor, sigma_y: float, who: str = "afdps"):
    """``Laplacian_x mu_y(x)`` per sample ``(batch,)``, the exact trace of the Hessian by autograd.

    Cost: one backward pass per dimension of a sample (on the whole batch each). Only nonlinear
    operators need it (for linear ones it is the constant ``tr(A^T A) / sigma_y^2``).
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        r2 = (y - call_differentiably(op, xg, who)).reshape(x.shape[0], -1).square().sum(1)
        g = _grad(r2 / (2.0 * sigma_y ** 2), xg, op, who, create_graph=True).reshape(x.shape[0], -1)
        lap = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for j in range(g.shape[1]):
            if not g.requires_grad:  # the gradient is constant in x: a zero Hessian
                break
            (h,) = torch.autograd.grad(g[:, j].sum(), xg, retain_graph=True, allow_unused=True)
            if h is not None:
                lap += h.reshape(x.shape[0], -1)[:, j].to(torch.float64)
    return lap
