"""DPM-Solver++ multistep: 2M, 3M and their SDE forms.

Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095 (Algorithm 2 and the 3M of the authors'
code); the SDE forms are SDE-DPM-Solver++ (same paper, section 5) generalised by
``eta`` as in k-diffusion. All are weight tables over :mod:`.multistep`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Knots, NoiseOptions
from .expint import ancestral_split, data_move, dpmpp_weights
from .multistep import LinearMultistep, StepPlan, step_orders

__all__ = ["DPMpp2M", "DPMpp3M", "DPMpp2MSDE", "DPMpp3MSDE", "RESMultistep", "RESMultistepAncestral",
           "res_ancestral_plans"]


@dataclass(frozen=True)
class _DPMppMultistep(LinearMultistep):
    lower_order_final: bool = True

    solver_order = 2
    # Plain class attributes: the deterministic solvers use these values, the SDE and
    # third-order ones redeclare them as options (dataclass fields).
    eta = 0.0
    s_noise = 1.0
    solver_type = "midpoint"
    legacy_third_order = False

    def __post_init__(self):
        self._require(isinstance(self.lower_order_final, bool), "lower_order_final", "True or False")

    def plan(self, knots: Knots):
        orders = step_orders(knots, self.solver_order, "short" if self.lower_order_final else "never")
        for i, k in enumerate(orders):
            A, P, C = dpmpp_weights(knots, i, k, self.eta, self.solver_type, self.s_noise, self.legacy_third_order)
            yield StepPlan(knots.t[i], A, P, C)


@dataclass(frozen=True)
class DPMpp2M(_DPMppMultistep):
    """DPM-Solver++(2M): data prediction, second-order multistep in log-SNR time.

    ``D = x0_n + (x0_n - x0_{n-1}) / (2 r)`` with ``r = h_{n-1} / h_n``, then the
    first-order exponential step with ``D`` in place of ``x0``. The first step is
    first order (no history yet); a step into ``t = 0`` returns the data estimate;
    with ``lower_order_final`` the last step is first order on grids of fewer than
    15 steps, as in diffusers. Order 2, 1 NFE per step. Exact, at any step count,
    when the data is a single point.
    """

    name = "dpmpp_2m"
    order = 2
    nfe_per_step = 1
    paper = "Lu et al. 2022, arXiv:2211.01095"
    solver_order = 2


@dataclass(frozen=True)
class DPMpp3M(_DPMppMultistep):
    """DPM-Solver++(3M): third-order multistep (second order on its second step, midpoint form).

    With ``lower_order_final`` the last two steps drop to orders 1 and 2 on grids
    of fewer than 15 steps (diffusers' rule). 1 NFE per step. The third-order
    weight is the Taylor-exact one (see :func:`.expint.dpmpp_weights`);
    ``legacy_third_order=True`` gives the reference code's, which diffusers and
    k-diffusion ship and which is only second order.

    ``order`` is 3, the order of its steps; ``global_order`` is 2: the first step
    is first order (no history yet, as in every implementation), and its local error
    ``O(h^2)`` caps the whole run at second order once the third-order steps have
    made their own error smaller. At practical step counts the measured slopes
    lie between 2.5 and 3.4 (tests). UniPC's corrector removes exactly that cap.
    """

    legacy_third_order: bool = False

    @property
    def global_order(self) -> int:
        return 2

    name = "dpmpp_3m"
    order = 3
    nfe_per_step = 1
    paper = "Lu et al. 2022, arXiv:2211.01095"
    solver_order = 3


@dataclass(frozen=True)
class DPMpp2MSDE(_DPMppMultistep):
    """SDE-DPM-Solver++(2M) with strength ``eta`` (1 is the paper's SDE; 0 is DPM-Solver++(2M)).

    ``solver_type`` chooses the second-order term: ``"midpoint"`` (k-diffusion's and
    diffusers' default) or ``"heun"``. Noise from the caller's generator, scaled by
    ``s_noise``. Weak order 1 as an SDE solver; 1 NFE per step.
    """

    eta: float = 1.0
    s_noise: float = 1.0
    solver_type: str = "midpoint"
    legacy_third_order: bool = False

    name = "dpmpp_2m_sde"
    order = 1
    nfe_per_step = 1
    paper = "Lu et al. 2022, arXiv:2211.01095 (SDE form as in k-diffusion)"
    solver_order = 2

    def __post_init__(self):
        super().__post_init__()
        self._require_finite_nonneg("eta")
        self._require_finite_nonneg("s_noise")
        self._require(self.solver_type in ("midpoint", "heun"), "solver_type", "'midpoint' or 'heun'")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0 and self.s_noise > 0


@dataclass(frozen=True)
class DPMpp3MSDE(DPMpp2MSDE):
    """SDE-DPM-Solver++(3M) with strength ``eta`` (k-diffusion's ``sample_dpmpp_3m_sde``).

    Its second step uses the ``"heun"`` second-order form, as k-diffusion does.
    Weak order 1 as an SDE solver; 1 NFE per step.
    """

    solver_type: str = "heun"

    name = "dpmpp_3m_sde"
    solver_order = 3


@dataclass(frozen=True)
class RESMultistep(DPMpp2MSDE):
    """RES second-order multistep (Zhang et al. 2023, arXiv:2308.02157; ComfyUI's ``res_multistep``).

    Its update ``x' = e^{-h} x + h (b1 x0_n + b2 x0_{n-1})`` with ``b2 = phi_2(-h) / c2``,
    ``c2 = -h_{n-1} / h``, is DPM-Solver++(2M) with the ``"heun"`` (phi_2) second-order
    term, so it is that weight rule here: ``eta = 0``, no lower-order final step.
    Order 2, 1 NFE per step. (``eta > 0`` gives that rule's SDE form, not ComfyUI's
    ancestral ``res_multistep_ancestral``.)
    """

    eta: float = 0.0
    solver_type: str = "heun"
    lower_order_final: bool = False

    name = "res_multistep"
    order = 2
    paper = "Zhang et al. 2023, arXiv:2308.02157"


def res_ancestral_plans(knots: Knots, eta: float, s_noise: float = 1.0) -> list[StepPlan]:
    """The steps of ComfyUI's ancestral RES multistep (``res_multistep`` with ``eta``), over data estimates.

    Step ``i`` splits into a deterministic move to ``t_down`` and fresh noise
    (:func:`.expint.ancestral_split`: k-diffusion's ``get_ancestral_step`` for VP and EDM). The move is
    RES's second-order update in log-SNR, ``x_down = (sigma_down / sigma) x + alpha_down h (b1 m_i + b2
    m_{i-1})`` with ``h = lambda_down - lambda_i``, ``b1 = phi_1 - phi_2 / c2``, ``b2 = phi_2 / c2`` (of
    ``-h``) and ``c2 = -h_prev / h``, where ``h_prev`` is the length of the previous step's *deterministic
    part* (ComfyUI's ``t_prev - t_old``), not the distance between the knots. The first step, and a move
    into ``sigma_down = 0``, are first order. ``eta = 0`` is :class:`RESMultistep`.
    """
    plans, h_prev = [], None
    for i in range(len(knots)):
        t_down, keep, c = ancestral_split(knots, i, eta)
        p = knots.process
        a0, s0, lam0 = knots.alpha[i], knots.sigma[i], knots.lam[i]
        a_d, s_d = float(p.alpha(t_down)), abs(float(p.sigma(t_down)))
        lam_d = float(p.lambda_(t_down)) if s_d > 0 else math.inf
        h = lam_d - lam0
        c2 = -h_prev / h if h_prev is not None and s_d > 0 and math.isfinite(h) else 0.0
        if c2 == 0.0 or not math.isfinite(c2):
            A, B = data_move(a0, s0, a_d, s_d)
            P = (B,)
        else:
            phi1 = -math.expm1(-h) / h
            phi2 = (1.0 - phi1) / h
            b2 = phi2 / c2
            A, P = s_d / s0, (a_d * h * (phi1 - b2), a_d * h * b2)
        plans.append(StepPlan(knots.t[i], keep * A, tuple(keep * w for w in P), c * s_noise))
        h_prev = h if math.isfinite(h) else None
    return plans


@dataclass(frozen=True)
class RESMultistepAncestral(NoiseOptions, LinearMultistep):
    """Ancestral RES multistep (ComfyUI's ``res_multistep_ancestral``), see :func:`res_ancestral_plans`.

    ``eta = 1`` (default) adds the noise of ancestral sampling at every step, ``s_noise`` scales it;
    ``eta = 0`` is ``res_multistep``. Weak order 1 (order 2 for ``eta = 0``), 1 NFE per step.
    """

    name = "res_multistep_ancestral"
    nfe_per_step = 1
    paper = "Zhang et al. 2023, arXiv:2308.02157 (ComfyUI's ancestral form)"

    @property
    def order(self) -> int:  # type: ignore[override]
        return 2 if self.eta == 0 else 1

    def plan(self, knots: Knots):
        return res_ancestral_plans(knots, self.eta, self.s_noise)
