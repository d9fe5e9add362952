"""OSS: optimal stepsize by dynamic programming against the teacher's states (Pei et al. 2025).

Pei, Hu & Gu, "Optimal Stepsize for Diffusion Sampling", arXiv:2503.21774 (code: bebebe666/OptimalSteps).
Unlike GITS, the student's own state is carried along the DP: for each point, the value of teacher knot
``j`` after ``k + 1`` steps is the squared error to the teacher at ``j`` of one student step from the best
state that reached a knot ``i < j`` in ``k`` steps, and that landed state is what the next layer steps from.
Keeping only the best state per knot makes this an approximation of the best path (the paper's), exact when
a smaller error at a knot never leads to a larger one later. Each point gets its path; the grid takes the
median knot index at every position (the paper's ``cal_medium``), which stays strictly increasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..loop import sample
from .base import GridMethod, finish_grid, teacher_trajectory
from .dp import layered_path

__all__ = ["OSS", "per_sample_paths"]


def per_sample_paths(model, teacher, solver, steps: int, cond: dict) -> torch.Tensor:
    """The OSS path of every calibration point, ``(batch, steps + 1)`` teacher-knot indices."""
    knots = teacher.knots.tolist()
    n = len(knots)
    target = teacher.states                              # (n, batch, ...)
    batch = target.shape[1]
    # landed[i, j]: one student step from the state kept at knot i to knot j (for the current layer)
    landed = torch.zeros((n, n, *target.shape[1:]), dtype=target.dtype)
    carried = target                                     # layer 0: only knot 0 (the start points) is reached
    knot_index = torch.arange(n)[:, None]
    point_index = torch.arange(batch)[None, :]

    def candidates(k, value, parent):
        nonlocal carried
        if parent is not None:
            # each point's state at knot j is the one its best predecessor's step landed on
            carried = landed[parent.T, knot_index, point_index]
        reachable = torch.isfinite(value.expand(batch, n))
        cand = torch.full((batch, n, n), float("inf"), dtype=torch.float64)
        for i in range(n - 1):
            if not bool(reachable[:, i].any()):
                continue
            for j in range(i + 1, n):
                y = sample(model, carried[i], [knots[i], knots[j]], solver, **cond)
                landed[i, j] = y
                err = (y - target[j]).to(torch.float64).reshape(batch, -1).pow(2).mean(dim=1)
                cand[:, i, j] = torch.where(reachable[:, i], err, torch.full_like(err, float("inf")))
        return cand

    return layered_path(n, steps, candidates)


@dataclass(frozen=True)
class OSS(GridMethod):
    """Options of the OSS grid optimiser.

    ``teacher_steps``: intervals of the teacher grid (``teacher_grid``, a name of ``ds.grids``; the paper
    uses 200 uniform flow steps); ``substeps``: reference steps per teacher interval with ``reference``.
    """

    teacher_steps: int = 32
    teacher_grid: str = "karras"
    substeps: int = 4
    reference: str = "dpmpp_3m"

    name = "oss"
    paper = "Pei, Hu & Gu 2025, arXiv:2503.21774"

    def __post_init__(self):
        self._require_int("teacher_steps", 2)
        self._require_int("substeps", 1)

    def optimise(self, model, x, solver, steps, cond):
        self._require(self.teacher_steps >= steps, "teacher_steps", f"at least the grid's {steps} steps")
        teacher = teacher_trajectory(model, x, self.teacher_steps, self.teacher_grid, self.substeps,
                                     self.reference, cond)
        paths = per_sample_paths(model, teacher, solver, steps, cond)
        # the lower median at each position: an order statistic of strictly increasing paths increases strictly
        median = paths.median(dim=0).values
        return finish_grid(model.process, teacher.knots[median])
