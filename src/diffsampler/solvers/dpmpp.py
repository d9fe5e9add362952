"""DPM-Solver++ multistep (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", arXiv:2211.01095), Algorithm 2 (2M)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .base import Knots, Solver
from .expint import data_step

__all__ = ["DPMpp2M"]

# diffusers' rule: below this many steps the final step of a multistep solver is
# taken at first order, which avoids the artefacts of a large last step.
LOWER_ORDER_FINAL_BELOW = 15


class DPMpp2MState(NamedTuple):
    t: tuple[float, ...]
    # per step: (A, B, B_diff): x' = A x + B x0 + B_diff (x0 - x0_prev)
    coef: tuple[tuple[float, float, float], ...]
    x0_prev: Optional[torch.Tensor]


@dataclass(frozen=True)
class DPMpp2M(Solver):
    """DPM-Solver++(2M): data prediction, second-order multistep in log-SNR time.

    ``D = x0_n + (x0_n - x0_{n-1}) / (2 r)`` with ``r = h_{n-1} / h_n``, then the
    first-order exponential step with ``D`` in place of ``x0``. The first step is
    first order (no history yet); a step into ``t = 0`` is first order (it returns
    the data estimate); with ``lower_order_final`` the last step is first order
    on grids of fewer than 15 steps, as in diffusers. Order 2, 1 NFE per step.
    Exact, at any step count, when the data is a single point.
    """

    lower_order_final: bool = True

    name = "dpmpp_2m"
    order = 2
    nfe_per_step = 1
    paper = "Lu et al. 2022, arXiv:2211.01095"

    def __post_init__(self):
        self._require(isinstance(self.lower_order_final, bool), "lower_order_final", "True or False")

    def init(self, knots: Knots, x) -> DPMpp2MState:
        n = len(knots)
        coef = []
        for i in range(n):
            A, B, _ = data_step(knots, i, 0.0)
            first_order = (i == 0 or knots.sigma[i + 1] == 0.0
                           or (self.lower_order_final and i == n - 1 and n < LOWER_ORDER_FINAL_BELOW))
            B_diff = 0.0 if first_order else B * knots.h(i) / (2.0 * knots.h(i - 1))
            coef.append((A, B, B_diff))
        return DPMpp2MState(knots.t, tuple(coef), None)

    def step(self, model, x, i, state, noise):
        A, B, B_diff = state.coef[i]
        x0 = model(x, state.t[i]).x0
        out = torch.mul(x, A).add_(x0, alpha=B + B_diff)
        if B_diff != 0.0:
            out.add_(state.x0_prev, alpha=-B_diff)
        return out, state._replace(x0_prev=x0)
