"""DPM-Solver-12 and DPM-Solver-23 with adaptive step size (Lu et al. 2022, "DPM-Solver: A Fast ODE
Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps", arXiv:2206.00927, section 3.4 and
Algorithm 4), as k-diffusion's ``sample_dpm_adaptive`` ships it: an embedded pair of singlestep
noise-prediction methods in log-SNR, the lower order's result as the error estimate, and a PID step-size
controller (Söderlind's, with the ``1 + atan(x - 1)`` limiter).

Each attempt from log-SNR ``l_s`` over ``h`` evaluates the noise estimate at ``l_s`` and at the stages
of DPM-Solver-3 (``r = 1/3, 2/3``; order 3) or DPM-Solver-2 (``r = 1/2``; order 2); the pair (2, 3) or
(1, 2) gives two results ``x_low``, ``x_high`` and the error ``||(x_low - x_high) / max(atol, rtol
max(|x_low|, |x_prev|))||_rms`` in the k-diffusion coordinates ``x / ode_scale``. The controller accepts
the attempt when its factor reaches ``accept_safety`` and scales ``h`` by that factor either way.

Unlike k-diffusion, which controls one step size for the whole batch (a sample then depends on the
batch it is drawn in), every sample has its own log-SNR, step size, controller history and error: the
batch is evaluated at per-sample times and a sample that has reached the end of an interval waits
(its evaluations are discarded). For a batch of one the two agree.

The grid's knots are where the integration must pass (with ``[t_max, t_min]`` it is k-diffusion's
sampler); the controller's step size carries over from one interval to the next. An interval into
``t = 0`` (infinite log-SNR) returns the data estimate (one evaluation); an interval from ``t = 1`` of a
flow (``alpha = 0``, log-SNR ``-inf``) is one DDIM step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .base import Knots, Solver
from .expint import data_step

__all__ = ["DPMAdaptive"]

# k-diffusion's tolerance on reaching an interval's end (in log-SNR)
_END_TOLERANCE = 1e-5
# Attempts allowed in one grid interval before we call the integration stuck.
_MAX_ATTEMPTS = 100_000


class AdaptiveState(NamedTuple):
    knots: Knots
    h: Optional[torch.Tensor]          # per-sample step size in log-SNR (float64)
    errs: Optional[torch.Tensor]       # per-sample controller history, shape (batch, 3): inverse errors (batch first, as in every state)
    y_prev: Optional[torch.Tensor]     # the last accepted low-order result, in x / ode_scale


@dataclass(frozen=True)
class DPMAdaptive(Solver):
    """Adaptive DPM-Solver-23 (``order=3``) or -12 (``order=2``) with ``rtol``, ``atol``, ``h_init`` and
    the PID coefficients of k-diffusion's ``sample_dpm_adaptive`` (defaults equal). The number of
    network evaluations follows from the tolerances: 3 (order 3) or 2 (order 2) per attempt."""

    order: int = 3
    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    accept_safety: float = 0.81

    name = "dpm_adaptive"
    nfe_per_step = 3
    adaptive = True
    paper = "Lu et al. 2022, arXiv:2206.00927 (DPM-Solver-12/23 with adaptive steps, as in k-diffusion)"

    def __post_init__(self):
        self._require(self.order in (2, 3), "order", "2 or 3")
        for option in ("rtol", "atol", "pcoeff", "icoeff", "dcoeff"):
            self._require_finite_nonneg(option)
        self._require(self.rtol > 0 or self.atol > 0, "rtol", "rtol > 0 or atol > 0")
        self._require(isinstance(self.h_init, (int, float)) and math.isfinite(self.h_init) and self.h_init > 0,
                      "h_init", "a finite number > 0")
        self._require(isinstance(self.accept_safety, (int, float)) and 0 < self.accept_safety <= 1,
                      "accept_safety", "a number in (0, 1]")

    @property
    def global_order(self) -> int:
        return self.order

    @classmethod
    def run_nfe(cls, steps: int, into_zero: bool = False) -> int:
        raise NotImplementedError("dpm_adaptive spends what its tolerances ask: count with Denoiser.nfe")

    def init(self, knots: Knots, x: torch.Tensor) -> AdaptiveState:
        return AdaptiveState(knots, None, None, None)

    def step(self, model, x, i, state, noise):
        kn = state.knots
        lam_s, lam_t = kn.lam[i], kn.lam[i + 1]
        if math.isinf(lam_t) or math.isinf(lam_s):
            # into t = 0: the data estimate; from alpha = 0: DDIM's step (log-SNR steps are unbounded)
            A, B, _ = data_step(kn, i)
            out = model(x, kn.t[i]).x0.mul(B)
            if A != 0.0:
                out.add_(x, alpha=A)
            return out, state
        proc, batch = kn.process, x.shape[0]
        f64 = dict(dtype=torch.float64, device=x.device)
        h = state.h if state.h is not None else torch.full((batch,), float(self.h_init), **f64)
        errs = state.errs
        y_prev = state.y_prev if state.y_prev is not None else x / kn.scale[i]
        lam = torch.full((batch,), lam_s, **f64)
        view = (batch,) + (1,) * (x.ndim - 1)

        def at(mu):
            """Times and (alpha, sigma, ode_scale) at per-sample log-SNRs, shaped to broadcast over x."""
            t = proc.t_of_lambda(mu)
            return t, *(v.reshape(view).to(x.dtype) for v in (proc.alpha(t), proc.sigma(t).abs(), proc.ode_scale(t)))

        order = self.order
        b1 = (self.pcoeff + self.icoeff + self.dcoeff) / order
        b2 = -(self.pcoeff + 2 * self.dcoeff) / order
        b3 = self.dcoeff / order
        for _ in range(_MAX_ATTEMPTS):
            active = lam < lam_t - _END_TOLERANCE
            if not bool(active.any()):
                return x, state._replace(h=h, errs=errs, y_prev=y_prev)
            lam_next = torch.minimum(lam + h, torch.full_like(lam, lam_t))
            step = torch.where(active, lam_next - lam, torch.ones_like(lam))  # finished samples: a dummy step
            t0, a0, s0, _ = at(lam)
            t1, a1, s1, c1 = at(lam + step)
            hh = step.reshape(view).to(x.dtype)
            eps0 = model(x, t0).eps
            first = x * (a1 / a0) - eps0 * (s1 * torch.expm1(hh))  # DPM-Solver-1
            if order == 2:
                tm, am, sm, _ = at(lam + step / 2)
                um = x * (am / a0) - eps0 * (sm * torch.expm1(hh / 2))
                x_low = first
                x_high = first - (model(um, tm).eps - eps0) * (s1 * torch.expm1(hh))
            else:
                ta, aa, sa, _ = at(lam + step / 3)
                tb, ab, sb, _ = at(lam + 2 * step / 3)
                ua = x * (aa / a0) - eps0 * (sa * torch.expm1(hh / 3))
                d1 = model(ua, ta).eps - eps0
                x_low = first - d1 * (s1 * torch.expm1(hh) * 1.5)  # DPM-Solver-2 with r1 = 1/3
                phi = torch.expm1(2 * hh / 3) / (2 * hh / 3) - 1
                ub = x * (ab / a0) - eps0 * (sb * torch.expm1(2 * hh / 3)) - d1 * (sb * 2 * phi)
                d2 = model(ub, tb).eps - eps0
                x_high = first - d2 * (s1 * (torch.expm1(hh) / hh - 1) * 1.5)  # DPM-Solver-3
            y_low, y_high = x_low / c1, x_high / c1
            delta = torch.maximum(torch.full_like(y_low, self.atol),
                                  self.rtol * torch.maximum(y_low.abs(), y_prev.abs()))
            error = ((y_low - y_high) / delta).flatten(1).to(torch.float64).pow(2).mean(1).sqrt()
            if not bool(torch.isfinite(error[active]).all()):
                from ..loop import NonFiniteError
                raise NonFiniteError(i, kn.t[i], kn.t[i + 1], self.name)
            inverse = 1.0 / (error + 1e-8)
            errs = inverse[:, None].expand(batch, 3).clone() if errs is None else errs.clone()
            errs[:, 0] = torch.where(active, inverse, errs[:, 0])
            factor = errs[:, 0] ** b1 * errs[:, 1] ** b2 * errs[:, 2] ** b3
            factor = 1.0 + torch.atan(factor - 1.0)
            accept = active & (factor >= self.accept_safety)
            errs[:, 2] = torch.where(accept, errs[:, 1], errs[:, 2])
            errs[:, 1] = torch.where(accept, errs[:, 0], errs[:, 1])
            h = torch.where(active, h * factor, h)
            keep = accept.reshape(view)
            x = torch.where(keep, x_high, x)
            y_prev = torch.where(keep, y_low, y_prev)
            lam = torch.where(accept, lam_next, lam)
        raise RuntimeError(f"{self.name}: step {i} (t = {kn.t[i]:.6g} -> {kn.t[i + 1]:.6g}) did not reach its end "
                           f"in {_MAX_ATTEMPTS} attempts; loosen rtol/atol")
