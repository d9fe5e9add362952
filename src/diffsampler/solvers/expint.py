"""Shared exponential-integrator core (data prediction, log-SNR time).

Writing the probability-flow ODE in ``lambda = log(alpha / sigma)`` and
integrating its linear part exactly gives (Lu et al. 2022b, DPM-Solver++, eq. 9)

    x_{t'} = (sigma'/sigma) x_t + sigma' * integral_{lambda}^{lambda'} e^{l} x0_hat(l) dl.

Freezing ``x0_hat`` over the step gives the first-order step

    x_{t'} = (sigma'/sigma) x_t - alpha' expm1(-h) x0_hat,     h = lambda' - lambda,

which is DDIM (Song et al. 2021) with eta = 0 and DPM-Solver++(1). Higher-order
methods add multiples of differences of ``x0_hat`` to it. The stochastic
generalisation (DDIM's eta) keeps the same mean-reverting form and injects the
variance removed from the deterministic part, see :func:`data_step`.
"""

from __future__ import annotations

import math

from .base import Knots

__all__ = ["data_step"]


def data_step(knots: Knots, i: int, eta: float = 0.0) -> tuple[float, float, float]:
    """Coefficients ``(A, B, C)`` of ``x' = A x + B x0_hat + C z`` from knot ``i`` to ``i + 1``.

    With ``eta = 0`` this is the exact-linear-part first-order step above. For
    ``eta > 0`` it is DDIM's generalised step ``x' = alpha' x0 + sqrt(sigma'^2 -
    c^2) eps + c z`` with ``c = eta * sigma' * sqrt(1 - exp(-2h))``: for any process
    (VP or not) ``c^2`` is ``eta^2`` times the variance of the DDPM posterior
    ``q(x_{t'} | x_t, x0)``, so ``eta = 1`` is ancestral (DDPM) sampling.
    Into ``t' = 0`` (``h = inf``) the step returns ``alpha' x0_hat``.
    """
    a1, s0, s1 = knots.alpha[i + 1], knots.sigma[i], knots.sigma[i + 1]
    h = knots.h(i)
    decay = math.exp(-h)  # = (alpha s1) / (alpha1 s0), the signal-free fraction of x kept
    noise_var_frac = -math.expm1(-2.0 * h)  # 1 - exp(-2h)
    c = eta * s1 * math.sqrt(noise_var_frac)
    keep = math.sqrt(max(0.0, 1.0 - eta * eta * noise_var_frac))  # sqrt(s1^2 - c^2) / s1
    A = keep * s1 / s0
    # B = alpha1 - alpha0 * A = alpha1 (1 - keep e^{-h}), written without cancellation at keep = 1.
    B = a1 * (-math.expm1(-h) + (1.0 - keep) * decay)
    return A, B, c
