"""Diffusion tree sampling and search (Jain, Sareen, Pedramfar & Ravanbakhsh 2025, "Diffusion Tree
Sampling: Scalable inference-time alignment of diffusion models", arXiv:2506.20701): DTS and DTS*.

The reverse chain is a tree of depth ``T`` (the grid's steps). A node holds a sample ``x_t`` at a knot
of the grid, a soft-value estimate ``v`` and a visit count ``N``; an edge is one step of the solver's
stochastic kernel. Each iteration

* **selects** a path from the root: at each node a child is drawn with probability proportional to
  ``exp(lam v(child))`` (DTS), or the child of highest score ``v + c sqrt(log N_parent / N_child)``
  is taken (DTS*; ``c = 0``, pure greedy, by default). It stops at the first node that may take
  another child, and never enters a subtree that can take no more nodes;
* **expands** that node with one new child drawn from the kernel and **rolls out** from it to
  ``t = 0`` with the kernel, every state of the rollout becoming a node;
* scores the new leaf with the reward and **backs up** the soft Bellman update
  ``v(x_t) = (1/lam) log mean_children exp(lam v(child))`` along the path (a leaf's value is its reward).

How many children a node may take: at most ``ceil(N ** widening)`` (progressive widening, so that every
node's children grow without bound as the budget does) and at most ``branching``. A fixed
``branching`` alone (``widening=None``) makes a finite tree, ``K^T`` leaves at most: its leaf
distribution is then a self-normalised estimate over those few high-noise branches and does not
converge to the target however large the budget (on the test mixture a full ``K = 2``, ``T = 6``
tree falls short of the tilted mean by a quarter of the tilt). A node that selection reaches but whose children
are all full takes another child even if its visits do not yet allow one.

The mean in the backup is over children, unweighted. Children are i.i.d. draws from the kernel
(wherever selection sends the search), so this mean is a consistent estimate of the soft value
``(1/lam) log E[exp(lam r(x_0)) | x_t]`` whatever the selection rule; a mean weighted by visits folds
the selection policy in and biases the values upward (a test shows it). Selection then only decides
where compute goes, which is what makes it pluggable (``selection=``) without changing what DTS
converges to. At a finite budget it does matter: a value-driven selection gives high-valued nodes
more children, which pulls their estimates back to the truth, and starves low-valued ones, which
keep theirs, so the values (and the tilt of the leaf distribution) come out low until every node
is well visited. On the test mixture (1-D, two modes, ``r(x) = x``, ``lam = 1``) DTS reaches the
tilted mean to within 5% of the tilt at 400 nodes per tree on a 4-step chain, but only to 73% of it
at 200 nodes on an 8-step chain, where a uniform selection is already within 5%.

The tree's root is above the first knot: its children are the ``particles`` starting samples of a
population (the caller's draws from the prior; the root takes no others). So DTS targets
``p_theta(x_0) exp(lam r(x_0))``, with ``p_theta`` the law of the chain (this solver on this grid)
started uniformly from those samples: the tilt of the chain's own law, not of the data.
Output: DTS draws ``particles`` leaves per population from the tree's leaf distribution (a descent
from the root with probabilities ``exp(lam v(child)) / sum exp(lam v(siblings))``, which reaches a
leaf with probability ``exp(lam r(leaf)) prod_ancestors (1 / children) / exp(lam v(root))``); DTS*
returns the ``particles`` leaves of highest reward. ``best`` is the best leaf of each tree in both,
and the result also carries every leaf with its descent probability (:class:`TreeSearchResult`).

Kernel, batching and randomness. The kernel is a step of the solver, which must be stochastic and
keep no per-sample history between steps (ddpm, the ancestral samplers, dpmpp_sde, lcm, seeds_2/3,
ddim with ``eta > 0``, ...): a node is then a sample alone, and a step from knot ``i`` is the first
step of a :class:`~diffsampler.Run` over ``grid[i:]`` (the same kernel as step ``i`` of the whole
grid; multistep SDE solvers, whose state carries past answers, are refused). A step into ``t = 0``
is deterministic (no noise is left to add), so a node at the last knot before a final 0 gets one
child. The first iteration of every tree, one rollout from each root child, is one Run over ``x``
on the whole grid (an unsteered run, as best-of-N draws it). After it the trees advance in rounds:
each tree selects ``parallel`` paths, then the rollouts of all trees move together knot by knot,
one Run per knot whose batch is every rollout at that knot; children of one node drawn in the same
round share its evaluation (``run.evaluate`` then ``run.take``). Each round every population gets
one generator (:meth:`Population.generators`), and its selections and its rollouts' noise keys come
from it, so a population's tree does not depend on the other populations of the batch.

Budget, memory and NFE. ``budget`` counts the nodes a tree may add (kernel draws, one step each),
the first rollouts' ``particles * steps`` included; a tree stops at the first selection whose
rollout would exceed it, or when it can take no more nodes. The tree is kept whole: memory is
``groups * (particles + budget)`` samples, on the samples' device, plus a few numbers per node and
a children table of ``min(branching, ceil((budget + particles) ** widening) + 1)`` integers per node.
``nfe`` is network evaluations per output sample, all included (``run.sample_evaluations``: a
batched call on ``b`` samples counts ``b``): at most ``budget * nfe_per_step / particles``, less
where children drawn together share their parent's evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import grids as _grids
from .. import solvers as _solvers
from ..denoiser import Prediction
from ..loop import Run, take
from .particles import Population, SteeringResult, require_stochastic

__all__ = ["tree_search", "TreeSearchResult", "METHODS", "uct"]

METHODS = ("dts", "dts*")

# selection(values, visits, parent_visits) -> scores, all float64 CPU tensors: values and visits of the
# candidate children (m, w), the visits of their parent (m, 1); scores (m, w).
Selection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TreeSearchResult(SteeringResult):
    """A :class:`SteeringResult` with the trees' own numbers, one per population: ``root_value``, the
    root's soft value ``(1/lam) log mean exp(lam v)`` over its children (the estimate of
    ``(1/lam) log E exp(lam r)`` under the chain); ``nodes``, the nodes each tree added (its kernel
    draws); ``leaves``, its leaves (completed rollouts). And every leaf of every tree: ``tree_leaves``
    ``(L, ...)``, ``tree_groups`` ``(L,)`` the population of each, ``tree_log_weights`` ``(L,)`` the log
    of its probability under the Boltzmann descent from the root (each population's logsumexp 0): the
    whole tree as a weighted sample of the target, which ``x`` (under DTS) draws ``particles`` leaves from."""

    root_value: torch.Tensor = None
    nodes: torch.Tensor = None
    leaves: torch.Tensor = None
    tree_leaves: torch.Tensor = None
    tree_log_weights: torch.Tensor = None
    tree_groups: torch.Tensor = None


def uct(c: float) -> Selection:
    """DTS*'s default score: ``v + c sqrt(log N_parent / N_child)`` (greedy on ``v`` at ``c = 0``)."""
    def score(values, visits, parent_visits):
        if c == 0.0:
            return values
        return values + c * torch.sqrt(torch.log(parent_visits) / visits)
    return score


def _boltzmann(lam: float) -> Selection:
    def score(values, visits, parent_visits):
        return lam * values
    return score


def _per_sample(obj, batch: int) -> bool:
    """Whether ``obj`` (a solver state) holds a tensor whose first dimension is the batch."""
    if isinstance(obj, torch.Tensor):
        return obj.ndim > 0 and obj.shape[0] == batch
    if isinstance(obj, Prediction):
        return any(_per_sample(getattr(obj, name, None), batch) for name in Prediction.__slots__)
    if isinstance(obj, (tuple, list)):
        return any(_per_sample(v, batch) for v in obj)
    if isinstance(obj, dict):
        return any(_per_sample(v, batch) for v in obj.values())
    return False


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"tree_search: {name} must be an integer >= {low}, got {value!r}")


def _copy_numbers(values: np.ndarray) -> np.ndarray:
    """For each entry, how many earlier entries hold the same value."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    start = np.ones(len(values), dtype=bool)
    start[1:] = ordered[1:] != ordered[:-1]
    position = np.arange(len(values))
    out = np.empty(len(values), dtype=np.int64)
    out[order] = position - np.maximum.accumulate(np.where(start, position, 0))
    return out


def _choose(scores: np.ndarray, eligible: np.ndarray, u: np.ndarray | None) -> np.ndarray:
    """Per row, the eligible column of highest score (``u is None``), or one drawn with probability
    proportional to ``exp(score)`` by the inverse CDF at the uniforms ``u``. Rows without an eligible
    column get an arbitrary index (the caller masks them)."""
    s = np.where(eligible, scores, -np.inf)
    if u is None:
        return s.argmax(axis=1)
    top = s.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.exp(s - top)
    cdf = np.cumsum(p, axis=1)
    idx = (cdf < (u * cdf[:, -1])[:, None]).sum(axis=1)
    last = s.shape[1] - 1 - np.argmax(eligible[:, ::-1], axis=1)  # the last eligible column (rounding)
    idx = np.minimum(idx, last)
    return np.where(cdf[:, -1] > 0, idx, np.argmax(eligible, axis=1))  # all scores -inf: the first eligible


def tree_search(model, x: torch.Tensor, grid, solver, reward, *, particles: int = 1, generator=None,
                lam: float = 1.0, method: str = "dts", budget: int | None = None,
                branching: int | None = None, widening: float | None = 0.5, selection: Selection | None = None,
                exploration: float = 0.0, parallel: int = 1, brownian: bool = False, **cond) -> TreeSearchResult:
    """Diffusion tree sampling (``method="dts"``) or search (``"dts*"``) toward ``reward``.

    Parameters
    ----------
    model, x, grid, solver:
        As for :func:`diffsampler.sample`; ``solver`` must be stochastic and keep no per-sample history
        between steps (its step is the tree's kernel). ``x`` holds the starting samples.
    reward:
        ``reward(x0, **cond) -> (batch,)``, scored on final samples only (the leaves).
    particles:
        Groups of that many consecutive samples of ``x`` are one population, and one tree: they are
        the root's children. Each population returns that many leaves.
    lam:
        Inverse temperature, > 0: DTS targets ``p_theta(x) exp(lam r(x))``; the soft values of both
        methods use it.
    method:
        ``"dts"``: Boltzmann selection, output drawn from the tree's leaf distribution;
        ``"dts*"``: greedy selection, output the best leaves.
    budget:
        Nodes (kernel draws) per tree, the first rollouts' ``particles * steps`` included; default
        ``4 * particles * steps`` (four unsteered runs' worth).
    branching:
        ``K``, the most children a node gets; ``None`` (the default) for no limit but the widening.
    widening:
        The exponent of progressive widening: a node visited ``N`` times has at most ``ceil(N ** widening)``
        children (default 0.5). ``None`` turns it off, leaving ``branching`` (then required) as the only
        limit: a finite tree, which does not converge to the target (see the module's notes).
    selection:
        ``selection(values, visits, parent_visits) -> scores``: float64 CPU tensors, the candidate
        children's values and visit counts ``(m, w)`` and their parent's visits ``(m, 1)``. DTS draws
        a child with probability proportional to ``exp(score)`` (default ``lam * values``), DTS* takes
        the highest score (default :func:`uct` with ``c = exploration``). Either way the values, and
        what DTS samples at the end, stay those of the unweighted backup.
    exploration:
        ``c`` of DTS*'s default UCT bonus ``c sqrt(log N_parent / N_child)``; 0 (pure greedy) by default.
    parallel:
        Paths each tree selects per round before any is rolled out (more rollouts per network call;
        selections within a round see the values of the round before). 1 is sequential DTS.
    generator:
        Every random draw (the kernel's noise, selection, the final draw) comes from it.
    brownian, **cond:
        As for :func:`diffsampler.sample`.
    """
    solver = _solvers.resolve(solver)
    require_stochastic(solver, "tree_search")
    if method not in METHODS:
        raise ValueError(f"tree_search: method must be one of {', '.join(repr(m) for m in METHODS)}, "
                         f"got {method!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"tree_search: lam must be a finite number > 0, got {lam!r}")
    if branching is not None:
        _check_int("branching", branching, 1)
    if widening is not None and (isinstance(widening, bool) or not isinstance(widening, (int, float))
                                 or not 0 < widening <= 1):
        raise ValueError(f"tree_search: widening must be None or an exponent in (0, 1], got {widening!r}")
    if branching is None and widening is None:
        raise ValueError("tree_search: branching=None (no fixed limit on children) needs widening= (the "
                         "exponent of progressive widening)")
    _check_int("parallel", parallel, 1)
    if budget is not None:
        _check_int("budget", budget, 1)
    if isinstance(exploration, bool) or not isinstance(exploration, (int, float)) or \
            not (math.isfinite(exploration) and exploration >= 0):
        raise ValueError(f"tree_search: exploration must be a finite number >= 0, got {exploration!r}")
    if selection is not None:
        if not callable(selection):
            raise TypeError(f"tree_search: selection must be callable as selection(values, visits, parent_visits) "
                            f"-> scores, got {type(selection).__name__}")
        if exploration != 0.0:
            raise ValueError("tree_search: exploration is the bonus of the default selection; with selection= "
                             "given, put the bonus in it")
    elif method == "dts":
        if exploration != 0.0:
            raise ValueError("tree_search: exploration applies to method 'dts*' (DTS selects by exp(lam v)); "
                             "pass selection= for another DTS policy")
        selection = _boltzmann(float(lam))
    else:
        selection = uct(float(exploration))
    lam = float(lam)

    run = Run(model, x, grid, solver, generator=generator, brownian=brownian, **cond).watch()
    pop = Population("tree_search", run, reward, particles, generator)
    final_gens = pop.generators()  # the final draw's, before the rounds (whose count other trees change)
    steps, n, P, G = len(run), x.shape[0], particles, pop.groups
    if budget is None:
        budget = 4 * P * steps
    if budget < P * steps:
        raise ValueError(f"tree_search: budget = {budget} nodes per tree is less than the first rollouts need: "
                         f"particles * steps = {P} * {steps} = {P * steps} (one run from each root child)")
    grid = _grids.validate(model.process, grid)
    # The most children a node at each depth gets. A step into t = 0 is deterministic (no noise is left
    # to add at sigma = 0), so a node at the last knot before a final 0 gets one child: more would be copies.
    # With progressive widening a node of N visits has at most ceil(N ** widening) children, and a node
    # is visited at most once per node added below it, so the children table is that wide at most.
    K = branching if widening is None else \
        min(branching or budget + P, math.ceil((budget + P) ** widening) + 1)
    cap = np.full(steps + 1, K, dtype=np.int64)
    cap[steps] = 0
    if float(grid[-1]) == 0.0:
        cap[steps - 1] = 1

    # The node store. Depth-0 nodes are the samples of x (ids 0..n-1, particle k is node k); tree g's
    # added nodes are ids n + g * budget + 0..budget-1. Depth d is knot d; leaves are at depth `steps`.
    total = n + G * budget
    xs = torch.empty((total,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    parent = np.full(total, -1, dtype=np.int64)
    depth = np.zeros(total, dtype=np.int64)
    tree = np.zeros(total, dtype=np.int64)
    origin = np.zeros(total, dtype=np.int64)      # the particle of x at the top of a node's path
    children = np.full((total, K), -1, dtype=np.int64)
    nchild = np.zeros(total, dtype=np.int64)
    value = np.zeros(total, dtype=np.float64)
    visits = np.zeros(total, dtype=np.float64)
    open_ = np.zeros(total, dtype=bool)             # can the subtree below still take a node?
    count = np.zeros(G, dtype=np.int64)             # nodes added per tree
    root_visits = np.zeros(G, dtype=np.float64)
    roots = np.arange(n, dtype=np.int64).reshape(G, P)   # the root's children, per tree
    evaluations = 0
    pending = np.zeros(total, dtype=np.int64)       # children reserved in the current round
    touched = np.zeros(0, dtype=np.int64)

    def link(src: np.ndarray, trees: np.ndarray, x_new: torch.Tensor) -> np.ndarray:
        """Store children of ``src`` (one per entry, in order) with samples ``x_new``; return their ids."""
        # consecutive ids per tree in the order of the entries; a node may get several children at once
        ids = n + trees * budget + count[trees] + _copy_numbers(trees)
        np.add.at(count, trees, 1)
        xs[torch.from_numpy(ids).to(xs.device)] = x_new
        parent[ids], depth[ids], tree[ids], origin[ids] = src, depth[src] + 1, trees, origin[src]
        children[src, nchild[src] + _copy_numbers(src)] = ids
        np.add.at(nchild, src, 1)
        visits[ids] = 1.0
        return ids

    def backup(ids: np.ndarray) -> None:
        """Recompute values and open flags of the internal nodes ``ids``, deepest first."""
        for d in range(steps - 1, -1, -1):
            at = ids[depth[ids] == d]
            if len(at) == 0:
                continue
            ch = children[at]
            has = ch >= 0
            safe = np.maximum(ch, 0)
            v = np.where(has, lam * value[safe], -np.inf)
            top = v.max(axis=1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(v - top).sum(axis=1))
            value[at] = (lse - np.log(nchild[at])) / lam
            open_[at] = (nchild[at] < cap[d]) | (has & open_[safe]).any(axis=1)

    # The first rollout of every root child: one unsteered run over x.
    xs[:n] = x
    tree[:n] = np.arange(n) // P
    origin[:n] = np.arange(n)
    prev = np.arange(n, dtype=np.int64)
    visits[:n] = 1.0
    first = []
    while not run.done:
        run.step()
        if run.i == 1 and _per_sample(run.state, n):
            raise ValueError(
                f"tree_search: solver {solver.name!r} keeps per-sample history between steps (a multistep "
                f"method), so a node would not be a sample alone; use a one-step stochastic kernel, one whose "
                f"state carries nothing per sample: ddpm, euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral, "
                f"dpmpp_sde, lcm, seeds_2, seeds_3, or ddim with eta > 0")
        prev = link(prev, tree[prev], run.x)
        first.append(prev)
    value[prev] = pop.current_reward().cpu().numpy()
    root_visits[:] = P
    evaluations += run.sample_evaluations
    backup(np.concatenate([np.arange(n, dtype=np.int64)] + first))

    done = ~open_[roots].any(axis=1)
    sampling = method == "dts"
    while not done.all():
        gens = pop.generators()
        active = np.flatnonzero(~done)
        u = None
        if sampling:
            u = np.stack([torch.rand(parallel, steps + 1, generator=gens[g], dtype=torch.float64).numpy()
                          for g in active])  # (trees, parallel, levels)
        pending[touched] = 0
        room = budget - count[active]
        selecting = np.ones(len(active), dtype=bool)
        chosen_nodes, chosen_trees, paths = [], [], []
        for j in range(parallel):
            slots = np.flatnonzero(selecting)
            if len(slots) == 0:
                break
            trees_j = active[slots]
            m = len(slots)
            target = np.full(m, -1, dtype=np.int64)
            alive = np.ones(m, dtype=bool)
            cur = np.full(m, -1, dtype=np.int64)
            path = np.full((m, steps + 1), -1, dtype=np.int64)
            ch, par_visits = roots[trees_j], root_visits[trees_j]  # the root never expands
            for level in range(steps + 1):
                safe = np.maximum(ch, 0)
                eligible = (ch >= 0) & open_[safe] & alive[:, None]
                alive &= eligible.any(axis=1)
                if not alive.any():
                    break
                scores = selection(torch.from_numpy(value[safe]), torch.from_numpy(visits[safe]),
                                   torch.from_numpy(par_visits[:, None].copy()))
                if not isinstance(scores, torch.Tensor) or scores.shape != ch.shape:
                    got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                    raise ValueError(f"tree_search: selection returned {got} for candidates of shape "
                                     f"{tuple(ch.shape)}; it must return one score per candidate")
                scores = scores.detach().to(torch.float64).cpu().numpy()
                pick = _choose(scores, eligible, None if u is None else u[slots, j, level])
                cur = np.where(alive, ch[np.arange(m), pick], cur)
                path[alive, level] = cur[alive]
                at = np.maximum(cur, 0)
                ch, par_visits = children[at], visits[at]
                taken = nchild[at] + pending[at]
                # expand here while the node has room, and (with widening) while its visits allow another
                # child or none of its children can take more
                here = alive & (taken < cap[depth[at]])
                if widening is not None:
                    allowed = np.ceil((visits[at] + 1.0) ** widening - 1e-9)
                    stuck = ~((ch >= 0) & open_[np.maximum(ch, 0)]).any(axis=1)
                    here &= (taken < allowed) | stuck
                target[here] = cur[here]
                alive &= ~here
                if not alive.any():
                    break
            for s in range(m):
                a, node = slots[s], int(target[s])
                if node < 0:                           # a dead end (capacity reserved this round)
                    selecting[a] = False
                    continue
                need = steps - int(depth[node])
                if need > room[a]:                     # the rollout does not fit: the tree stops
                    selecting[a] = False
                    done[active[a]] = True
                    continue
                room[a] -= need
                pending[node] += 1
                chosen_nodes.append(node)
                chosen_trees.append(int(active[a]))
                on_path = path[s][path[s] >= 0]
                visits[on_path] += 1.0
                root_visits[active[a]] += 1.0
                paths.append(on_path)
        if not chosen_nodes:  # the first selection of a round always ends somewhere: every tree stopped
            break
        touched = np.array(chosen_nodes, dtype=np.int64)
        src = touched.copy()
        rollout_tree = np.array(chosen_trees, dtype=np.int64)
        order = np.lexsort((np.arange(len(src)), rollout_tree))  # tree-major, selections in order
        src, rollout_tree = src[order], rollout_tree[order]
        created = []
        for i in range(int(depth[src].min()), steps):
            at = np.flatnonzero(depth[src] == i)
            if len(at) == 0:
                continue
            s_at, t_at = src[at], rollout_tree[at]
            # unique sources in tree-major order; rollouts expanding one node share its evaluation
            uniq, first_at, spread = np.unique(s_at, return_index=True, return_inverse=True)
            keep = np.lexsort((first_at, tree[uniq]))
            uniq = uniq[keep]
            rank = np.empty(len(keep), dtype=np.int64)
            rank[keep] = np.arange(len(keep))
            spread = rank[spread.reshape(-1)]
            regroup = np.argsort(spread, kind="stable")   # the rollouts in the order of their sources
            at, s_at, t_at, spread = at[regroup], s_at[regroup], t_at[regroup], spread[regroup]
            idx = torch.from_numpy(uniq)
            sub = Run(model, xs[idx.to(xs.device)], grid[i:], solver, generator=[gens[g] for g in tree[uniq]],
                      brownian=brownian, **take(cond, torch.from_numpy(origin[uniq]), n)).watch()
            if len(uniq) < len(at):
                sub.evaluate()
                sub.take(torch.from_numpy(spread))
            sub.step()
            new = link(s_at, t_at, sub.x)
            src[at] = new
            created.append(new)
            if i + 1 == steps:
                pop.run = sub
                value[new] = pop.current_reward().cpu().numpy()
            evaluations += sub.sample_evaluations
        backup(np.unique(np.concatenate(created + paths)))
        done |= ~open_[roots].any(axis=1)

    # The output: leaves drawn from the tree (DTS) or the best leaves (DTS*).
    is_leaf = depth == steps
    is_leaf[:n] = False
    leaves_of = [np.flatnonzero(is_leaf & (tree == g)) for g in range(G)]
    best = np.array([lv[np.argmax(value[lv])] for lv in leaves_of], dtype=np.int64)
    if sampling:
        u = np.stack([torch.rand(P, steps + 1, generator=final_gens[g], dtype=torch.float64).numpy()
                      for g in range(G)])
        u = u.reshape(n, steps + 1)
        cur = roots.reshape(-1)
        ch = roots[np.arange(n) // P]
        for level in range(steps + 1):
            if level > 0:
                ch = children[cur]
            safe = np.maximum(ch, 0)
            cur = ch[np.arange(n), _choose(lam * value[safe], ch >= 0, u[:, level])]
        out = cur
    else:
        out = np.concatenate([lv[np.argsort(-value[lv], kind="stable")[:P]] for lv in leaves_of])
    root_lse = torch.logsumexp(torch.from_numpy(lam * value[:n]).reshape(G, P), dim=1)
    # Each leaf's probability under the descent, the product of the policy's probabilities on its path.
    used = np.concatenate([np.arange(n)] + [n + g * budget + np.arange(count[g]) for g in range(G)])
    inner = used[depth[used] < steps]
    ch = children[inner]
    v = np.where(ch >= 0, lam * value[np.maximum(ch, 0)], -np.inf)
    top = v.max(axis=1, keepdims=True)
    child_lse = np.zeros(total)
    child_lse[inner] = top[:, 0] + np.log(np.exp(v - top).sum(axis=1))
    log_q = np.zeros(total)
    log_q[:n] = lam * value[:n] - root_lse.numpy()[np.arange(n) // P]
    for d in range(1, steps + 1):
        at = used[depth[used] == d]
        log_q[at] = log_q[parent[at]] + lam * value[at] - child_lse[parent[at]]
    all_leaves = np.concatenate(leaves_of)
    dev = xs.device
    return TreeSearchResult(
        x=xs[torch.from_numpy(out).to(dev)],
        log_weights=pop.normalised(torch.zeros(n, dtype=torch.float64)),
        rewards=torch.from_numpy(value[out].copy()),
        best=xs[torch.from_numpy(best).to(dev)],
        nfe=evaluations / n,
        root_value=(root_lse - math.log(P)) / lam,
        nodes=torch.from_numpy(count.copy()),
        leaves=torch.tensor([len(lv) for lv in leaves_of]),
        tree_leaves=xs[torch.from_numpy(all_leaves).to(dev)],
        tree_log_weights=torch.from_numpy(log_q[all_leaves].copy()),
        tree_groups=torch.from_numpy(tree[all_leaves].copy()),
    )

