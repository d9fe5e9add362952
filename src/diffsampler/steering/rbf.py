"""Inference-time scaling for flow models (Kim, Yoon, Shin, Sung & Kim 2025, "Inference-Time Scaling for
Flow Models via Stochastic Generation and Rollover Budget Forcing", arXiv:2503.19385): the velocity-to-score
SDE, the conversion of a flow to a variance-preserving interpolant, and Rollover Budget Forcing (RBF).

* :class:`FlowSDE` is a solver: the SDE ``dx = (-u + g^2/2 score) dtau + g dW`` in denoising time
  ``tau = -t``, where ``u`` is the probability-flow velocity ``dx/dt`` and ``score = -eps / sigma``,
  both from the model's :class:`~diffsampler.Prediction`. For every diffusion ``g(t)`` its marginals are
  the flow's (``g = 0`` is the flow's ODE), and it runs through :func:`diffsampler.sample` and
  :class:`diffsampler.Run` like any solver, on any process.
* :func:`vp_interpolant` turns a model of one interpolant into one of another (by default the VP path
  with linear beta from 0.1 to 20, as the authors do): the scale-time transform of Lipman et al.
  (``flow_matching``'s ``ScheduleTransformedModel``), here as the equivalent map at equal
  signal-to-noise ratio.
* :func:`rbf` is the search: the best of ``init_particles`` starting noises, then per step up to a
  budget of trials (one SDE step each, scored by the reward of its data estimate), the first trial
  that beats the best reward so far accepted at once and the unused budget rolled into the next step.

Where we differ from the authors' code (``rbf/rbf.py``, ``rbf/prior/flux.py``):

* the budget ``B = floor((max_nfe - init_particles) / steps)`` is per particle (the authors' ``max_nfe``
  counts all ``batch_size`` chains of a prompt together: their 500 with ``batch_size: 2`` is
  ``particles=2, max_nfe=250`` here, 22 trials a step either way), and ``nfe`` counts what was evaluated;
* every step of the grid is searched, the last one included, whose trials are final samples scored by
  the reward itself (no evaluation, so they cost budget but no NFE); there is no next step to roll into
  from it, so its whole remaining budget is spent and its best trial kept. The authors stop advancing
  two steps before the end (``step_counter < max_steps - 2``), spend what is left there and return
  that step's best data estimate; we return final samples, as every driver does;
* trials are evaluated ``batch_size`` at a time per particle (the authors: one per chain per
  iteration); within a batch the best trial is the one accepted when any beats the best so far;
* a trial's evaluation at its new point is the next step's own (kept and reused), as in their code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch

from .. import solvers as _solvers
from ..denoiser import Prediction, _broadcast, _floats
from ..guidance.base import DenoiserTransform
from ..loop import Run, take
from ..noise import _GOLDEN, _M1, _mix, _wrap
from ..process import VP, Process
from ..solvers.base import Knots
from ..solvers.multistep import LinearMultistep, StepPlan
from .particles import Population, SteeringResult

__all__ = ["FlowSDE", "DIFFUSIONS", "diffusion_coefficient", "Reinterpolated", "vp_interpolant", "rbf"]

DIFFUSIONS = ("constant", "sigma", "square")


def diffusion_coefficient(diffusion, norm: float, process: Process, t: float) -> float:
    """``g(t)``: ``norm`` times ``1`` (``"constant"``), ``sigma(t)`` (``"sigma"``), ``t^2`` (``"square"``,
    the authors' choice with ``norm = 3``) or ``diffusion(t)`` for a callable; ``t`` is process time."""
    if diffusion == "constant":
        shape = 1.0
    elif diffusion == "sigma":
        shape = abs(float(process.sigma(t)))
    elif diffusion == "square":
        shape = t * t
    else:
        value = diffusion(t)
        try:
            shape = float(value)
        except (TypeError, ValueError, RuntimeError):
            shape = math.nan
        if isinstance(value, bool) or not (math.isfinite(shape) and shape >= 0):
            raise ValueError(f"flow_sde: the diffusion callable returned {value!r} at t = {t:.6g}; it must return "
                             f"a finite number >= 0")
    return norm * float(shape)


@dataclass(frozen=True)
class FlowSDE(LinearMultistep):
    """The velocity-to-score SDE of a flow model, integrated by Euler-Maruyama (Kim et al. 2025, eq. 8).

    In denoising time (``h = t_i - t_{i+1} > 0``) the step is ::

        x' = x + h (-u + g^2 / 2 score) + g sqrt(h) z,    u = alpha' x0 + sigma' eps,  score = -eps / sigma,

    with ``u``, ``eps`` and ``x0`` from the model's answer at ``(x, t_i)`` and ``g = g(t_i)``. Any
    ``g >= 0`` keeps the marginals of the flow (the Fokker-Planck equation of this SDE is the flow's
    continuity equation); ``norm = 0`` is the flow's ODE by Euler's method (then the solver draws no
    noise). Written as ``x' = A x + B m + C z`` with ``m`` the data estimate where ``alpha < sigma``
    (near ``t = 1`` of a flow, where the data estimate stays finite and ``1/alpha`` would not) and the
    noise estimate elsewhere (near the data, where ``1/sigma`` would amplify rounding).

    Options: ``diffusion`` is ``"constant"``, ``"sigma"`` (``g`` proportional to ``sigma(t)``),
    ``"square"`` (``g = norm t^2``, the authors' default) or a callable ``t -> shape``; ``g = norm *
    shape(t)`` in process time, so the shapes are meant for processes on ``[0, 1]`` (flows, VP).
    Weak order 1, 1 NFE per step (the evaluation at the current sample).
    """

    diffusion: Union[str, Callable[[float], float]] = "square"
    norm: float = 3.0

    name = "flow_sde"
    order = 1
    nfe_per_step = 1
    paper = "Kim et al. 2025, arXiv:2503.19385 (velocity-to-score SDE), by Euler-Maruyama"

    def __post_init__(self):
        self._require(callable(self.diffusion) or (isinstance(self.diffusion, str) and self.diffusion in DIFFUSIONS),
                      "diffusion", f"one of {', '.join(DIFFUSIONS)}, or a callable t -> g(t) / norm")
        self._require_finite_nonneg("norm")

    @property
    def stochastic(self) -> bool:
        return self.norm > 0

    def plan(self, knots: Knots):
        p = knots.process
        for i in range(len(knots)):
            t, a, s = knots.t[i], knots.alpha[i], knots.sigma[i]
            h = t - knots.t[i + 1]
            g = diffusion_coefficient(self.diffusion, self.norm, p, t)
            cx = h * float(p.d_alpha(t))                          # x' = x - cx x0 - ce eps + C z
            ce = h * (float(p.d_sigma(t)) + 0.5 * g * g / s)
            C = g * math.sqrt(h)
            if a < s:  # eps = (x - a x0) / s
                yield StepPlan(t, 1.0 - ce / s, (ce * a / s - cx,), C, kind="x0")
            else:      # x0 = (x - s eps) / a
                yield StepPlan(t, 1.0 - cx / a, (cx * s / a - ce,), C, kind="eps")


# ---------------------------------------------------------------------------
# Change of interpolant
# ---------------------------------------------------------------------------

class Reinterpolated(DenoiserTransform):
    """A model of one interpolant answering as a model of another, ``process``, with the same data.

    At ``(x, r)`` of the new process the old one has the same signal-to-noise ratio at ``t =
    t_of_lambda(lambda_new(r))``, where its sample is ``x * alpha_t / alpha_r`` (``= x * sigma_t /
    sigma_r``). Both samples carry the same information about the data, so the posterior means are the
    same: the answer there, data and noise estimate, is the answer here. Its velocity in the new process,
    ``alpha_r' x0 + sigma_r' eps``, is then Lipman's scale-time transform ``u_r(x) = (s_r'/s_r) x + t_r'
    s_r u_t(x / s_r)`` with ``s_r = sigma_r / sigma_t``. One evaluation per call, counted by the model.

    A time ``r`` whose log-SNR lies outside the old process's range maps outside its times; the model
    is then evaluated there as it is (the exact denoisers of the testbeds are defined everywhere).
    """

    def __init__(self, model, process: Process):
        super().__init__(model)
        if not isinstance(process, Process):
            raise TypeError(f"{type(self).__name__}: process must be a diffsampler Process, got "
                            f"{type(process).__name__}")
        self.source, self.process = model.process, process

    def times(self, r):
        """``(t, scale)``: the old process's time at the log-SNR of ``r`` and the factor its sample has."""
        new, old = self.process, self.source
        t = old.t_of_lambda(new.lambda_(r))
        a_r, s_r = new.alpha(r), new.sigma(r)
        a_t, s_t = old.alpha(t), old.sigma(t)
        if isinstance(r, torch.Tensor):
            use_alpha = a_r >= s_r.abs()
            scale = torch.where(use_alpha, a_t / torch.where(use_alpha, a_r, 1.0),
                                s_t.abs() / torch.where(use_alpha, 1.0, s_r.abs()))
            return t, scale
        return float(t), (a_t / a_r if a_r >= abs(s_r) else abs(s_t) / abs(s_r))

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        if type(t) is not float and not (isinstance(t, torch.Tensor) and t.ndim > 0):
            t = float(t)
        t_old, scale = self.times(t)
        if isinstance(t_old, torch.Tensor):
            t_old = t_old.to(torch.float64)
        pred = self.model(x * _broadcast(scale, x), t_old, **cond)
        maps = pred._maps
        if maps is not None and pred.raw is not None and type(scale) is float and _floats(maps):
            # the answer's forms stay unformed: x0 = p (scale x) + q raw = (p scale) x + q raw, eps likewise
            out = Prediction.of_output(x, pred.raw, *(pq if pq[0] == 0.0 else (pq[0] * scale, pq[1]) for pq in maps))
            if pred._x0 is not None and pred._x0 is not pred.raw:
                out._x0 = pred._x0
            if pred._eps is not None and pred._eps is not pred.raw:
                out._eps = pred._eps
        else:
            out = Prediction(pred.x0, pred.eps)
        out.renoise = pred.renoise  # a noise estimate: the same under the change of interpolant
        return out


def vp_interpolant(model, vp_process: Process | None = None) -> Reinterpolated:
    """``model`` (a flow, or any interpolant) as a model of the VP process ``vp_process`` (default
    ``VP.linear()``, beta from 0.1 to 20, the authors' choice). Sample it on ``vp_process``'s grids; its
    probability-flow ODE has the same endpoint map as the original's (at equal signal-to-noise ratio)."""
    if vp_process is None:
        vp_process = VP.linear()
    return Reinterpolated(model, vp_process)


# ---------------------------------------------------------------------------
# Rollover budget forcing
# ---------------------------------------------------------------------------

def _positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"rbf: {what} must be an integer >= {minimum}, got {value!r}")
    return value


def _trial_keys(chain_keys: torch.Tensor, step: int, trial: torch.Tensor) -> torch.Tensor:
    """The noise key of trial ``trial`` of step ``step`` of each chain: fresh for every trial."""
    return _mix(_mix(chain_keys + _wrap((step + 1) * _M1)) + trial * _GOLDEN)


def _cat(parts: list, sizes: list[int], memo: dict):
    """The per-sample objects ``parts`` (batches of ``sizes``) joined along the batch: :func:`take`'s
    structure (tensors, Predictions, tuples, lists, dicts), shared parts kept as they are. ``memo`` joins
    each tuple of tensors once, so tensors that were one stay one (a Prediction's ``at`` and its sample)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if all(p is first for p in parts[1:]):
        if not (isinstance(first, torch.Tensor) and first.ndim > 0 and first.shape[0] == sizes[0]):
            return first
    if isinstance(first, torch.Tensor):
        if all(isinstance(p, torch.Tensor) and p.ndim > 0 and p.shape[0] == n for p, n in zip(parts, sizes)):
            key = tuple(id(p) for p in parts)
            hit = memo.get(key)
            if hit is None:
                hit = memo[key] = (parts, torch.cat(parts))
            return hit[1]
        return first
    if type(first) is Prediction:
        maps = first._maps
        if maps is not None and _floats(maps) and all(p._maps is not None and _floats(p._maps) and p._maps == maps
                                                      and p.raw is not None for p in parts):
            out = Prediction.of_output(_cat([p.at for p in parts], sizes, memo),
                                       _cat([p.raw for p in parts], sizes, memo), *maps)
            for slot in ("_x0", "_eps"):
                values = [getattr(p, slot) for p in parts]
                if all(v is not None for v in values):
                    setattr(out, slot, _cat(values, sizes, memo))
        else:
            out = Prediction(_cat([p.x0 for p in parts], sizes, memo), _cat([p.eps for p in parts], sizes, memo))
        renoise = [p.renoise for p in parts]
        out.renoise = None if all(v is None for v in renoise) else _cat(renoise, sizes, memo)
        return out
    if isinstance(first, tuple):
        items = [_cat([p[k] for p in parts], sizes, memo) for k in range(len(first))]
        return type(first)._make(items) if hasattr(type(first), "_make") else tuple(items)
    if isinstance(first, list):
        return [_cat([p[k] for p in parts], sizes, memo) for k in range(len(first))]
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts], sizes, memo) for k in first}
    return first


def rbf(model, x: torch.Tensor, grid, solver, reward, *, particles: int = 1, init_particles: int = 25,
        max_nfe: int = 500, batch_size: int = 1, generator=None, brownian: bool = False,
        **cond) -> SteeringResult:
    """Rollover budget forcing (Kim et al. 2025): a reward-driven search along ``solver``'s kernel.

    Each sample of ``x`` is a particle that runs its own search; groups of ``particles`` consecutive
    ones are a population (one prompt), of which ``best`` is the highest-reward final particle. Per
    particle:

    1. ``init_particles`` starting candidates at ``grid[0]``: the particle's own sample of ``x`` and
       ``init_particles - 1`` draws from the process's prior (so then the grid must start at
       ``t_max``); one evaluation each; the one whose data estimate has the highest reward is kept
       and its reward is the best so far.
    2. Each step of the grid gets a budget of ``B = floor((max_nfe - init_particles) / steps)`` trials
       plus what the previous step left over. A trial is one solver step from the particle's current
       sample, with noise of its own, scored by the reward of its data estimate at the new point (one
       evaluation, which the next step reuses). Trials are made ``batch_size`` at a time; as soon as
       one beats the best reward so far it is accepted (the best of its batch, if several do), the
       particle moves to it and the unused budget rolls over. When the budget is spent the particle
       moves to the step's best trial (the best so far is then unchanged).
    3. The last step's trials are final samples, scored by the reward itself at no evaluation; its whole
       remaining budget is spent and the best trial is the particle's result.

    So a particle makes at most ``max_nfe`` evaluations: ``nfe`` (per particle, all included) counts
    them exactly, and is below ``max_nfe`` by the last step's trials at least.

    Parameters
    ----------
    model, x, grid:
        As for :func:`diffsampler.sample`. For the paper's method, a flow model, optionally through
        :func:`vp_interpolant` (then a grid of the VP process).
    solver:
        ``None`` for :class:`FlowSDE` (``"square"``, ``norm = 3``, the authors' setting), or any solver
        whose step evaluates the network once, at the current sample (``flow_sde``, ``ddpm``, ``ddim``
        with ``eta > 0``, ``euler_ancestral``, ``dpmpp_2m_sde``, ...). A deterministic one (or ``norm =
        0``) repeats the same trial: RBF is then the best of the starting candidates followed by the ODE.
    reward:
        ``reward(x0, **cond) -> (batch,)`` on data estimates (see
        :func:`~diffsampler.steering.latent_reward`), higher is better.
    particles:
        Population size (the authors' ``batch_size``).
    init_particles:
        Starting candidates per particle (the authors' ``init_n_particles``, 25).
    max_nfe:
        The evaluations one particle may spend, its starting candidates included (the authors' 500
        covers all chains of a prompt: see the module docstring).
    batch_size:
        Trials evaluated together per particle (the network sees up to ``batch_size`` times the batch).
    generator:
        Every random draw comes from it: the particles' noise keys (each trial's noise derives from its
        particle's key, step and number) and, per population, the extra starting candidates.

    Returns a :class:`~diffsampler.steering.SteeringResult`: ``x`` the final sample of each particle
    (shaped like ``x``), ``rewards`` their rewards, ``best`` one per population, uniform
    ``log_weights``.
    """
    solver = FlowSDE() if solver is None else _solvers.resolve(solver)
    if solver.adaptive or solver.nfe_per_step != 1:
        raise ValueError(f"rbf: solver {solver.name!r} evaluates the network {solver.nfe_per_step} time(s) a step"
                         f"{' (adaptive)' if solver.adaptive else ''}; RBF's trial is one step and one evaluation, "
                         f"so it needs a solver with one evaluation a step, at the current sample "
                         f"(flow_sde, ddpm, ddim with eta > 0, euler_ancestral, dpmpp_2m_sde, ...)")
    particles = _positive_int(particles, "particles")
    m = _positive_int(init_particles, "init_particles")
    batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(max_nfe, bool) or not isinstance(max_nfe, int):
        raise ValueError(f"rbf: max_nfe must be an integer, got {max_nfe!r}")
    if max_nfe < m:
        raise ValueError(f"rbf: max_nfe = {max_nfe} is smaller than init_particles = {m}: the starting candidates "
                         f"alone cost {m} evaluations per particle")
    run = Run(model, x, grid, solver, generator=generator, brownian=brownian, **cond)  # validates; draws the keys
    pop = Population("rbf", run, reward, particles, generator)
    knots, process, n = run.knots, model.process, x.shape[0]
    steps = len(knots)
    budget_per_step = (max_nfe - m) // steps
    if budget_per_step < 1:
        raise ValueError(f"rbf: max_nfe = {max_nfe} leaves no trial per step: with init_particles = {m} and "
                         f"{steps} steps it must be at least {m + steps}")
    full_cond = run.cond
    evaluations = 0

    def evaluate(xs: torch.Tensor, t: float, rows: torch.Tensor) -> Prediction:
        nonlocal evaluations
        before = model.nfe
        pred = model(xs, t, **take(full_cond, rows, n)) if full_cond else model(xs, t)
        evaluations += (model.nfe - before) * xs.shape[0]
        return pred

    def score(x0: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        run.cond = take(full_cond, rows, n)  # the reward sees each row's own conditioning
        try:
            return pop.reward_of(x0, step).cpu()  # the bookkeeping is on the CPU
        finally:
            run.cond = full_cond

    # 1. the starting candidates: row c * m + j is candidate j of particle c, candidate 0 being x[c]
    chains = torch.arange(n)
    if m > 1:
        if knots.t[0] < process.t_max - 1e-12 * max(1.0, abs(process.t_max)):
            raise ValueError(f"rbf: init_particles = {m} draws {m - 1} more starting candidates per particle from "
                             f"the prior, so the grid must start at the process's t_max = {process.t_max}, not "
                             f"{knots.t[0]}; or use init_particles = 1")
        shape = (particles * (m - 1), *x.shape[1:])
        extra = torch.stack([process.prior(shape, generator=g, dtype=x.dtype, device=x.device)
                             for g in pop.generators()])
        candidates = torch.cat([x[:, None], extra.reshape(n, m - 1, *x.shape[1:])], 1).reshape(n * m, *x.shape[1:])
    else:
        candidates = x
    rows = chains.repeat_interleave(m)
    pred = evaluate(candidates, knots.t[0], rows)
    r = score(pred.x0, rows, 0).reshape(n, m)
    best, pick = r.max(1)
    cur_x, cur_pred = take((candidates, pred), chains * m + pick, n * m, {})
    cur_state = run.state
    keys = None if run.noise is None else run.noise.keys
    leftover = torch.zeros(n, dtype=torch.int64)
    nfe = torch.full((n,), m, dtype=torch.int64)   # per particle, to check the budget
    rewards = best

    # 2. the steps
    for i in range(steps):
        final = i == steps - 1
        t_i, t_next = knots.t[i], knots.t[i + 1]
        budget = leftover + budget_per_step
        used = torch.zeros(n, dtype=torch.int64)
        accepted = torch.zeros(n, dtype=torch.bool)
        step_best = torch.full((n,), -math.inf, dtype=torch.float64)
        step_row = torch.full((n,), -1, dtype=torch.int64)
        pool, sizes, offset = [], [], 0
        while True:
            active = ~accepted & (used < budget)
            if not bool(active.any()):
                break
            k = torch.where(active, (budget - used).clamp(max=batch_size), 0)
            who = chains.repeat_interleave(k)                  # the particle of each trial, particle-major
            start = torch.cumsum(k, 0) - k
            pos = torch.arange(len(who)) - start[who]          # its place in the particle's batch
            memo: dict = {}
            xs, ps, states = take(cur_x, who, n, memo), take(cur_pred, who, n, memo), take(cur_state, who, n, memo)

            def kept(x_, t_, xs=xs, ps=ps):
                if x_ is xs and type(t_) is float and t_ == t_i:
                    return ps
                raise ValueError(f"rbf: solver {solver.name!r} evaluates the network away from the current sample "
                                 f"(at t = {float(t_) if type(t_) is float else t_}); RBF counts one evaluation per "
                                 f"trial, at its new point, and needs a solver whose step evaluates only at the "
                                 f"current sample (no churn)")

            noise = None if keys is None else run.noise.with_keys(_trial_keys(keys[who], i, used[who] + pos))
            new_x, new_state = solver.step(kept, xs, i, states, noise)
            if final:
                new_pred, x0 = None, new_x
            else:
                new_pred = evaluate(new_x, t_next, who)
                x0 = new_pred.x0
                nfe += k
            values = score(x0, who, i + 1)
            table = torch.full((n, batch_size), -math.inf, dtype=torch.float64)
            table[who, pos] = values
            round_best, round_pos = table.max(1)
            better = active & (round_best > step_best)
            step_best = torch.where(better, round_best, step_best)
            step_row = torch.where(better, offset + start + round_pos, step_row)
            if not final:
                beats = active & (round_best > best)
                accepted |= beats
                best = torch.where(beats, round_best, best)
            used += k
            pool.append((new_x, new_pred, new_state))
            sizes.append(len(who))
            offset += len(who)
        leftover = torch.where(accepted, budget - used, 0)
        joined = _cat([p[0] for p in pool], sizes, {}) if final else _cat(pool, sizes, {})
        if final:
            cur_x = take(joined, step_row, offset, {})
            rewards = step_best
        else:
            cur_x, cur_pred, cur_state = take(joined, step_row, offset, {})
    assert int(nfe.max()) <= max_nfe, "rbf: the budget was exceeded"  # by construction
    run.x = cur_x
    return pop.result(torch.zeros(n, dtype=torch.float64), rewards, evaluations)
