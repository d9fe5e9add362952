"""Resamplers and the effective sample size: unbiased counts, their variances against closed forms,
exact cases, float edge cases, group independence and errors."""

import functools
import math

import pytest
import torch

from conftest import stat_size
from diffsampler.steering import resample as rs
from diffsampler.steering.resample import RESAMPLERS, ess, get_resampler, resample_groups

NAMES = list(RESAMPLERS)
INF = math.inf

# Weight vectors of the statistical tests: (log_w, n, repetitions R). No n * w_i is an integer,
# so floor(n w_i) cannot flip under float rounding of the normalised weights. R is reduced (a few seconds
# for all four schemes) unless DIFFSAMPLER_FULL_STATS=1; every tolerance below scales with it.
CASES = {
    # zero weights at both kinds of place (first-but-one and inner), n above the population size
    "zeros": (torch.tensor([0.0, 0.07, 0.18, 0.33, 0.0, 0.42], dtype=torch.float64).log(), 10, stat_size(600, 6000)),
    # very unequal: one particle holds 98% of the mass, others 1e-3 to 1e-11 of it; -inf at both ends
    "unequal": (torch.tensor([-INF, 0.0, -3.0, -8.0, 4.0, -20.0, -INF], dtype=torch.float64), 16, stat_size(400, 4000)),
}


def _weights(case):
    log_w, n, _ = CASES[case]
    return torch.softmax(log_w, 0), n


@functools.lru_cache(maxsize=None)
def _counts(name, case):
    """(R, len) counts of each index over R seeded repetitions (cached: shared by several tests)."""
    log_w, n, reps = CASES[case]
    g = torch.Generator().manual_seed(1000 + NAMES.index(name) + 10 * list(CASES).index(case))
    out = torch.stack([torch.bincount(RESAMPLERS[name](g, log_w, n), minlength=log_w.numel()) for _ in range(reps)])
    return out.to(torch.float64)


def _count_variance(name, w, n):
    """Exact per-index count variance of each scheme (closed forms, written independently of the module)."""
    nw = n * w
    frac = nw - torch.floor(nw)
    if name == "multinomial":  # Binomial(n, w_i)
        return nw * (1 - w)
    if name == "systematic":  # floor(n w_i) + Bernoulli(frac)
        return frac * (1 - frac)
    if name == "residual":  # floor(n w_i) + Binomial(R, frac / R), R = n - sum floor
        rest = n - torch.floor(nw).sum()
        return frac * (1 - frac / rest)
    if name == "stratified":  # sum over strata k of Bernoulli(p_k), p_k = n |interval_i ∩ stratum_k|
        cdf = torch.cat([torch.zeros(1, dtype=w.dtype), torch.cumsum(w, 0)])
        edges = torch.arange(n + 1, dtype=w.dtype) / n
        lo = torch.maximum(cdf[:-1, None], edges[None, :-1])
        hi = torch.minimum(cdf[1:, None], edges[None, 1:])
        p = n * (hi - lo).clamp(min=0)
        return (p * (1 - p)).sum(1)
    raise KeyError(name)


# --- unbiased counts, variances ------------------------------------------------------------------------


@pytest.mark.statistical
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_mean_counts_are_n_w(name, case):
    w, n = _weights(case)
    counts = _counts(name, case)
    reps = counts.shape[0]
    # Every scheme's count variance is at most the multinomial n w (1 - w) (Douc, Cappé & Moulines 2005;
    # for systematic, f (1 - f) <= n w (1 - w)), so the mean of R counts has standard error at most
    # sqrt(n w (1 - w) / R): 5 of them is a CLT bound exceeded with probability < 1e-6. The extra 5 / R
    # covers the rare indices (n R w_i << 1) where the CLT fails: there, failing would need 6 or more
    # hits of a count whose mean over all R repetitions is below 1.
    tol = 5 * torch.sqrt(n * w * (1 - w) / reps) + 5 / reps
    err = (counts.mean(0) - n * w).abs()
    assert torch.all(err <= tol), f"{name}: mean counts {counts.mean(0).tolist()} vs n w {(n * w).tolist()}"
    assert torch.all(counts.sum(1) == n)
    assert torch.all(counts[:, w == 0] == 0)  # -inf log-weights are never chosen


@pytest.mark.statistical
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_count_variances_match_closed_forms(name, case):
    w, n = _weights(case)
    counts = _counts(name, case)
    reps = counts.shape[0]
    observed = counts.var(0)
    # Standard error of a sample variance: the standard deviation of (C - mean)^2 over sqrt(R);
    # 5 of them, plus 5 / R for the rare indices (as for the means).
    se = ((counts - counts.mean(0)) ** 2).std(0) / math.sqrt(reps)
    expected = _count_variance(name, w, n)
    assert torch.all((observed - expected).abs() <= 5 * se + 5 / reps), \
        f"{name}: count variances {observed.tolist()} vs {expected.tolist()}"


@pytest.mark.statistical
@pytest.mark.parametrize("name", ["systematic", "stratified", "residual"])
def test_lower_count_variance_than_multinomial(name):
    # Douc, Cappé & Moulines (2005): residual and stratified counts never vary more than multinomial
    # ones; systematic counts are floor or ceil of n w_i. On the "zeros" weights every non-zero index has
    # a gap of 0.19 or more below n w (1 - w) (closed forms above), against 5 standard errors of the sample
    # variance of at most 0.1 at R = 600 (0.08 measured at R = 1000 scaled by sqrt(1000 / 600)): the
    # observed variance must sit below the multinomial one by that margin, so a scheme that draws its
    # points independently (multinomial in disguise) fails.
    w, n = _weights("zeros")
    counts = _counts(name, "zeros")
    reps = counts.shape[0]
    live = w > 0
    multinomial = n * w * (1 - w)
    assert torch.all(_count_variance(name, w, n)[live] < multinomial[live] - 0.15)
    se = ((counts - counts.mean(0)) ** 2).std(0) / math.sqrt(reps)
    observed = counts.var(0)
    assert torch.all((observed + 5 * se)[live] < multinomial[live]), \
        f"{name}: count variances {observed.tolist()} vs multinomial {multinomial.tolist()}"
    # and the multinomial baseline really is n w (1 - w): its sample variances within 5 standard errors
    base = _counts("multinomial", "zeros")
    base_se = ((base - base.mean(0)) ** 2).std(0) / math.sqrt(reps)
    assert torch.all((base.var(0) - multinomial).abs() <= 5 * base_se)


# --- exact cases -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["systematic", "stratified", "residual"])
@pytest.mark.parametrize("size", [1, 7, 10, 64])
def test_uniform_weights_keep_every_particle(name, size):
    # Systematic and stratified put exactly one point in each stratum [k/n, (k+1)/n), which with equal
    # weights is particle k's interval; residual keeps floor(n / n) = 1 copy of each and draws nothing.
    g = torch.Generator().manual_seed(size)
    for reps in (1, 3):
        for _ in range(20):
            idx = RESAMPLERS[name](g, torch.full((size,), -2.5), reps * size)
            assert torch.equal(idx, torch.arange(size).repeat_interleave(reps))


def test_multinomial_does_not_keep_every_particle():
    # The exactness above is a property of the schemes, not of the test: independent draws duplicate.
    g = torch.Generator().manual_seed(0)
    assert any(not torch.equal(rs.multinomial(g, torch.zeros(10), 10), torch.arange(10)) for _ in range(5))


@pytest.mark.parametrize("case", list(CASES))
def test_systematic_counts_are_floor_or_ceil(case):
    w, n = _weights(case)
    counts = _counts("systematic", case)
    assert torch.all((counts == torch.floor(n * w)) | (counts == torch.ceil(n * w)))


@pytest.mark.parametrize("case", list(CASES))
def test_residual_keeps_the_deterministic_copies(case):
    w, n = _weights(case)
    counts = _counts("residual", case)
    floors = torch.floor(n * w)
    assert floors.sum() > 0  # the cases do have a deterministic part
    assert torch.all(counts >= floors)
    # and only n - sum floor draws are random: no index gets more than one extra copy per residual draw
    assert torch.all(counts <= floors + (n - floors.sum()))


@pytest.mark.parametrize("name", NAMES)
def test_indices_are_sorted_int64_and_reproducible(name):
    log_w = torch.randn(13, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    for n in (1, 5, 13, 40):
        a = RESAMPLERS[name](torch.Generator().manual_seed(n), log_w, n)
        b = RESAMPLERS[name](torch.Generator().manual_seed(n), log_w, n)
        assert a.dtype == torch.int64 and a.shape == (n,)
        assert torch.all(a[1:] >= a[:-1])
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_only_the_given_generator_is_used(name):
    torch.manual_seed(7)
    state = torch.get_rng_state()
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    RESAMPLERS[name](g, torch.tensor([0.0, -1.0, 0.5]), 8)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator did not move
    if name != "residual":  # residual may need no draw at all; these always draw
        assert not torch.equal(g.get_state(), before)
    # None means torch's default generator, as for diffsampler.noise.sample_keys
    torch.manual_seed(11)
    a = RESAMPLERS[name](None, torch.tensor([0.0, -1.0, 0.5]), 8)
    torch.manual_seed(11)
    assert torch.equal(a, RESAMPLERS[name](None, torch.tensor([0.0, -1.0, 0.5]), 8))


# --- float edge cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_minus_inf_entries_are_never_chosen(name):
    log_w = torch.tensor([-INF, 0.3, -INF, -1.0, 2.0, -INF, -0.5, -INF])
    dead = torch.isneginf(log_w)
    g = torch.Generator().manual_seed(2)
    for rep in range(150):
        idx = RESAMPLERS[name](g, log_w, 1 + rep % 17)
        assert not dead[idx].any()


def test_inverse_cdf_clamps_past_a_cdf_that_ends_below_one():
    w = torch.full((10,), 0.1, dtype=torch.float64)
    assert torch.cumsum(w, 0)[-1] < 1  # ten float64 0.1s sum to 0.9999999999999999
    u = torch.tensor([0.0, 0.55, 1 - 2**-53, 1.0], dtype=torch.float64)
    assert rs._inverse_cdf(w, u).tolist() == [0, 5, 9, 9]
    # with zero weights at the end, the clamp stops at the last positive one
    w0 = torch.cat([w, torch.zeros(2, dtype=torch.float64)])
    assert rs._inverse_cdf(w0, u).tolist() == [0, 5, 9, 9]


@pytest.mark.parametrize("name", NAMES)
def test_points_past_the_cdf_end_give_valid_indices(name, monkeypatch):
    # Force the uniforms to their largest values: systematic's last point (9 + U) / 10 rounds to 1.0 and
    # the others' points lie above the cumulative sum 0.9999999999999999 of ten weights of 0.1.
    monkeypatch.setattr(rs, "_uniforms", lambda generator, k: torch.full((k,), 1 - 2**-53, dtype=torch.float64))
    for log_w in (torch.zeros(10), torch.cat([torch.zeros(10), torch.tensor([-INF])])):
        for n in (10, 15):  # residual: 15 = 10 copies + 5 residual draws from weights 0.1
            idx = RESAMPLERS[name](None, log_w, n)
            assert idx.shape == (n,) and int(idx.min()) >= 0 and int(idx.max()) <= 9


@pytest.mark.parametrize("name", NAMES)
def test_float32_weights_that_do_not_sum_to_one(name):
    # float32 0.1 is 0.100000001490116: the weights' float32 sum is not 1, and in float64 it is not either
    w = torch.full((10,), 0.1, dtype=torch.float32)
    assert w.sum(dtype=torch.float64) != 1
    log_w = w.log()
    g = torch.Generator().manual_seed(4)
    for n in (1, 10, 17):
        for _ in range(10):
            idx = RESAMPLERS[name](g, log_w, n)
            assert idx.dtype == torch.int64 and idx.shape == (n,)
            assert int(idx.min()) >= 0 and int(idx.max()) < 10
    # a near-degenerate float32 vector: one weight within 1e-16 of all, the rest tiny
    log_w = torch.tensor([0.0, -37.0, -38.0, -INF], dtype=torch.float32)
    for _ in range(10):
        assert torch.equal(RESAMPLERS[name](g, log_w, 4), torch.zeros(4, dtype=torch.int64))


def test_large_log_weights_do_not_overflow():
    log_w = torch.tensor([1000.0, 1000.0 + math.log(3.0)], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    assert rs.systematic(g, log_w, 4).tolist() == [0, 1, 1, 1]
    assert ess(log_w).item() == pytest.approx(1.6, rel=1e-12)


# --- effective sample size ------------------------------------------------------------------------------


def test_ess_known_values():
    assert ess(torch.zeros(7, dtype=torch.float64)).item() == pytest.approx(7, rel=1e-12)
    assert ess(torch.tensor([-INF, 2.0, -INF])).item() == 1.0
    assert ess(torch.tensor([0.0, 0.0, -INF])).item() == pytest.approx(2, rel=1e-6)
    # w = (1/4, 3/4): 1 / (1/16 + 9/16) = 1.6
    assert ess(torch.tensor([0.25, 0.75], dtype=torch.float64).log()).item() == pytest.approx(1.6, rel=1e-12)


def test_ess_is_invariant_to_a_constant():
    log_w = torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base = ess(log_w)
    for c in (-700.0, -3.0, 5.0, 800.0):  # exp(800) and exp(-700 * 2) would overflow / underflow naively
        assert ess(log_w + c).item() == pytest.approx(base.item(), rel=1e-12)
    w = log_w.exp()
    assert base.item() == pytest.approx((w.sum() ** 2 / (w**2).sum()).item(), rel=1e-12)


def test_ess_over_rows():
    rows = torch.stack([torch.zeros(4), torch.tensor([0.0, -INF, -INF, -INF]), torch.tensor([0.25, 0.75, 0, 0]).log()])
    out = ess(rows)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert out.tolist() == pytest.approx([4.0, 1.0, 1.6], rel=1e-6)
    assert ess(rows.reshape(1, 3, 4).expand(2, 3, 4)).shape == (2, 3)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([0.0, math.nan]), "log_w.*NaN"),
    (torch.tensor([0.0, INF]), r"log_w.*\+inf"),
    (torch.tensor([[0.0, 1.0], [-INF, -INF]]), r"log_w row \[1\] is all -inf"),
    (torch.tensor(0.0), "log_w.*dimension"),
    (torch.zeros(3, 0), "log_w.*non-empty"),
    (torch.zeros(3, dtype=torch.int64), "log_w.*floating"),
])
def test_ess_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ess(bad)


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("log_w, n, match", [
    (torch.tensor([0.0, math.nan]), 3, "log_w.*NaN at index"),
    (torch.tensor([-INF, -INF]), 3, "log_w is all -inf"),
    (torch.tensor([0.0, INF]), 3, r"log_w.*\+inf"),
    (torch.zeros(2, 3), 3, "log_w must be 1-D.*got shape \\(2, 3\\)"),
    (torch.tensor(0.0), 3, "log_w must be 1-D"),
    (torch.zeros(0), 3, "log_w must be 1-D and non-empty"),
    (torch.zeros(3, dtype=torch.int64), 3, "log_w must be a floating tensor"),
    (torch.zeros(3), 0, "n must be an integer >= 1, got 0"),
    (torch.zeros(3), -2, "n must be an integer >= 1, got -2"),
    (torch.zeros(3), 2.5, "n must be an integer >= 1, got 2.5"),
    (torch.zeros(3), True, "n must be an integer >= 1, got True"),
])
def test_resampler_errors(name, log_w, n, match):
    with pytest.raises(ValueError, match=f"{name}: {match}"):
        RESAMPLERS[name](torch.Generator().manual_seed(0), log_w, n)


def test_get_resampler():
    for name, fn in RESAMPLERS.items():
        assert get_resampler(name) is fn
    custom = lambda generator, log_w, n: torch.zeros(n, dtype=torch.int64)  # noqa: E731
    assert get_resampler(custom) is custom
    for bad in ("systematicc", 3, None):
        with pytest.raises(ValueError, match="multinomial, systematic, stratified, residual"):
            get_resampler(bad)


# --- groups ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_groups_stay_apart_and_match_resampling_alone(name):
    groups, particles = 4, 6
    log_w = 3 * torch.randn(groups * particles, generator=torch.Generator().manual_seed(9))
    log_w[[0, 7, 13, 23]] = -INF
    gens = [torch.Generator().manual_seed(100 + g) for g in range(groups)]
    out = resample_groups(name, gens, log_w, particles)
    assert out.shape == (groups * particles,) and out.dtype == torch.int64
    for g in range(groups):
        part = out[g * particles:(g + 1) * particles]
        assert torch.all((part >= g * particles) & (part < (g + 1) * particles))  # never leaves its group
        alone = RESAMPLERS[name](torch.Generator().manual_seed(100 + g), log_w[g * particles:(g + 1) * particles],
                                 particles)
        assert torch.equal(part, alone + g * particles)
    # group 2 of a batch of 1 group gives the same as inside a batch of 4
    only = resample_groups(name, [torch.Generator().manual_seed(102)], log_w[12:18], particles)
    assert torch.equal(only + 12, out[12:18])
    assert not torch.isneginf(log_w[out]).any()


def test_groups_with_a_callable():
    calls = []

    def first(generator, log_w, n):
        calls.append((generator, log_w.shape))
        return torch.zeros(n, dtype=torch.int64)

    gens = [torch.Generator(), torch.Generator()]
    assert resample_groups(first, gens, torch.zeros(6), 3).tolist() == [0, 0, 0, 3, 3, 3]
    assert [c[0] for c in calls] == gens and all(c[1] == (3,) for c in calls)


@pytest.mark.parametrize("log_w, particles, gens, match", [
    (torch.zeros(10), 3, 3, r"batch \(10\) must be a multiple of particles \(3\)"),
    (torch.zeros(9), 3, 2, r"one generator per group \(3 = 9 / 3\), got 2"),
    (torch.zeros(9), 0, 3, "particles must be an integer >= 1, got 0"),
    (torch.zeros(3, 3), 3, 3, r"log_w must be a non-empty 1-D tensor of shape \(batch,\), got \(3, 3\)"),
    (torch.zeros(0), 3, 0, r"log_w must be a non-empty 1-D tensor of shape \(batch,\), got \(0,\)"),
    (torch.tensor([0.0, 1, 2, -INF, -INF, -INF]), 3, 2, r"group 1 of log_w \(entries 3:6\) is all -inf"),
    (torch.tensor([0.0, 1, math.nan, 0.0]), 2, 2, r"log_w.*NaN at index \[2\]"),
])
def test_group_errors(log_w, particles, gens, match):
    with pytest.raises(ValueError, match=f"resample_groups: .*{match}"):
        resample_groups("systematic", [torch.Generator() for _ in range(gens)], log_w, particles)
