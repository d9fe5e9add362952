"""Approximation-free ensemble posterior sampling (AFDPS; Chen, Ren, Min, Ying & Izzo 2025, "Solving
Inverse Problems via Diffusion-Based Priors: An Approximation-Free Ensemble Sampling Approach",
arXiv:2506.03979), on the particle core of :mod:`diffsampler.steering`.

The particles follow the intermediate targets ``Q_s(x) = p_s(x) exp(-mu_y(x))``, ``p_s`` the model's
marginal at generative time ``s`` and ``mu_y(x) = |y - A(x)|^2 / (2 sigma_y^2)`` applied to the
*current noisy state* (no data estimate, so no network gradient); at ``t = 0`` ``Q`` is the posterior.
If ``p_s`` follows drift ``c`` and noise ``V``, then ``Q`` follows (METHODS.md 3.6)::

    particles:  dx = (c - V^2 grad mu_y) ds + V dW
    weights:    dlog w = [-c . grad mu_y - (V^2/2) Lap mu_y + (V^2/2) |grad mu_y|^2] ds
    c = -f + ((g^2 + V^2)/2) grad log p

``V`` is the solver's noise: a reverse-SDE kernel (``ddpm``, ``euler_ancestral``, ...) is ``V = g``, a
deterministic solver ``V = 0`` (the probability-flow ODE).

Discretisation, for ``x_t = alpha x0 + sigma eps`` (``f = (dlog alpha/dt) x``, ``g^2 = -2 sigma^2
dlambda/dt``) over a step ``i -> i+1`` of log-SNR size ``h``, with the score ``s = -eps/sigma`` of the
step's own first evaluation (kept and reused by the step: the weights cost no network evaluation):

* ``-f ds`` integrates exactly to ``log(alpha_{i+1}/alpha_i) x``;
* ``g^2 ds`` with the score frozen at the step's start integrates to ``G = sigma_i^2 (1 - exp(-2h))``:
  exactly the coefficient of the score in DDPM's step ``x_next = (alpha_{i+1}/alpha_i)(x + G s) + noise``,
  equal to ``2 sigma_i^2 h`` to first order and finite on the last step into ``t = 0``, where ``h`` is
  infinite (there ``G = sigma_i^2``; a frozen *noise estimate* would make that step's weight infinite);
* ``V = g``: the score is shifted, ``s - grad mu_y(x)`` (``eps' = eps + sigma grad mu_y``), so the
  solver's own step is the guided SDE, and the weight increment is
  ``-(log(alpha_{i+1}/alpha_i) x + G s) . grad mu_y + (G/2)(|grad mu_y|^2 - Lap mu_y)`` (Euler in the
  weights, first order in the step);
* ``V = 0``: the particles follow the plain ODE (``c`` transports ``p_s`` itself), and along that path
  ``-c . grad mu_y ds = -d mu_y(x_s)``: the weight increment is ``-(mu_y(x_{i+1}) - mu_y(x_i))``, exact
  along the discrete path (``weights="telescoping"``, the default: measured far more accurate than the
  Euler form ``-(log(alpha_{i+1}/alpha_i) x + (G/2) s) . grad mu_y``, ``weights="euler"``). With
  resampling the copies of a particle never part under an ODE: V = 0 is importance sampling of the ODE's
  samples by the likelihood, with resampling only pruning them.

``Lap mu_y`` is the constant ``tr(A^T A)/sigma_y^2`` for linear operators, which normalised weights
do not see: it is computed (as an exact autograd Hessian trace) only for nonlinear operators with
``V = g``. The start is ``p_T exp(-mu_y)`` by weights: ``log w_0 = -mu_y(x_T)``, for any operator.
Resampling is ESS-adaptive, the weights accumulated between resamplings.
"""

from __future__ import annotations

import math

import torch

from .. import solvers as _solvers
from ..denoiser import Prediction, _broadcast
from ..guidance.base import DenoiserTransform
from ..loop import Run
from ..steering.particles import Population, SteeringResult, require_reverse_sde
from ..steering.resample import get_resampler
from .operators import as_operator, broadcast_y, check_sigma_y, grad_mu_y, laplacian_mu_y, mu_y

__all__ = ["afdps"]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.reshape(a.shape[0], -1).to(torch.float64) * b.reshape(b.shape[0], -1).to(torch.float64)).sum(1)


class _ShiftedScore(DenoiserTransform):
    """The model with its score shifted by ``-grad mu_y(x)`` at the noisy ``x``: ``eps' = eps + sigma grad mu_y``.

    Keeps, for the last evaluation, ``(x, unshifted prediction, grad mu_y)`` for the weights."""

    def __init__(self, model, op, sigma_y: float):
        super().__init__(model)
        self.op, self.sigma_y = op, sigma_y
        self.ys: torch.Tensor | None = None
        self.last: tuple | None = None

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        pred = self.model(x, t, **cond)
        _, g = grad_mu_y(self.op, x, self.ys, self.sigma_y)
        alpha = self.process.alpha(t)
        if not bool(torch.all(torch.as_tensor(alpha) > 0)):
            raise ValueError(f"afdps: with a reverse-SDE solver the shifted data estimate is undefined where "
                             f"alpha(t) = 0 (t = {t}, pure noise of {self.process!r}); start the grid below it")
        sigma, alpha = _broadcast(self.process.sigma(t), x), _broadcast(alpha, x)
        eps = pred.eps + sigma * g.to(pred.eps.dtype)
        self.last = (x, pred, g)
        return Prediction((x - sigma * eps) / alpha, eps)

    def at(self, x: torch.Tensor):
        if self.last is None or self.last[0] is not x:
            raise RuntimeError("afdps: no evaluation at this sample to take the weights from")
        return self.last[1], self.last[2]


def _g2(knots, i: int) -> float:
    """``int g^2 ds`` over step ``i`` with the score frozen: ``sigma_i^2 (1 - exp(-2h))`` (DDPM's coefficient)."""
    h = knots.lam[i + 1] - knots.lam[i]
    return knots.sigma[i] ** 2 * (-math.expm1(-2.0 * h)) if math.isfinite(h) else knots.sigma[i] ** 2


def _log_alpha_ratio(knots, i: int) -> float:
    a0, a1 = knots.alpha[i], knots.alpha[i + 1]
    if not (a0 > 0 and a1 > 0):
        raise ValueError(f"afdps: the Euler weights need alpha > 0 at both ends of step {i} (t = {knots.t[i]:.6g} "
                         f"-> {knots.t[i + 1]:.6g}); start the grid below the pure-noise end, or use "
                         f"weights='telescoping' with a deterministic solver")
    return math.log(a1 / a0)


@torch.no_grad()  # gradient-free in the network: only the operator is differentiated
def afdps(model, x: torch.Tensor, grid, solver, *, y: torch.Tensor, operator, sigma_y: float, particles: int,
          generator=None, ess_threshold: float | None = 0.5, resampler="systematic", weights: str | None = None,
          brownian: bool = False, **cond) -> SteeringResult:
    """Sample the posterior of ``y = operator(x) + N(0, sigma_y^2 I)`` with AFDPS (weighted particles).

    Parameters
    ----------
    model, x, grid:
        As for :func:`diffsampler.sample`; ``x`` is a draw of the prior at ``grid[0]``.
    solver:
        The particles' kernel, which sets ``V``: a reverse-SDE kernel (``ddpm``, ``euler_ancestral``,
        ``dpmpp_2m_sde``, ... at ``eta = 1``; ``V = g``) or a deterministic solver (``V = 0``).
    y:
        The measurement: one (the operator's output for one sample) shared by the batch, or one per
        population ``(groups, ...)``.
    operator:
        A ``ds.posterior`` operator, a matrix or a differentiable callable ``x -> measurements``.
    sigma_y:
        The measurement noise's standard deviation (> 0), in the data's units.
    particles:
        Population size; groups of that many consecutive samples are one population each.
    ess_threshold:
        Resample a population when its ESS falls below ``ess_threshold * particles``; ``None``
        resamples every step but the last.
    resampler:
        ``"systematic"``, ``"multinomial"``, ``"stratified"``, ``"residual"`` or a callable.
    weights:
        ``V = 0`` only: ``"telescoping"`` (default, exact along the path) or ``"euler"``.
    generator:
        Every random draw (the solver's noise, the resampling) comes from it.

    Returns a :class:`~diffsampler.steering.SteeringResult`: estimate the posterior with ``x`` and
    ``exp(log_weights)``; ``rewards`` is each final particle's log-likelihood ``-mu_y(x)``, ``best`` the
    most likely particle of each population.
    """
    sigma_y = check_sigma_y(sigma_y, "afdps")
    solver = _solvers.resolve(solver)
    level = require_reverse_sde(solver, "afdps", ode=True)
    if weights is None:
        weights = "euler" if level == "reverse_sde" else "telescoping"
    if weights not in ("euler", "telescoping") or (level == "reverse_sde" and weights != "euler"):
        allowed = "'euler'" if level == "reverse_sde" else "'telescoping' or 'euler'"
        raise ValueError(f"afdps: weights must be {allowed} with solver {solver.name!r}, got {weights!r}")
    if ess_threshold is not None and not (isinstance(ess_threshold, (int, float)) and 0 < ess_threshold <= 1):
        raise ValueError(f"afdps: ess_threshold must be None or a number in (0, 1], got {ess_threshold!r}")
    resampler = get_resampler(resampler)
    op = as_operator(operator)
    shifted = level == "reverse_sde"
    net = _ShiftedScore(model, op, sigma_y) if shifted else model
    run = Run(net, x, grid, solver, generator=generator, brownian=brownian, **cond).watch()
    pop = Population("afdps", run, None, particles, generator)
    ys = broadcast_y(y, op, x, pop.groups, "afdps")
    if shifted:
        net.ys = ys
    nonlinear = not op.linear
    knots, steps = run.knots, len(run)

    mu_prev = mu_y(op, run.x, ys, sigma_y) if weights == "telescoping" else None
    log_w = -mu_y(op, run.x, ys, sigma_y) if mu_prev is None else -mu_prev  # the start p_T exp(-mu_y)
    while not run.done:
        i = run.i
        if weights == "euler":
            if shifted:
                run.evaluate()  # the step's own first evaluation, kept for it: the weights read its score
                pred, g = net.at(run.x)
            else:
                pred = run.evaluate()
                _, g = grad_mu_y(op, run.x, ys, sigma_y)
            big_g = _g2(knots, i)
            score = -pred.eps / knots.sigma[i]
            k = 1.0 if shifted else 0.5  # (g^2 + V^2) / 2 over g^2
            drift = _log_alpha_ratio(knots, i) * run.x + (k * big_g) * score
            increment = -_dot(drift, g)
            if shifted:
                increment = increment + 0.5 * big_g * _dot(g, g)
                if nonlinear:
                    increment = increment - 0.5 * big_g * laplacian_mu_y(op, run.x, ys, sigma_y)
            log_w = log_w + increment
        elif i > 0:
            mu_now = mu_y(op, run.x, ys, sigma_y)
            log_w = log_w - (mu_now - mu_prev)
            mu_prev = mu_now
        if not bool(torch.isfinite(log_w).all() and torch.isfinite(run.x).all()):
            raise FloatingPointError(
                f"afdps: non-finite particles or weights at step {i} (t = {knots.t[i]:.6g}): the guidance "
                f"-V^2 grad mu_y is explicit and unstable where sigma^2 h |grad^2 mu_y| is above about 1 (a stiff "
                f"or steep likelihood, a small sigma_y); use more steps")
        if i < steps - 1:
            indices, chosen = pop.resample(resampler, log_w, ess_threshold)
            if indices is not None:
                run.take(indices)
                log_w = torch.where(chosen, 0.0, log_w)[indices]
                if mu_prev is not None:
                    mu_prev = mu_prev[indices]
        run.step()
    final_mu = mu_y(op, run.x, ys, sigma_y)
    if weights == "telescoping":
        log_w = log_w - (final_mu - mu_prev)
    return pop.result(log_w, -final_mu, run.sample_evaluations)
