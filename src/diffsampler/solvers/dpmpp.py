"""DPM-Solver++ multistep: 2M, 3M and their SDE forms.

Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095 (Algorithm 2 and the 3M of the authors'
code); the SDE forms are SDE-DPM-Solver++ (same paper, section 5) generalised by
``eta`` as in k-diffusion. All are weight tables over :mod:`.multistep`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Knots
from .expint import dpmpp_weights
from .multistep import LinearMultistep, StepPlan, step_orders

__all__ = ["DPMpp2M", "DPMpp3M", "DPMpp2MSDE", "DPMpp3MSDE", "RESMultistep"]


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
