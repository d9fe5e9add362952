"""Heun++ ("heunpp2"): Heun's method with a third look-ahead stage, as ComfyUI ships it (from
Carzit's sd-webui-samplers-scheduler, MIT).

Each step takes the Euler derivative ``d`` at ``s_i``, an Euler point at ``s_{i+1}`` with its
derivative ``d_2``, a second Euler point at ``s_{i+2}`` with ``d_3``, and moves over ``[s_i, s_{i+1}]``
with ``w_1 d + w_2 d_2 + w_3 d_3``: ``w_2 = s_{i+1} / (3 s_0)``, ``w_3 = s_{i+2} / (3 s_0)``,
``w_1 = 1 - w_2 - w_3`` (``s_0`` the grid's first noise level). The penultimate step uses two stages
(``w_2 = s_{i+1} / (2 s_0)``) and the last step is Euler. The weights are a heuristic, not an order
condition: the method is first order (``d_3`` belongs to the next interval) and leans towards Euler as
the noise falls. 3 evaluations per step, 2 on the penultimate and 1 on the last.

We integrate in the k-diffusion coordinates ``y = x / ode_scale``, ``s = ode_sigma`` as Euler and Heun do,
so on VP and EDM models this is ComfyUI's ``sample_heunpp2``, churn included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .base import Knots
from .karras import KarrasStep, _ChurnedSolver

__all__ = ["HeunPP2"]


class Stage(NamedTuple):
    """A look-ahead point: its time, ``ode_scale``, ``ode_sigma`` and the Euler move from the previous point."""

    t: float
    scale: float
    s: float
    ds: float


class HeunPP2Step(NamedTuple):
    churn: KarrasStep
    stages: tuple[Stage, ...]       # the points at s_{i+1} (and s_{i+2}) where d_2 (and d_3) are taken
    weights: tuple[float, ...]      # dt * (w_1, w_2[, w_3]): the step's weights of d, d_2, d_3


class HeunPP2State(NamedTuple):
    steps: tuple[HeunPP2Step, ...]


@dataclass(frozen=True)
class HeunPP2(_ChurnedSolver):
    """Heun++ (ComfyUI's ``heunpp2``), with EDM churn. Order 1, 3 NFE per step (2 on the penultimate
    step, 1 on the last)."""

    name = "heunpp2"
    order = 1
    nfe_per_step = 3
    paper = "ComfyUI's heunpp2 (Carzit, sd-webui-samplers-scheduler), after Karras et al. 2022"

    @classmethod
    def run_nfe(cls, steps: int, into_zero: bool = False) -> int:
        # Euler on the last step and two stages on the penultimate, whatever the grid's end.
        return 3 * steps - 3 if steps >= 2 else steps

    def init(self, knots: Knots, x) -> HeunPP2State:
        churn = super().init(knots, x).steps
        # the grid's first (largest) noise level; a grid run backward (inversion) starts at its smallest
        n, s_first = len(knots), max(knots.s[0], knots.s[-1])
        steps = []
        for i, st in enumerate(churn):
            dt = st.s_next - st.s_hat
            look = min(n - 1 - i, 2)  # 0 on the last step, 1 on the penultimate, else 2
            stages, weights = [], [dt]
            if look:
                stages.append(Stage(st.t_next, st.scale_next, st.s_next, dt))
                if look == 2:
                    stages.append(Stage(knots.t[i + 2], knots.scale[i + 2], knots.s[i + 2],
                                        knots.s[i + 2] - st.s_next))
                w = [p.s / ((look + 1) * s_first) for p in stages]
                weights = [dt * (1.0 - sum(w))] + [dt * v for v in w]
            steps.append(HeunPP2Step(st, tuple(stages), tuple(weights)))
        return HeunPP2State(tuple(steps))

    def step(self, model, x, i, state, noise):
        plan = state.steps[i]
        st = plan.churn
        x = self._churn(x, i, st, noise)
        y = x / st.scale_hat
        d = (y - model(x, st.t_hat).x0) / st.s_hat
        out = y.add(d, alpha=plan.weights[0])
        point = y
        for stage, w in zip(plan.stages, plan.weights[1:]):
            point = point.add(d, alpha=stage.ds)
            d = (point - model(point * stage.scale, stage.t).x0) / stage.s
            out = out.add_(d, alpha=w)
        return out * st.scale_next, state
