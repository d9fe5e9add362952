"""Diffusion posterior sampling (DPS; Chung, Kim, McCann, Klasky & Ye 2023, "Diffusion Posterior
Sampling for General Noisy Inverse Problems", ICLR 2023, arXiv:2209.14687).

Each step is the solver's (DDPM's by default) followed by a gradient step on the *unsquared*
residual norm of the data estimate: ``x_next = step(x) - scale * grad_x |y - A(x0_hat(x))|``, as
the authors' code (``condition_methods.py``: ``norm = torch.linalg.norm(difference)``). The norm is
not squared, which equals the paper's ``zeta' / |r|`` step on ``|r|^2`` up to a factor 2.

Where we differ: the authors' norm runs over the whole batch, so a sample's step depends on the other
samples of its batch (a large residual elsewhere shrinks its step). Here each sample takes the
gradient of its own norm (``per_sample=True``); ``per_sample=False`` reproduces the batch-coupled
norm. DPS is an approximation (the likelihood is taken at the data estimate, and ``scale`` replaces
the noise level): it does not sample the posterior, even with the exact denoiser; tests measure its
bias on a Gaussian mixture (METHODS.md 3.7).
"""

from __future__ import annotations

import math

import torch

from ..loop import Run
from .operators import as_operator, broadcast_y, call_differentiably, check_sigma_y, NOT_DIFFERENTIABLE

__all__ = ["dps"]


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"dps: scale (the step zeta on the residual norm's gradient) must be a number >= 0, "
                         f"got {scale!r}")
    return float(scale)


def residual_gradient(model, x: torch.Tensor, t, y: torch.Tensor, op, per_sample: bool, cond: dict,
                      evaluate=None):
    """``(prediction, grad_x |y - A(x0_hat(x))|)``: one network evaluation with its VJP.

    The gradient goes through the denoiser and the operator; only ``x`` is differentiated (the network's
    parameters get no ``.grad``), and no graph survives: both results are detached. ``evaluate`` (a
    ``Run``'s) evaluates the model so that the solver's step reuses the answer.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        pred = evaluate(xg) if evaluate is not None else model(xg, t, **cond)
        x0 = pred.x0
        if not x0.requires_grad:
            raise ValueError("dps: the model's data estimate has no gradient path to x (the network runs under "
                             "torch.no_grad() or detaches its input); DPS differentiates through the denoiser")
        out = call_differentiably(op, x0, "dps")
        if not isinstance(out, torch.Tensor) or out.shape != y.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"dps: operator {op!r} returned measurements of shape {got}, y is {tuple(y.shape)}")
        if not out.requires_grad:
            raise ValueError(NOT_DIFFERENTIABLE.format(who="dps", op=op, what="its output does not require grad"))
        r = (y - out).reshape(x.shape[0], -1)
        norm = torch.linalg.vector_norm(r, dim=1).sum() if per_sample else torch.linalg.vector_norm(r)
        (g,) = torch.autograd.grad(norm, xg, allow_unused=True)
        _drop_graph(pred)
        if g is None:
            raise ValueError(NOT_DIFFERENTIABLE.format(who="dps", op=op, what="its output does not depend on x"))
    return pred, g.detach()


def _drop_graph(pred) -> None:
    # The answer is shared with the Run (the step reuses it): cut its tensors from the graph in place,
    # so that no solver state (multistep history) keeps the network's activations alive.
    for name in ("raw", "_x0", "_eps", "renoise"):
        v = getattr(pred, name, None)
        if isinstance(v, torch.Tensor) and v.grad_fn is not None:
            v.detach_()


@torch.no_grad()  # the only gradient is the local VJP of each step
def dps(model, x: torch.Tensor, grid, *, y: torch.Tensor, operator, sigma_y: float, scale: float,
        generator=None, per_sample: bool = True, solver="ddpm", **cond) -> torch.Tensor:
    """Sample the posterior of ``y = operator(x) + n`` approximately with DPS; return the final samples.

    Parameters
    ----------
    model, x, grid:
        As for :func:`diffsampler.sample`: a Denoiser, a draw of the prior at ``grid[0]``, the times.
    y:
        The measurement: one (``operator``'s output for one sample) shared by the batch, or one per
        sample ``(batch, ...)``.
    operator:
        A ``ds.posterior`` operator (:class:`Inpaint`, :class:`Blur`, :class:`Downsample`,
        :class:`Linear`), a matrix, or any differentiable callable ``x -> measurements``.
    sigma_y:
        The measurement noise's standard deviation (in the data's units, e.g. 0.05 in [-1, 1] as the
        authors'). Checked (> 0) but **not used**: DPS's step has no noise level, ``scale`` plays its role.
    scale:
        The step ``zeta`` on the gradient of the unsquared residual norm (authors: 0.3 to 1.0 at 1000
        DDPM steps on images; it scales with the step count).
    per_sample:
        Each sample's own norm (default); ``False`` reproduces the authors' norm over the whole batch.
    solver:
        The step the gradient is added to (the authors': DDPM, ``"ddpm"``).
    generator:
        The solver's random draws.

    Cost: one network evaluation and one VJP through it per step.
    """
    if not isinstance(per_sample, bool):
        raise TypeError(f"dps: per_sample must be True or False, got {per_sample!r}")
    check_sigma_y(sigma_y, "dps")
    scale = _check_scale(scale)
    op = as_operator(operator)
    run = Run(model, x, grid, solver, generator=generator, **cond).watch()
    ys = broadcast_y(y, op, x, x.shape[0], "dps", per="sample")

    def evaluate(xg):
        run.x = xg  # the step then reuses this evaluation (same point, same time): no extra NFE
        return run.evaluate()

    while not run.done:
        _, g = residual_gradient(model, run.x, run.t, ys, op, per_sample, cond, evaluate)
        x_next = run.step() - scale * g
        run.x = x_next.detach()
    return run.x
