"""Feynman-Kac correctors (Skreta, Akhound-Sadegh, Ohanesian, Bondesan, Aspuru-Guzik, Doucet, Brekelmans,
Tong & Neklyudov 2025, "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of
Experts", arXiv:2503.02819).

Annealing ``q^beta``, a product of experts ``q1 q2`` and classifier-free guidance's geometric mean
``q_u^(1-w) q_c^w`` are what users mean by those names, but running the reverse SDE with the combined
score does not sample them: the combined score is not the score of the combined noisy marginals.
FKC simulates that SDE and carries a log-weight per particle whose increments make the weighted
particles follow the target's marginals at every time (METHODS.md 3.2). With the target-score drift
``v = -f + g^2 s_target`` and the process's own diffusion ``g`` (the reverse SDE), the Laplacians
cancel and the weight rate ``G`` (per unit of generative time) is, up to terms that do not depend
on ``x`` (which normalisation removes):

* annealing ``q^beta``:   ``beta (beta - 1) / 2  g^2 |s|^2``;
* product ``q1 q2``:      ``g^2 <s1, s2>``;
* CFG mean:               ``w (w - 1) / 2  g^2 |s_u - s_c|^2``.

Discretisation (Euler-Maruyama in the weights, as the authors'): the rate is taken at the step's
start, from the evaluation the solver's step makes there (kept and reused, so the weights cost no
network evaluation), with the noise estimates frozen over the step as exponential integrators
freeze them: ``int g^2 ds |s|^2 = 2 h |eps|^2`` for a log-SNR step ``h`` (the authors' EDM weight
``-w (w-1) |s_u - s_c|^2 dt t`` to first order). A last step into ``t = 0`` freezes the score instead
(``(1 - exp(-2h)) |eps|^2``, finite there). The scheme is first order in the step, with a large
constant where the combined score is stiff (high noise, large ``w``, ``beta`` or products): FKC
needs hundreds of steps, as the toys of METHODS.md 3.2 (2000 steps) do; ``diffsampler bench
--section posterior`` measures the error against the steps.

Where we differ from the authors' code (fkc-diffusion, ``applications/images/edm2``): the weight
increments are neither mean-centred nor clamped by default (both are options, ``center`` and
``clamp``; clamping biases the target, a test shows it); resampling is systematic at every step but
the last by default, or adaptive on the ESS with weights accumulated between resamplings; only
reverse-SDE kernels are accepted, since the weights above are derived for that noise level (their
Heun variant evaluates its second stage at the wrong point, METHODS.md section 9).
"""

from __future__ import annotations

import math

import torch

from .. import solvers as _solvers
from ..denoiser import Prediction, _broadcast
from ..guidance.base import DenoiserTransform
from ..guidance.cfg import _check_scale, batch_calls, null_condition
from ..loop import Run
from .particles import Population, SteeringResult, require_reverse_sde
from .resample import get_resampler

__all__ = ["fkc", "FKCTarget", "annealed", "product", "cfg_target"]


def _sq_norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).to(torch.float64).square().sum(1)


class FKCTarget(DenoiserTransform):
    """A target of the Feynman-Kac correctors, usable as a model: its prediction is the target's score.

    Sampling it with any solver gives the uncorrected method (the combined score alone);
    :func:`fkc` adds the weights. ``rate_at(x)`` is the weight rate of the last evaluation, at ``x``:
    the coefficient ``c`` of the weight increment ``c h`` over a log-SNR step ``h`` (``c = w (w-1) |eps_c -
    eps_u|^2`` for CFG: ``G ds`` of the module docstring with ``g^2 ds |s|^2 = 2 h |eps|^2``).
    ``init_scale`` is the factor that takes a draw of the process's prior to the target's Gaussian at
    large noise (``q_T^beta`` and ``q1_T q2_T`` of a Gaussian prior are narrower).
    """

    init_scale = 1.0

    def __init__(self, model):
        super().__init__(model)
        self._last: tuple | None = None

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        pred, rate = self.target(x, t, cond)
        self._last = (x, rate)
        return pred

    def target(self, x: torch.Tensor, t, cond: dict) -> tuple[Prediction, torch.Tensor]:
        raise NotImplementedError

    def rate_at(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            raise RuntimeError(f"{type(self).__name__}: no evaluation at this sample to take the weight rate from")
        return self._last[1]

    def _alpha(self, x: torch.Tensor, t):
        """``alpha(t)`` broadcast to ``x``; annealing and products have no data estimate where it is 0."""
        alpha = self.process.alpha(t)
        if not bool(torch.all(torch.as_tensor(alpha) > 0)):
            raise ValueError(f"{type(self).__name__}: the target's data estimate is undefined where alpha(t) = 0 "
                             f"(t = {t}, the pure-noise end of {self.process!r}); start the grid below it, e.g. "
                             f"at t = {self.process.t_max} - 1e-3")
        return _broadcast(alpha, x)


class annealed(FKCTarget):  # noqa: N801 - used like a function: annealed(model, beta)
    """The annealed target ``q^beta`` of ``model`` (``beta > 1`` sharpens its modes, ``< 1`` flattens them)."""

    def __init__(self, model, beta: float):
        super().__init__(model)
        self.beta = _check_scale("annealed: beta", beta)
        if not self.beta > 0:
            raise ValueError(f"annealed: beta must be > 0, got {beta!r}")
        self.init_scale = self.beta ** -0.5

    def target(self, x, t, cond):
        pred = self.model(x, t, **cond)
        b, a = self.beta, self._alpha(x, t)
        # a score beta times as large: eps' = beta eps, x0' = (x - sigma eps') / alpha
        return Prediction(b * pred.x0 + (1 - b) * x / a, b * pred.eps), b * (b - 1) * _sq_norm(pred.eps)


def _same_process(p, q) -> bool:
    if p is q:
        return True
    if type(p) is not type(q) or repr(p) != repr(q) or p.t_max != q.t_max or p.t_min != q.t_min:
        return False
    times = torch.linspace(p.t_min, p.t_max, 7, dtype=torch.float64).tolist()
    return all(math.isclose(float(p.alpha(t)), float(q.alpha(t)), rel_tol=1e-12, abs_tol=1e-15)
               and math.isclose(float(p.sigma(t)), float(q.sigma(t)), rel_tol=1e-12, abs_tol=1e-15) for t in times)


class product(FKCTarget):  # noqa: N801 - used like a function: product(first, second)
    """The product of experts ``q1 q2`` of two Denoisers of one process (two evaluations a step).

    ``second_cond`` are conditioning keywords given to ``second`` only (its own prompt or class);
    the run's conditioning goes to both.
    """

    init_scale = 0.5 ** 0.5

    def __init__(self, first, second, *, second_cond: dict | None = None):
        super().__init__(first)
        if not callable(second) or getattr(second, "process", None) is None:
            raise TypeError(f"product: second must be a Denoiser or a transform of one, got {type(second).__name__}")
        if not _same_process(first.process, second.process):
            raise ValueError(f"product: both experts must be Denoisers of one process, got {first.process!r} and "
                             f"{second.process!r}")
        self.second = second
        self.second_cond = dict(second_cond or {})

    @property
    def nfe(self) -> int:
        return self.model.nfe + self.second.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        if value != 0:
            raise ValueError(f"product: nfe can only be reset to 0, got {value!r}")
        self.model.nfe = self.second.nfe = 0

    def target(self, x, t, cond):
        p, q = self.model(x, t, **cond), self.second(x, t, **{**cond, **self.second_cond})
        a = self._alpha(x, t)
        # the summed score: eps' = eps1 + eps2, x0' = (x - sigma eps') / alpha = x0_1 + x0_2 - x / alpha
        inner = (p.eps.reshape(len(x), -1).to(torch.float64) * q.eps.reshape(len(x), -1).to(torch.float64)).sum(1)
        return Prediction(p.x0 + q.x0 - x / a, p.eps + q.eps), 2.0 * inner


class cfg_target(FKCTarget):  # noqa: N801 - used like a function: cfg_target(model, scale)
    """Classifier-free guidance's geometric mean ``q_u^(1-w) q_c^w`` of ``model`` (the target CFG is named for).

    ``uncond`` are the keywords of the unconditional pass (default: the model's null condition), as
    for :class:`diffsampler.guidance.cfg`; both passes run in one network call.
    """

    def __init__(self, model, scale: float, *, uncond: dict | None = None):
        super().__init__(model)
        self.scale = _check_scale("cfg_target: scale", scale)
        self.uncond = uncond

    def target(self, x, t, cond):
        u, c = batch_calls(self.model, x, t, [null_condition(self.model, cond, self.uncond), cond])
        w = self.scale
        return Prediction.extrapolate(u, c, w, x), w * (w - 1) * _sq_norm(c.eps - u.eps)


def _span(lam_from: float, lam_to: float) -> float:
    """The time factor of a step's weight increment ``rate * span``: ``h`` with the noise estimates frozen
    at the step's start. Into ``t = 0`` (``h`` infinite) the score is frozen instead, which gives
    ``(1 - exp(-2h)) / 2 = 1/2``: a frozen noise estimate would make that last step's weight infinite."""
    h = lam_to - lam_from
    return h if math.isfinite(h) else 0.5


@torch.no_grad()  # gradient-free: no graph through the network over the steps
def fkc(target: FKCTarget, x: torch.Tensor, grid, solver, *, particles: int, generator=None,
        ess_threshold: float | None = None, resampler="systematic", center: bool = False,
        clamp: float | None = None, initialise: bool = True, brownian: bool = False, **cond) -> SteeringResult:
    """Sample ``target`` (:func:`annealed`, :func:`product` or :func:`cfg_target`) with Feynman-Kac correctors.

    Parameters
    ----------
    target:
        What to sample; as a model on its own it gives the uncorrected combined-score sampler.
    x, grid:
        As for :func:`diffsampler.sample`; ``x`` is a draw of the process's prior at ``grid[0]``.
    solver:
        A reverse-SDE kernel (``ddpm``, ``euler_ancestral``, ``dpmpp_2m_sde``, ... at ``eta = 1``):
        the weights are derived for the process's own diffusion.
    particles:
        Population size; groups of that many consecutive samples of ``x`` are one population.
    ess_threshold:
        ``None`` resamples every population at every step but the last (the authors'); a number in
        (0, 1] resamples a population when its ESS falls below ``ess_threshold * particles``.
    resampler:
        ``"systematic"`` (the authors'), ``"multinomial"``, ``"stratified"``, ``"residual"`` or a callable.
    center, clamp:
        The authors' heuristics, off by default: subtract each population's mean increment, and clamp
        increments to ``[-clamp, clamp]`` (they use 1 for Euler-Maruyama). Clamping biases the target.
    initialise:
        Scale ``x`` by ``target.init_scale`` first, taking a prior draw to the target's Gaussian at
        large noise (exact when the model's marginal at ``grid[0]`` is the prior).
    generator:
        Every random draw (the solver's noise, the resampling) comes from it.

    Returns a :class:`SteeringResult` whose ``log_weights`` are the final weights (each population's
    logsumexp 0): estimate the target with them. FKC has no reward: ``rewards`` holds the same
    log-weights and ``best`` the heaviest particle of each population.
    """
    if not isinstance(target, FKCTarget):
        raise TypeError(f"fkc: target must be ds.steering.annealed(model, beta), ds.steering.product(first, second) "
                        f"or ds.steering.cfg_target(model, scale), got {type(target).__name__}")
    solver = _solvers.resolve(solver)
    require_reverse_sde(solver, "fkc")
    if ess_threshold is not None and not (isinstance(ess_threshold, (int, float)) and 0 < ess_threshold <= 1):
        raise ValueError(f"fkc: ess_threshold must be None or a number in (0, 1], got {ess_threshold!r}")
    if clamp is not None and not (isinstance(clamp, (int, float)) and not isinstance(clamp, bool) and clamp > 0):
        raise ValueError(f"fkc: clamp must be None or a number > 0, got {clamp!r}")
    resampler = get_resampler(resampler)
    if initialise and target.init_scale != 1.0:
        x = x * target.init_scale
    run = Run(target, x, grid, solver, generator=generator, brownian=brownian, **cond).watch()
    pop = Population("fkc", run, None, particles, generator)
    lam = run.knots.lam
    steps = len(run)
    span = [_span(lam[i], lam[i + 1]) for i in range(steps)]
    log_w = torch.zeros(x.shape[0], dtype=torch.float64)
    while not run.done:
        i = run.i
        run.evaluate()  # the step's own first evaluation, kept for it: the weights read its scores
        increment = target.rate_at(run.x) * span[i]
        if center:
            increment = increment - pop.grouped(increment).mean(1).repeat_interleave(particles)
        if clamp is not None:
            increment = increment.clamp(-clamp, clamp)
        log_w = log_w + increment
        if i < steps - 1:
            indices, chosen = pop.resample(resampler, log_w, ess_threshold)
            if indices is not None:
                run.take(indices)
                log_w = torch.where(chosen, 0.0, log_w)[indices]
        run.step()
    weights = pop.normalised(log_w)
    return pop.result(log_w, weights, run.sample_evaluations)
