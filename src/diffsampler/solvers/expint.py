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

__all__ = ["data_move", "data_step", "dpmpp_weights", "dpm_solver_weights", "unipc_weights", "ancestral_split",
           "ancestral_split_times"]


def data_move(alpha_a: float, sigma_a: float, alpha_b: float, sigma_b: float) -> tuple[float, float]:
    """``(A, B)`` of the first-order data-prediction move ``x_b = A x_a + B x0_hat`` between any two times.

    ``A = sigma_b / sigma_a`` and ``B = alpha_b - alpha_a sigma_b / sigma_a`` (``alpha_b (1 - e^{-h})``);
    the DDIM step with ``eta = 0`` between knots is :func:`data_step`.
    """
    A = sigma_b / sigma_a
    return A, alpha_b - alpha_a * A


def noise_move(alpha_a: float, sigma_a: float, alpha_b: float, sigma_b: float) -> tuple[float, float]:
    """``(A, B)`` of DDIM's move in the noise estimate ``x_b = A x_a + B eps_hat`` between any two times
    (``alpha_a > 0``): ``A = alpha_b / alpha_a``, ``B = sigma_b - alpha_b sigma_a / alpha_a``."""
    A = alpha_b / alpha_a
    return A, sigma_b - A * sigma_a


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
    if eta == 0.0:  # (run backward, h < 0 and 1 - exp(-2h) < 0: no noise, and no square root of it)
        c, keep = 0.0, 1.0
    else:
        noise_var_frac = -math.expm1(-2.0 * h)  # 1 - exp(-2h)
        c = eta * s1 * math.sqrt(noise_var_frac)
        keep = math.sqrt(max(0.0, 1.0 - eta * eta * noise_var_frac))  # sqrt(s1^2 - c^2) / s1
    A = keep * s1 / s0
    # B = alpha1 - alpha0 * A = alpha1 (1 - keep e^{-h}), written without cancellation at keep = 1.
    B = a1 * (-math.expm1(-h) + (1.0 - keep) * decay)
    return A, B, c


def _lin(*terms):
    """Sum of (weight, vector) pairs, vectors being coefficient lists over (m_i, m_{i-1}, m_{i-2})."""
    out = [0.0, 0.0, 0.0]
    for w, v in terms:
        for k, c in enumerate(v):
            out[k] += w * c
    return out


def _trim(v) -> tuple[float, ...]:
    v = list(v)
    while len(v) > 1 and v[-1] == 0.0:
        v.pop()
    return tuple(v)


def dpmpp_weights(knots: Knots, i: int, order: int, eta: float = 0.0, second_order: str = "midpoint",
                  s_noise: float = 1.0, legacy_third_order: bool = False) -> tuple[float, tuple[float, ...], float]:
    """``(A, P, C)`` of DPM-Solver++ multistep of ``order`` (1 to 3) with SDE strength ``eta``.

    Lu et al. 2022b (arXiv:2211.01095) for ``eta = 0``; the ``eta``-generalised SDE
    form is k-diffusion's (``eta = 1`` is SDE-DPM-Solver++): the sample decays by
    ``(sigma'/sigma) e^{-eta h}``, the data term by ``1 - e^{-(1+eta) h}``, and fresh
    noise of variance ``sigma'^2 (1 - e^{-2 eta h})`` keeps the marginals. The
    second-order term is the "midpoint" or "heun" form of the authors' code; the
    third order uses the divided differences of DPM-Solver++(3M). Into ``t = 0`` the
    step returns the data estimate.

    Third order: ``D2 = (D1_0 - D1_1) / (r0 + r1)`` estimates ``h^2 x0''/2``, while
    the Taylor term of the exact solution is ``-alpha' h^2 phi_3 x0''``; the term is
    therefore ``-2 alpha' phi_3 D2``. The authors' reference code, k-diffusion and
    diffusers all use ``-alpha' phi_3 D2``, which is not exact for a data estimate
    quadratic in lambda and makes their "3M" second order (measured in the tests).
    ``legacy_third_order=True`` reproduces their weight, to match their outputs.
    """
    a1, s0, s1 = knots.alpha[i + 1], knots.sigma[i], knots.sigma[i + 1]
    if s1 == 0.0:
        return 0.0, (a1,), 0.0
    h = knots.h(i)
    eta_h = eta * h if eta > 0 else 0.0  # h is infinite from t = 1 of a flow
    h_eta = h + eta_h
    A = s1 / s0 * math.exp(-eta_h)
    E = -math.expm1(-h_eta)
    P = [a1 * E, 0.0, 0.0]
    phi2 = 1.0 - E / h_eta
    if order >= 2 and i >= 1:
        r0 = knots.h(i - 1) / h
        d1_0 = [1.0 / r0, -1.0 / r0, 0.0]
        if order == 2 or i < 2:
            w = 0.5 * E if second_order == "midpoint" else phi2
            P = _lin((1.0, P), (a1 * w, d1_0))
        else:
            r1 = knots.h(i - 2) / h
            d1_1 = [0.0, 1.0 / r1, -1.0 / r1]
            d1 = _lin((1.0 + r0 / (r0 + r1), d1_0), (-r0 / (r0 + r1), d1_1))
            d2 = _lin((1.0 / (r0 + r1), d1_0), (-1.0 / (r0 + r1), d1_1))
            phi3 = phi2 / h_eta - 0.5
            d2_weight = 1.0 if legacy_third_order else 2.0
            P = _lin((1.0, P), (a1 * phi2, d1), (-d2_weight * a1 * phi3, d2))
    C = s_noise * s1 * math.sqrt(-math.expm1(-2.0 * eta_h)) if eta > 0 else 0.0
    return A, _trim(P), C


def dpm_solver_weights(knots: Knots, i: int, order: int, second_order: str = "midpoint",
                       legacy_third_order: bool = False) -> tuple[float, tuple[float, ...]]:
    """``(A, P)`` of multistep DPM-Solver with noise prediction (Lu et al. 2022a, arXiv:2206.00927).

    ``x' = (alpha'/alpha) x - sigma' (e^h - 1) eps_i`` plus the divided-difference
    terms of orders 2 and 3 (``"midpoint"`` or ``"heun"`` second-order form), over
    ``(eps_i, eps_{i-1}, eps_{i-2})``. As for DPM-Solver++, the exact third-order term
    is ``-2 sigma' psi_3 D2`` with ``psi_3 = (e^h - 1 - h)/h^2 - 1/2`` (``D2`` estimates
    ``h^2 eps''/2``); ``legacy_third_order`` gives the weight 1 of the reference code
    and diffusers. Into ``t = 0`` the step returns the data estimate, written on eps.
    """
    a0, s0 = knots.alpha[i], knots.sigma[i]
    a1, s1 = knots.alpha[i + 1], knots.sigma[i + 1]
    if s1 == 0.0:
        return a1 / a0, (-a1 * s0 / a0,)
    h = knots.h(i)
    em1 = math.expm1(h)
    P = [-s1 * em1, 0.0, 0.0]
    psi2 = em1 / h - 1.0
    if order >= 2 and i >= 1:
        r0 = knots.h(i - 1) / h
        d1_0 = [1.0 / r0, -1.0 / r0, 0.0]
        if order == 2 or i < 2:
            w = 0.5 * em1 if second_order == "midpoint" else psi2
            P = _lin((1.0, P), (-s1 * w, d1_0))
        else:
            r1 = knots.h(i - 2) / h
            d1_1 = [0.0, 1.0 / r1, -1.0 / r1]
            d1 = _lin((1.0 + r0 / (r0 + r1), d1_0), (-r0 / (r0 + r1), d1_1))
            d2 = _lin((1.0 / (r0 + r1), d1_0), (-1.0 / (r0 + r1), d1_1))
            psi3 = (em1 - h) / (h * h) - 0.5
            d2_weight = 1.0 if legacy_third_order else 2.0
            P = _lin((1.0, P), (-s1 * psi2, d1), (-d2_weight * s1 * psi3, d2))
    return a1 / a0, _trim(P)


def unipc_weights(knots: Knots, i: int, order: int, variant: str = "bh2"):
    """UniPC (Zhao et al. 2023, arXiv:2302.04867), data prediction: ``(A, P, K)`` for step ``i``.

    ``P`` are the UniP-``order`` predictor weights over ``(m_i, m_{i-1}, ...)``; ``K``
    the UniC-``order`` corrector weights over the same plus the estimate at the
    step's end (last). ``B(h) = h`` for ``bh1`` and ``expm1(h)`` for ``bh2``. The
    coefficients ``rho`` solve the Vandermonde systems of the paper's Algorithm
    (order 2 predictor and order 1 corrector use the closed form 1/2).
    """
    import numpy as np

    a1, s0, s1 = knots.alpha[i + 1], knots.sigma[i], knots.sigma[i + 1]
    h = knots.h(i)
    hh = -h
    h_phi_1 = math.expm1(hh)
    # An infinitely long step (from t = 1 of a flow, where alpha = 0) makes bh1's B(h) = h
    # diverge; expm1 has the finite limit, so such a step uses bh2's B(h) whatever the variant.
    B_h = hh if variant == "bh1" and math.isfinite(h) else math.expm1(hh)
    rks = [(knots.lam[i - k] - knots.lam[i]) / h for k in range(1, order)] + [1.0]
    b, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1.0
    for j in range(1, order + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R = np.array([[r ** (j - 1) for r in rks] for j in range(1, order + 1)])
    b = np.array(b)
    if order == 1:
        rho_p = []
    elif order == 2:
        rho_p = [0.5]
    else:
        rho_p = list(np.linalg.solve(R[:-1, :-1], b[:-1]))
    rho_c = [0.5] if order == 1 else list(np.linalg.solve(R, b))
    base = -a1 * h_phi_1
    P = [base + a1 * B_h * sum(r / rk for r, rk in zip(rho_p, rks))]
    P += [-a1 * B_h * r / rk for r, rk in zip(rho_p, rks)]
    K = [base + a1 * B_h * (sum(r / rk for r, rk in zip(rho_c[:-1], rks)) + rho_c[-1])]
    K += [-a1 * B_h * r / rk for r, rk in zip(rho_c[:-1], rks)]
    K += [-a1 * B_h * rho_c[-1]]
    return s1 / s0, tuple(float(v) for v in P), tuple(float(v) for v in K)


def ancestral_split(knots: Knots, i: int, eta: float) -> tuple[float, float, float]:
    """Split step ``i`` into a deterministic move to ``t_down`` and fresh noise: ``(t_down, keep, c)``.

    See :func:`ancestral_split_times`.
    """
    return ancestral_split_times(knots.process, knots.t[i], knots.t[i + 1], eta)


def ancestral_split_times(process, t: float, t_next: float, eta: float) -> tuple[float, float, float]:
    """``(t_down, keep, c)`` with ``x_{t_next} = keep * x_{t_down} + c z`` for a step from ``t`` to ``t_next``.

    ``c = min(sigma', eta sigma' sqrt(1 - e^{-2h}))`` is ``eta`` times the DDPM
    posterior's standard deviation (as DDIM's eta), and ``t_down`` the time whose
    marginal, rescaled by ``keep = alpha' / alpha_down``, has the remaining variance
    ``sigma'^2 - c^2``. In EDM coordinates this is k-diffusion's
    ``get_ancestral_step`` (``sigma_down``, ``sigma_up = c / alpha'``); written with
    the process's own alpha and sigma it stays correct for flows.
    """
    a1, s1 = float(process.alpha(t_next)), abs(float(process.sigma(t_next)))
    if s1 == 0.0 or eta == 0.0:
        return t_next, 1.0, 0.0
    h = float(process.lambda_(t_next)) - float(process.lambda_(t))
    c = min(s1, eta * s1 * math.sqrt(-math.expm1(-2.0 * h)))
    rest = math.sqrt(max(0.0, s1 * s1 - c * c))
    if rest == 0.0:
        return 0.0, a1 / float(process.alpha(0.0)), c
    t_down = float(process.t_of_lambda(math.log(a1) - math.log(rest)))
    return t_down, a1 / float(process.alpha(t_down)), c
