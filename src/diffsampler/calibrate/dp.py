"""Dynamic programming over a teacher grid: the best path of exactly ``k`` edges from its first knot to its last.

Both DP grid optimisers are this one recursion over layers ``k = 0 .. edges`` (the number of steps taken):
the value of knot ``j`` after ``k + 1`` steps is the best candidate over the knots ``i < j`` it can be reached
from. What a candidate is differs:

* GITS (Chen et al. 2024) adds a fixed edge cost: ``value[j] = min_i value[i] + c^k cost[i, j]``
  (:func:`shortest_path`);
* OSS (Pei et al. 2025) carries the student's state along the best path and scores the state itself:
  ``value[j] = min_i error(step from the state kept at i to j)``.

:func:`layered_path` runs the recursion with the candidates supplied by the caller and backtracks.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["layered_path", "shortest_path", "path_cost"]


def layered_path(nodes: int, edges: int, candidates: Callable) -> torch.Tensor:
    """The argmin path of the layered recursion, as knot indices ``(..., edges + 1)`` from ``0`` to ``nodes - 1``.

    ``candidates(k, value, parent)`` returns a float64 tensor ``(..., nodes, nodes)`` whose ``[..., i, j]``
    is the value knot ``j`` would have after ``k + 1`` steps when the last step comes from ``i``. It must be
    ``inf`` where ``j <= i`` or where ``value[..., i]`` (the values after ``k`` steps) is ``inf``.
    ``parent`` is the previous layer's argmin (``(..., nodes)``, ``None`` for ``k = 0``), for candidates
    that carry a state along the best path. Leading dimensions are independent problems (OSS solves one
    per sample). Ties go to the smallest ``i``.
    """
    if nodes < 2 or not 1 <= edges <= nodes - 1:
        raise ValueError(f"layered_path: need 1 <= edges <= nodes - 1 with nodes >= 2, got nodes={nodes}, "
                         f"edges={edges}")
    value = torch.full((nodes,), float("inf"), dtype=torch.float64)
    value[0] = 0.0
    parents = []
    parent = None
    for k in range(edges):
        cand = candidates(k, value, parent)
        value, parent = cand.min(dim=-2)
        parents.append(parent)
    if not bool(torch.isfinite(value[..., -1]).all()):
        raise ValueError(f"layered_path: the last knot cannot be reached in exactly {edges} steps (every candidate "
                         f"is inf)")
    batch = value.shape[:-1]
    path = torch.empty(*batch, edges + 1, dtype=torch.int64)
    path[..., edges] = nodes - 1
    for k in range(edges - 1, -1, -1):
        path[..., k] = parents[k].gather(-1, path[..., k + 1:k + 2]).squeeze(-1)
    return path


def _upper(cost: torch.Tensor) -> torch.Tensor:
    """``cost`` with ``inf`` on and below the diagonal (an edge always goes to a later knot)."""
    n = cost.shape[-1]
    later = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.where(later, cost.to(torch.float64), torch.full_like(cost, float("inf"), dtype=torch.float64))


def shortest_path(cost, edges: int, *, coeff: float = 1.0) -> list[int]:
    """The path ``0 = p_0 < p_1 < ... < p_edges = n - 1`` minimising ``sum_m coeff^m cost[p_m, p_{m+1}]``.

    ``cost`` is an ``(n, n)`` matrix (only entries above the diagonal are read). ``coeff`` weights the
    ``m``-th step by ``coeff^m``: GITS's ``c`` (1.15 in the paper) makes errors made late, near the data,
    count more. Exact, in ``O(edges n^2)``.
    """
    cost = torch.as_tensor(cost, dtype=torch.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"shortest_path: cost must be a square matrix, got shape {tuple(cost.shape)}")
    if not (isinstance(coeff, (int, float)) and coeff > 0):
        raise ValueError(f"shortest_path: coeff must be a number > 0, got {coeff!r}")
    upper = _upper(cost)
    return layered_path(cost.shape[0], edges,
                        lambda k, value, parent: value[:, None] + coeff ** k * upper).tolist()


def path_cost(cost, path, *, coeff: float = 1.0) -> float:
    """``sum_m coeff^m cost[p_m, p_{m+1}]`` of one path (what :func:`shortest_path` minimises)."""
    cost = torch.as_tensor(cost, dtype=torch.float64)
    return float(sum(coeff ** m * cost[a, b] for m, (a, b) in enumerate(zip(path[:-1], path[1:]))))
