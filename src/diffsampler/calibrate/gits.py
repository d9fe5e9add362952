"""GITS: a grid chosen by dynamic programming over a fine teacher grid (Chen et al. 2024).

Chen, Zhou, Ye, Zhu & Lyu, "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML 2024
(arXiv:2405.11326; code: zju-pi/diff-sampler, ``gits-main``). The teacher solves the probability-flow ODE
from the calibration points on a fine grid; the cost of jumping from teacher knot ``i`` to ``j`` is how far
one step lands from the teacher's state at ``j``, averaged over the points; the grid is the cheapest path of
exactly ``steps`` jumps. The paper's jump is an Euler step along the teacher's direction whatever the student;
here it is one step of the student solver itself from the teacher's state (for a multistep solver that is its
first, lower-order step: a fresh step has no history).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..loop import sample
from .base import GridMethod, finish_grid, per_sample_norm, teacher_trajectory
from .dp import shortest_path

__all__ = ["GITS", "local_costs"]


def local_costs(model, teacher, solver, cond: dict) -> torch.Tensor:
    """``cost[i, j]``: mean over the points of ``|one solver step from teacher state i to knot j - teacher state j|``."""
    knots = teacher.knots.tolist()
    n = len(knots)
    cost = torch.full((n, n), float("inf"), dtype=torch.float64)
    for i in range(n - 1):
        for j in range(i + 1, n):
            landed = sample(model, teacher.states[i], [knots[i], knots[j]], solver, **cond)
            cost[i, j] = per_sample_norm(landed - teacher.states[j]).mean()
    return cost


@dataclass(frozen=True)
class GITS(GridMethod):
    """Options of the GITS grid optimiser.

    ``teacher_steps``: intervals of the teacher grid (``teacher_grid``, a name of ``ds.grids``; the paper
    uses 60 of EDM's rho = 7); ``substeps``: reference steps per teacher interval with ``reference`` (a
    deterministic high-order solver); ``coeff``: the DP's weight growth per step (paper: 1.15, 1.20 for
    Stable Diffusion; 1 is the plain sum of the local errors).
    """

    teacher_steps: int = 40
    teacher_grid: str = "karras"
    substeps: int = 4
    reference: str = "dpmpp_3m"
    coeff: float = 1.15

    name = "gits"
    paper = "Chen et al. 2024, arXiv:2405.11326"

    def __post_init__(self):
        self._require_int("teacher_steps", 2)
        self._require_int("substeps", 1)
        self._require(isinstance(self.coeff, (int, float)) and self.coeff > 0, "coeff", "a number > 0")

    def optimise(self, model, x, solver, steps, cond):
        self._require(self.teacher_steps >= steps, "teacher_steps", f"at least the grid's {steps} steps")
        teacher = teacher_trajectory(model, x, self.teacher_steps, self.teacher_grid, self.substeps,
                                     self.reference, cond)
        path = shortest_path(local_costs(model, teacher, solver, cond), steps, coeff=self.coeff)
        return finish_grid(model.process, teacher.knots[path])
