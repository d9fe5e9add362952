"""Resampling of weighted particle populations, and their effective sample size.

A resampler takes unnormalised log-weights ``log_w`` of one population and a
count ``n``, and returns ``n`` parent indices drawn so that index ``i`` is
chosen ``n w_i`` times in expectation (``w`` the normalised weights): all four
schemes here are unbiased in that sense. They differ in the variance of the
counts. Douc, Cappé & Moulines (2005), "Comparison of resampling schemes for
particle filtering", show that residual and stratified resampling never give a
resampled average of any function a larger conditional variance than
multinomial resampling does; systematic resampling is usually the lowest in
practice, but they give weights for which its average has a larger variance.
For the count of a single index all three are at most the multinomial
``n w_i (1 - w_i)``.

Every random number comes from the ``generator`` passed in (``None`` means
torch's default generator, as for :func:`diffsampler.noise.sample_keys`),
never from another global state, so a steered run is reproducible from its
generators. The inverse CDF is computed in float64 on the CPU: the populations
are small, the generators are CPU generators, and a float32 cumulative sum
drops weights below about 1e-7 of the running total, which float64 keeps.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["ess", "multinomial", "systematic", "stratified", "residual", "RESAMPLERS", "get_resampler",
           "resample_groups"]

Resampler = Callable[[torch.Generator | None, Tensor, int], Tensor]


def ess(log_w: Tensor) -> Tensor:
    """Effective sample size ``(sum w)^2 / sum w^2`` of the weights ``exp(log_w)``, over the last dimension.

    Parameters
    ----------
    log_w : Tensor
        Unnormalised log-weights, floating, at least 1-D; ``-inf`` is a weight of 0. A
        ``(groups, particles)`` tensor gives one value per group.

    Returns
    -------
    Tensor
        Shape ``log_w.shape[:-1]``, dtype of ``log_w``; between 1 and the number of non-zero weights.

    Computed as ``exp(2 logsumexp(l) - logsumexp(2 l))`` after subtracting each row's maximum, so
    neither very large nor very small log-weights overflow or underflow, and the result does not
    change when a constant is added to a row.
    """
    if not isinstance(log_w, Tensor):
        raise TypeError(f"ess: log_w must be a torch.Tensor, got {type(log_w).__name__}")
    if not log_w.is_floating_point():
        raise ValueError(f"ess: log_w must be a floating tensor, got dtype {log_w.dtype}")
    if log_w.ndim < 1 or log_w.shape[-1] == 0:
        raise ValueError(f"ess: log_w must have at least 1 dimension and a non-empty last one, "
                         f"got shape {tuple(log_w.shape)}")
    _check_values("ess", "log_w", log_w)
    l = log_w.to(torch.float64)
    l = l - l.amax(dim=-1, keepdim=True)  # row max is finite (checked), so this is exact and l <= 0
    out = torch.exp(2.0 * torch.logsumexp(l, dim=-1) - torch.logsumexp(2.0 * l, dim=-1))
    return out.to(log_w.dtype)


def multinomial(generator: torch.Generator | None, log_w: Tensor, n: int) -> Tensor:
    """``n`` independent draws from the categorical distribution of ``softmax(log_w)``.

    Parameters
    ----------
    generator : torch.Generator or None
        Source of the ``n`` uniforms (``None``: torch's default generator).
    log_w : Tensor
        1-D unnormalised log-weights of one population; ``-inf`` entries are never chosen.
    n : int
        Number of indices to draw, at least 1.

    Returns
    -------
    Tensor
        int64 indices of shape ``(n,)``, sorted ascending, on ``log_w``'s device. The count of index
        ``i`` is Binomial(``n``, ``w_i``): the baseline variance ``n w_i (1 - w_i)``.
    """
    w, n = _prepare("multinomial", log_w, n)
    u = _multinomial_points(generator, n)  # sorted points give sorted indices
    return _finish(_inverse_cdf(w, u), log_w)


def stratified(generator: torch.Generator | None, log_w: Tensor, n: int) -> Tensor:
    """One draw in each of the ``n`` strata ``[k/n, (k+1)/n)`` of the weights' CDF.

    The points are ``(k + U_k) / n`` with independent uniforms ``U_k``; the count of each index has
    at most the multinomial variance (Douc, Cappé & Moulines 2005). Parameters and result as for
    :func:`multinomial`.
    """
    w, n = _prepare("stratified", log_w, n)
    u = _stratified_points(generator, n)
    return _finish(_inverse_cdf(w, u), log_w)


def systematic(generator: torch.Generator | None, log_w: Tensor, n: int) -> Tensor:
    """The ``n`` evenly spaced points ``(k + U) / n`` of the weights' CDF, one uniform ``U`` for all.

    Index ``i`` is then chosen ``floor(n w_i)`` or ``ceil(n w_i)`` times, so equal weights with
    ``n`` equal to the population size keep every particle exactly once, and a count's variance is
    ``f (1 - f)`` with ``f`` the fractional part of ``n w_i``, at most the multinomial one. Usually the
    lowest variance of the four for averages too, though not for every weight vector (Douc, Cappé &
    Moulines 2005 give a counterexample). Parameters and result as for :func:`multinomial`.
    """
    w, n = _prepare("systematic", log_w, n)
    u = _systematic_points(generator, n)
    return _finish(_inverse_cdf(w, u), log_w)


def residual(generator: torch.Generator | None, log_w: Tensor, n: int) -> Tensor:
    """``floor(n w_i)`` deterministic copies of each index, the remaining draws multinomial.

    The ``R = n - sum_i floor(n w_i)`` remaining indices are drawn independently from the residual
    weights ``(n w_i - floor(n w_i)) / R`` (residual-multinomial, the variant analysed by Douc,
    Cappé & Moulines 2005), so the count of index ``i`` has variance ``R r_i (1 - r_i)``, at most the
    multinomial one. Parameters and result as for :func:`multinomial`; the generator gives ``R``
    uniforms (none when ``R`` is 0).
    """
    w, n = _prepare("residual", log_w, n)
    scaled = n * w
    copies = torch.floor(scaled)
    # sum(copies) <= n * sum(w) <= n (1 + len * 2^-53) < n + 1, so rest >= 0.
    rest = n - int(copies.sum().item())
    # Copy k of the deterministic part belongs to the index whose cumulative count first exceeds k
    # (the same as repeat_interleave, which took about 15 ms a call on our CPUs against 0.04 ms for this).
    kept = torch.searchsorted(torch.cumsum(copies, dim=0), torch.arange(n - rest, dtype=torch.float64), right=True)
    if rest > 0:
        left = scaled - copies
        drawn = _inverse_cdf(left / left.sum(), _uniforms(generator, rest))
        kept = torch.sort(torch.cat([kept, drawn])).values
    return _finish(kept, log_w)


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "systematic": systematic,
    "stratified": stratified,
    "residual": residual,
}


def get_resampler(name_or_callable: str | Resampler) -> Resampler:
    """The resampler called ``name_or_callable``, or the callable itself; an unknown name lists the valid ones."""
    if callable(name_or_callable):
        return name_or_callable
    if isinstance(name_or_callable, str) and name_or_callable in RESAMPLERS:
        return RESAMPLERS[name_or_callable]
    raise ValueError(f"resampler must be one of {', '.join(RESAMPLERS)} or a callable "
                     f"(generator, log_w, n) -> indices, got {name_or_callable!r}")


def resample_groups(resampler: str | Resampler, generators: Sequence[torch.Generator | None], log_w: Tensor,
                    particles: int) -> Tensor:
    """Resample each group of ``particles`` consecutive samples on its own, with its own generator.

    Parameters
    ----------
    resampler : str or callable
        A name in :data:`RESAMPLERS` or a callable ``(generator, log_w, n) -> indices``.
    generators : list of torch.Generator
        One per group: group ``g`` draws only from ``generators[g]``, so its result does not depend on
        how many other groups the batch holds.
    log_w : Tensor
        Shape ``(batch,)``; samples ``g * particles`` to ``(g + 1) * particles - 1`` are population ``g``.
    particles : int
        Population size, at least 1, dividing ``batch``.

    Returns
    -------
    Tensor
        int64 global indices of shape ``(batch,)``: entry ``j`` of group ``g`` is in
        ``[g * particles, (g + 1) * particles)``, so populations never mix; sorted within each group.
    """
    fn = get_resampler(resampler)
    if not isinstance(log_w, Tensor) or log_w.ndim != 1 or log_w.numel() == 0:
        shape = tuple(log_w.shape) if isinstance(log_w, Tensor) else type(log_w).__name__
        raise ValueError(f"resample_groups: log_w must be a non-empty 1-D tensor of shape (batch,), got {shape}")
    particles = _count("resample_groups", "particles", particles)
    batch = log_w.shape[0]
    if batch % particles:
        raise ValueError(f"resample_groups: the batch ({batch}) must be a multiple of particles ({particles})")
    groups = batch // particles
    if not isinstance(generators, (list, tuple)) or len(generators) != groups:
        got = len(generators) if isinstance(generators, (list, tuple)) else type(generators).__name__
        raise ValueError(f"resample_groups: generators must be a list of one generator per group "
                         f"({groups} = {batch} / {particles}), got {got}")
    if not log_w.is_floating_point():
        raise ValueError(f"resample_groups: log_w must be a floating tensor, got dtype {log_w.dtype}")
    # Checked here, before any group is drawn, so that an error names the group by its place in the batch.
    _check_values("resample_groups", "log_w", log_w)
    dead = torch.isneginf(log_w.reshape(groups, particles)).all(dim=1)
    if dead.any():
        g = int(torch.nonzero(dead)[0].item())
        raise ValueError(f"resample_groups: group {g} of log_w (entries {g * particles}:{(g + 1) * particles}) "
                         f"is all -inf (every weight 0); each group needs at least one finite entry")
    offsets = torch.arange(groups, dtype=torch.int64)[:, None] * particles
    points = _POINTS.get(fn)
    if points is not None:
        # The same draws as resampling each group alone (each group's uniforms from its own generator,
        # in the same order), with the weights and inverse CDFs of all groups computed at once: a call
        # per group costs about 0.5 ms, most of it Python, and FK resamples every group at every step.
        l = log_w.detach().to("cpu", torch.float64).reshape(groups, particles)
        w = torch.exp(l - l.max(dim=1, keepdim=True).values)
        w = w / w.sum(dim=1, keepdim=True)
        u = torch.stack([points(gen, particles) for gen in generators])
        idx = torch.searchsorted(torch.cumsum(w, dim=1), u, right=True)
        positions = torch.arange(particles).expand(groups, -1)
        last = torch.where(w > 0, positions, torch.full_like(positions, -1)).max(dim=1, keepdim=True).values
        return (torch.minimum(idx, last) + offsets).reshape(-1).to(log_w.device)
    out = []
    for g in range(groups):
        lo = g * particles
        idx = fn(generators[g], log_w[lo:lo + particles], particles)
        out.append(idx.to(device=log_w.device, dtype=torch.int64) + lo)
    return torch.cat(out)


def _multinomial_points(generator, n: int) -> Tensor:
    return torch.sort(_uniforms(generator, n)).values


def _stratified_points(generator, n: int) -> Tensor:
    return (torch.arange(n, dtype=torch.float64) + _uniforms(generator, n)) / n


def _systematic_points(generator, n: int) -> Tensor:
    return (torch.arange(n, dtype=torch.float64) + _uniforms(generator, 1)) / n


# The points in [0, 1) each inverse-CDF resampler draws (residual draws a data-dependent number).
_POINTS = {}


# --- helpers -------------------------------------------------------------------------------------


def _check_values(fn: str, name: str, log_w: Tensor) -> None:
    """NaN and +inf are errors; -inf is a zero weight, allowed unless a whole row is -inf."""
    if torch.isnan(log_w).any():
        where = torch.nonzero(torch.isnan(log_w))[0].tolist()
        raise ValueError(f"{fn}: {name} must hold finite log-weights or -inf (weight 0), got NaN at index {where}")
    if torch.isposinf(log_w).any():
        where = torch.nonzero(torch.isposinf(log_w))[0].tolist()
        raise ValueError(f"{fn}: {name} must hold finite log-weights or -inf (weight 0), got +inf at index {where}")
    dead = torch.isneginf(log_w).all(dim=-1)
    if dead.any():
        row = f" row {torch.nonzero(dead)[0].tolist()}" if log_w.ndim > 1 else ""
        raise ValueError(f"{fn}: {name}{row} is all -inf (every weight 0); at least one entry must be finite")


def _count(fn: str, name: str, n) -> int:
    if isinstance(n, bool):
        raise ValueError(f"{fn}: {name} must be an integer >= 1, got {n!r}")
    try:
        value = operator.index(n)
    except TypeError:
        raise ValueError(f"{fn}: {name} must be an integer >= 1, got {n!r}") from None
    if value < 1:
        raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value}")
    return value


def _prepare(fn: str, log_w: Tensor, n) -> tuple[Tensor, int]:
    """Validated normalised weights (float64, CPU) and count."""
    if not isinstance(log_w, Tensor):
        raise TypeError(f"{fn}: log_w must be a torch.Tensor, got {type(log_w).__name__}")
    if not log_w.is_floating_point():
        raise ValueError(f"{fn}: log_w must be a floating tensor, got dtype {log_w.dtype}")
    if log_w.ndim != 1 or log_w.numel() == 0:
        raise ValueError(f"{fn}: log_w must be 1-D and non-empty (one population), got shape {tuple(log_w.shape)}")
    n = _count(fn, "n", n)
    l = log_w.detach().to("cpu", torch.float64)
    top = float(l.max())  # NaN if any entry is NaN: one synchronisation checks NaN, +inf and all -inf
    if not -math.inf < top < math.inf:
        _check_values(fn, "log_w", log_w)  # raises, naming what is wrong
    w = torch.exp(l - top)  # top is finite, so the largest weight is exactly 1 before normalising
    return w / w.sum(), n


def _uniforms(generator: torch.Generator | None, k: int) -> Tensor:
    """``k`` float64 uniforms in [0, 1) from ``generator`` alone, returned on the CPU."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return torch.rand(k, generator=generator, dtype=torch.float64, device=device).cpu()


def _inverse_cdf(w: Tensor, u: Tensor) -> Tensor:
    """The index ``i`` with ``cdf[i-1] <= u < cdf[i]`` for each point ``u`` in [0, 1).

    ``right=True`` makes an index of zero weight an empty interval, never chosen. The float64 cumsum
    can end a few ulps below 1 (ten weights of 0.1 sum to 0.9999999999999999), and then a point above
    its end gets ``len(w)``; such points belong to the last interval of positive weight, so the result
    is clamped to that index, which is at most ``len(w) - 1`` and never an index of zero weight.
    """
    cdf = torch.cumsum(w, dim=0)
    idx = torch.searchsorted(cdf, u, right=True)
    last = int(torch.nonzero(w > 0)[-1].item())
    return idx.clamp_(0, last)


def _finish(idx: Tensor, log_w: Tensor) -> Tensor:
    # Every resampler returns its indices sorted ascending, so that the copies of one parent are
    # adjacent: the caller's gather then reads each parent's memory in order, a population's result
    # is a pure function of its counts, and two draws with the same counts compare equal as tensors.
    # Increasing points give increasing indices (the inverse CDF is monotone), so only multinomial
    # (which sorts its uniforms) and residual (which merges two sorted parts) need a sort.
    return idx.to(torch.int64).to(log_w.device)


_POINTS.update({multinomial: _multinomial_points, stratified: _stratified_points, systematic: _systematic_points})
