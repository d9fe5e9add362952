"""The keyed noise is i.i.d. standard normal within a sample, not only across samples.

tests/test_noise.py checks the noise's marginal and its correlation across samples,
steps and streams on small samples; a bug that made neighbouring elements of one
sample share their random draw passed all of it. Here every check looks inside
high-dimensional samples (4 x 64 x 64, as a latent image): marginal moments,
correlations of values and of squares between elements at the offsets where the
construction could leak (neighbours, the row, the channel, and the Box-Muller
partner: element ``j`` and ``j + ceil(n / 2)`` share one pair of uniforms, cosine
half then sine half), a spectral test, an ordinal-pattern test, and cross-correlations
at every shift between samples, steps and streams. Then the same for the increments
of the Brownian path.

Tolerances. Every check is a set of statistics that are N(0, 1) under the null
(z-scores built from the sample size: a correlation estimated from n independent
pairs has standard deviation 1/sqrt(n), a mean of n values of variance v has
sqrt(v/n)) or have a known chi-square / Kolmogorov law. A test with ``m``
statistics bounds them all by ``z_limit(m)``, the Bonferroni bound under which a
correct generator fails with probability below ``ALPHA`` = 1e-6 (4.9 sd for one
statistic, 6.5 for ten thousand). The seeds are fixed, so a pass is reproducible;
the bound says how unlikely it was to need a lucky seed.
"""

import math

import pytest
import torch
from scipy import stats

from conftest import stat_size
from diffsampler.noise import BrownianNoise, StepNoise, sample_keys, standard_normal

ALPHA = 1e-6  # probability that a correct generator fails one assertion (all the statistics it bounds together)
LATENT = (4, 64, 64)  # one sample: 16384 elements, rows of 64, channels of 4096
ODD = (3, 33, 33)  # 3267 elements: the sine half is one element shorter than the cosine half


def z_limit(count: int = 1) -> float:
    """The bound on |z| for ``count`` statistics that are N(0, 1) under the null: by Bonferroni, all of
    them stay inside it with probability at least 1 - ALPHA."""
    return float(stats.norm.isf(ALPHA / (2 * count)))


def chi2_limit(df: int, count: int = 1) -> float:
    """The same for ``count`` chi-square statistics with ``df`` degrees of freedom (one-sided)."""
    return float(stats.chi2.isf(ALPHA / count, df))


def _gaussian_moment(k: int) -> float:
    """E[Z^k] for Z ~ N(0, 1): 0 for odd k, (k - 1)!! for even k."""
    return 0.0 if k % 2 else float(math.prod(range(k - 1, 0, -2)))


def moment_z(x: torch.Tensor, k: int) -> float:
    """z-score of the raw moment mean(x^k) against N(0, 1): its null standard deviation is
    sqrt((E[Z^2k] - E[Z^k]^2) / n) (for k = 1..4: 1, sqrt(2), sqrt(15), sqrt(96), over sqrt(n))."""
    x = x.flatten().to(torch.float64)
    mu, mu2 = _gaussian_moment(k), _gaussian_moment(2 * k)
    return (x.pow(k).mean().item() - mu) / math.sqrt((mu2 - mu * mu) / x.numel())


def corr_z(u: torch.Tensor, v: torch.Tensor) -> float:
    """Pearson correlation of paired values times sqrt(n pairs).

    When every u is independent of its v, the sum of the n centred products has variance n
    times the product of the variances, whatever the marginals (here normal values or their
    squares), and the products are uncorrelated with one another even where the pairs overlap
    (u_j, v_j = x_j, x_j+d), so the estimate has standard deviation 1/sqrt(n) and this is
    N(0, 1) by the central limit theorem."""
    u, v = u.flatten().to(torch.float64), v.flatten().to(torch.float64)
    u, v = u - u.mean(), v - v.mean()
    r = (u * v).sum() / (u.norm() * v.norm())
    return r.item() * math.sqrt(u.numel())


def lags(shape) -> dict[str, int]:
    """The offsets, in the flattened sample, where a counter-based construction could leak."""
    n = math.prod(shape)
    half = (n + 1) // 2  # Box-Muller: element j (cosine) and j + half (sine) come from one pair of uniforms
    return {"1": 1, "2": 2, "3": 3, "row-1": shape[-1] - 1, "row": shape[-1], "row+1": shape[-1] + 1,
            "channel": shape[-1] * shape[-2], "pair-1": half - 1, "pair": half, "pair+1": half + 1}


def lag_z(x: torch.Tensor, shape) -> dict[str, float]:
    """For each offset d: the correlation z-score of (x_j, x_j+d) and of (x_j^2, x_j+d^2) within samples."""
    flat = x.reshape(x.shape[0], -1)
    out = {}
    for name, d in lags(shape).items():
        u, v = flat[:, :-d], flat[:, d:]
        out[f"value@{name}"] = corr_z(u, v)
        out[f"square@{name}"] = corr_z(u * u, v * v)
    return out


def assert_within_bounds(zs: dict[str, float], what: str):
    lim = z_limit(len(zs))
    bad = {k: round(v, 1) for k, v in zs.items() if not abs(v) < lim}
    assert not bad, f"{what}: |z| above {lim:.2f} for {bad}"


def spectral_z(x: torch.Tensor, bands: int = 16) -> tuple[dict[str, float], float]:
    """The periodogram of each flattened sample, |FFT_k|^2 / n, at the frequencies 0 < k < n/2.

    For i.i.d. N(0, 1) values its real and imaginary parts are independent N(0, n/2), so it is
    exactly Exp(1), independently across frequencies: the mean of a band of m values has standard
    deviation 1/sqrt(m). Returns the bands' z-scores and the p-value of a Kolmogorov-Smirnov test of
    all the values against Exp(1). Any correlation at any offset shows as a band off 1."""
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    n = flat.shape[1]
    power = torch.fft.rfft(flat, dim=1).abs().pow(2) / n
    inner = power[:, 1:(n + 1) // 2]  # drop the real-valued frequency 0 (and n/2 for even n)
    zs = {}
    for i, band in enumerate(torch.tensor_split(inner, bands, dim=1)):
        zs[f"band {i}"] = (band.mean().item() - 1.0) * math.sqrt(band.numel())
    return zs, stats.kstest(inner.flatten().numpy(), "expon").pvalue


def ordinal_chi2(x: torch.Tensor, dim: int) -> float:
    """Chi-square statistic (5 degrees of freedom) of the order patterns of consecutive triples along ``dim``.

    Of three i.i.d. continuous values each of the 6 orderings has probability 1/6, whatever their
    law, so this permutation test sees dependence between neighbours that no correlation shows.
    The triples do not overlap, so their patterns are independent and the counts multinomial."""
    t = x.movedim(dim, -1)
    length = t.shape[-1] // 3 * 3
    triples = t[..., :length].reshape(-1, 3)
    order = triples.argsort(dim=1)
    code = order[:, 0] * 9 + order[:, 1] * 3 + order[:, 2]
    counts = torch.bincount(code, minlength=27).to(torch.float64)[[5, 7, 11, 15, 19, 21]]  # the 6 permutations
    expected = len(triples) / 6
    return ((counts - expected) ** 2 / expected).sum().item()


def max_shift_z(x: torch.Tensor, y: torch.Tensor) -> float:
    """The largest |circular cross-correlation| over all shifts, row by row, as a z-score.

    sum_j x_j y_(j+s) of two independent N(0, 1) rows of length n is a sum of n uncorrelated
    products of variance 1, so divided by sqrt(n) it is N(0, 1) for every shift s (its fourth
    cumulant is 6/n, small enough at n = 16384 for the normal tail to hold at 7 sd). A shared
    counter shows as a shift where the two rows agree: z = sqrt(n)."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    n = x.shape[1]
    c = torch.fft.irfft(torch.fft.rfft(x, dim=1).conj() * torch.fft.rfft(y, dim=1), n=n, dim=1)
    return c.abs().max().item() / math.sqrt(n)


def _noise(batch, shape=LATENT, seed=0) -> StepNoise:
    return StepNoise.from_generator(torch.Generator().manual_seed(seed), (batch, *shape), torch.float64, "cpu")


def _batch(shape):
    """Samples enough that every check sees about 2^16 values (2^20 with DIFFSAMPLER_FULL_STATS=1)."""
    return max(2, stat_size(1 << 16, 1 << 20) // math.prod(shape))


# ---------------------------------------------------------------------------------------------------------
# StepNoise: within a sample


@pytest.mark.statistical
@pytest.mark.parametrize("shape", [LATENT, ODD], ids=["4x64x64", "3x33x33"])
def test_a_sample_is_standard_normal(shape):
    """Moments 1..4 of all values, mean and second moment of each sample, and a KS test, for
    standard_normal (step 0) and a later step and stream."""
    b = _batch(shape)
    draws = {"standard_normal": standard_normal((b, *shape), torch.Generator().manual_seed(1), torch.float64),
             "step 5 stream 2": _noise(b, shape).draw(5, stream=2)}
    zs = {}
    for name, z in draws.items():
        for k in (1, 2, 3, 4):
            zs[f"{name}: moment {k}"] = moment_z(z, k)
        for i in range(b):  # a per-sample offset or scale would hide in the pooled moments
            zs[f"{name}: sample {i} mean"] = moment_z(z[i], 1)
            zs[f"{name}: sample {i} square"] = moment_z(z[i], 2)
    assert_within_bounds(zs, "moments")
    for name, z in draws.items():
        assert stats.kstest(z.flatten().numpy(), "norm").pvalue > ALPHA / len(draws), name


@pytest.mark.statistical
@pytest.mark.parametrize("shape", [LATENT, ODD], ids=["4x64x64", "3x33x33"])
def test_elements_of_a_sample_are_uncorrelated(shape):
    """Values and squares of elements j and j + d, for neighbours, rows, channels and the Box-Muller partner."""
    z = _noise(_batch(shape), shape).draw(3, stream=1)
    assert_within_bounds(lag_z(z, shape), f"within-sample correlations, shape {shape}")


@pytest.mark.statistical
@pytest.mark.parametrize("shape", [LATENT, ODD], ids=["4x64x64", "3x33x33"])
def test_the_spectrum_of_a_sample_is_flat(shape):
    zs, ks_p = spectral_z(_noise(_batch(shape), shape).draw(2))
    assert_within_bounds(zs, "periodogram bands")
    assert ks_p > ALPHA, f"periodogram against Exp(1): KS p = {ks_p:.2g}"


@pytest.mark.statistical
def test_order_patterns_along_every_axis_are_uniform():
    z = _noise(_batch(LATENT)).draw(4)
    dims = {"width": 3, "height": 2, "channel": 1}
    lim = chi2_limit(5, len(dims))
    for name, dim in dims.items():
        chi2 = ordinal_chi2(z, dim)
        assert chi2 < lim, f"order patterns along {name}: chi2 = {chi2:.1f} > {lim:.1f}"


# ---------------------------------------------------------------------------------------------------------
# StepNoise: across samples, steps and streams


@pytest.mark.statistical
def test_steps_streams_and_samples_are_independent_at_every_shift():
    """No two draws of (step, stream), no two samples and no two elements share a counter, even
    shifted: the same-element correlation of values and squares of every pair of draws, then the
    cross-correlation at every shift of every pair of whole flattened batches (each alignment of
    any sample and element of one with any of the other), and each batch's own autocorrelation."""
    b = 4
    noise = _noise(b)
    ids = [(step, stream) for step in range(3) for stream in range(3)]
    flat = torch.stack([noise.draw(*i).flatten() for i in ids])
    length = flat.shape[1]
    zs = {}
    for kind, m in (("value", flat), ("square", flat * flat)):
        r = torch.corrcoef(m) * math.sqrt(length)  # z-scores: correlations times sqrt(n), see corr_z
        zs |= {f"{kind} {ids[a]}~{ids[c]}": r[a, c].item() for a in range(len(ids)) for c in range(a + 1, len(ids))}
    assert_within_bounds(zs, "same-element correlation between draws")

    # c[p, q, s] = sum_j x_p,j x_q,(j+s) mod L: for p != q, and for p = q at 0 < s < L/2 (where the
    # products of one shift are uncorrelated: at s = L/2 each pair would be counted twice), a sum of L
    # uncorrelated products of variance 1 (see max_shift_z), so c / sqrt(L) is N(0, 1).
    spectra = torch.fft.rfft(flat.to(torch.float64), dim=1)
    pairs = [(a, c) for a in range(len(ids)) for c in range(a + 1, len(ids))]
    cross = torch.fft.irfft(spectra[[a for a, _ in pairs]].conj() * spectra[[c for _, c in pairs]], n=length, dim=1)
    auto = torch.fft.irfft(spectra.abs().pow(2), n=length, dim=1)[:, 1:length // 2]
    lim = z_limit(cross.numel() + auto.numel())
    worst_cross = cross.abs().amax(dim=1) / math.sqrt(length)
    worst_auto = auto.abs().amax(dim=1) / math.sqrt(length)
    bad = {f"{ids[a]}~{ids[c]}": round(worst_cross[k].item(), 1) for k, (a, c) in enumerate(pairs)
           if not worst_cross[k] < lim}
    bad |= {f"{ids[a]} with itself": round(worst_auto[a].item(), 1) for a in range(len(ids)) if not worst_auto[a] < lim}
    assert not bad, f"cross-correlation at some shift above {lim:.2f} sd: {bad}"


@pytest.mark.statistical
def test_the_checks_reject_neighbours_sharing_a_draw():
    """The checks above must fail on the bug that motivated them (elements 2m and 2m + 1 of a sample
    equal), on a sine half that repeats the cosine half, and on neighbours that share only the
    Box-Muller radius (uncorrelated values, correlated squares), or they prove nothing. The
    flawed samples are built from torch's own generator, so this holds whatever the code under test does."""
    b = _batch(LATENT)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(b, math.prod(LATENT), generator=g, dtype=torch.float64)
    half = z.shape[1] // 2
    shared = z[:, ::2].repeat_interleave(2, dim=1)
    repeated = torch.cat([z[:, :half], z[:, :half]], dim=1)
    sign = torch.where(torch.rand(z.shape, generator=g) < 0.5, 1.0, -1.0).to(torch.float64)
    radius = shared.abs() * sign  # |z| shared by the pair, independent signs: the values are uncorrelated
    for name, bad in {"shared": shared, "repeated": repeated, "radius": radius}.items():
        with pytest.raises(AssertionError):
            assert_within_bounds(lag_z(bad.reshape(b, *LATENT), LATENT), name)
    values = {k: v for k, v in lag_z(radius.reshape(b, *LATENT), LATENT).items() if k.startswith("value")}
    assert_within_bounds(values, "values of the radius bug")  # only the squares see it
    with pytest.raises(AssertionError):
        assert_within_bounds(spectral_z(shared)[0], "spectrum of shared")
    assert ordinal_chi2(shared.reshape(b, *LATENT), 3) > chi2_limit(5, 3)


# ---------------------------------------------------------------------------------------------------------
# BrownianNoise: increments

LO, HI = 0.5, 3.0  # hi - lo != 1, so a scaling that forgets the interval's length shows
TIMES = (3.0, 2.6, 1.7, 0.9, 0.5)  # decreasing, as the solvers' sigmas: draw(i) is the increment over knot i
# name: (a, b), each well above the path's resolution (hi - lo) 2^-24: the shortest spans 671 finest
# cells, so the interpolation at its ends (variance deficit at most 1/4 cell per end) shrinks its
# variance by at most 1/(2 * 671) = 7e-4, a tenth of the variance estimate's sd sqrt(2/32768). In this
# order consecutive calls share an end (between(a, b) computes W(b), then W(a)), whose tree path is cached.
INTERVALS = {
    "draw 3": (0.9, 0.5), "draw 2": (1.7, 0.9), "draw 1": (2.6, 1.7), "draw 0": (3.0, 2.6),
    "whole": (LO, HI), "[0.9, 2.35]": (0.9, 2.35), "[1.7, 2.35]": (1.7, 2.35), "short": (1.7, 1.7 + 1e-4),
    "[2.6, 2.9]": (2.6, 2.9),
}


@pytest.fixture(scope="module")
def brownian():
    """The increments of INTERVALS over one set of paths (each W(t) walks the 24-level tree)."""
    b = max(2, stat_size(1 << 15, 1 << 18) // math.prod(LATENT))
    noise = BrownianNoise(sample_keys(b, torch.Generator().manual_seed(7)), (b, *LATENT), torch.float64, "cpu",
                          TIMES, LO, HI)
    inc = {}
    for name, (a, c) in INTERVALS.items():
        inc[name] = noise.draw(int(name[-1])) if name.startswith("draw") else noise.between(a, c)
        if name == "[0.9, 2.35]":
            inc["reversed [0.9, 2.35]"] = noise.between(2.35, 0.9)
    return inc


@pytest.mark.statistical
def test_brownian_increments_are_standard_normal_within_a_sample(brownian):
    """Each increment (W(b) - W(a)) / sqrt(|b - a|), in units of the path's length, is N(0, 1) in every
    element, for long, short and the solvers' draw intervals: moments 1..4, KS, per-sample mean and
    square, and the within-sample correlations of values and squares."""
    zs, lag_stats = {}, {}
    for name in INTERVALS:
        z = brownian[name]
        for k in (1, 2, 3, 4):
            zs[f"{name}: moment {k}"] = moment_z(z, k)
        for i in range(z.shape[0]):
            zs[f"{name}: sample {i} square"] = moment_z(z[i], 2)
        lag_stats |= {f"{name}: {k}": v for k, v in lag_z(z, LATENT).items()}
    assert_within_bounds(zs, "Brownian increments' moments")
    assert_within_bounds(lag_stats, "Brownian increments' within-sample correlations")
    for name in INTERVALS:
        p = stats.kstest(brownian[name].flatten().numpy(), "norm").pvalue
        assert p > ALPHA / len(INTERVALS), f"{name}: KS p = {p:.2g}"


def _brownian_corr(i, j) -> float:
    """corr(W(b1) - W(a1), W(b2) - W(a2)) of a Brownian motion: the signed length of the overlap
    over the root of the product of the lengths."""
    (a1, b1), (a2, b2) = INTERVALS[i], INTERVALS[j]
    overlap = max(0.0, min(max(a1, b1), max(a2, b2)) - max(min(a1, b1), min(a2, b2)))
    sign = math.copysign(1.0, b1 - a1) * math.copysign(1.0, b2 - a2)
    return sign * overlap / math.sqrt(abs(b1 - a1) * abs(b2 - a2))


@pytest.mark.statistical
def test_brownian_increments_correlate_as_the_path_does(brownian):
    """Every pair of increments: element by element their correlation is the Brownian one (0 for
    adjacent and disjoint intervals, sqrt(overlap / length) for nested ones), whose estimate from n
    normal pairs has standard deviation (1 - rho^2) / sqrt(n); for the disjoint pairs also the
    squares, the Box-Muller partner, and the cross-correlation at every shift."""
    names = list(INTERVALS)
    half = (math.prod(LATENT) + 1) // 2
    zs, disjoint = {}, []
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            u, v = brownian[p].flatten(1), brownian[q].flatten(1)
            rho = _brownian_corr(p, q)
            r = torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1].item()
            zs[f"value {p}~{q} (rho {rho:.3f})"] = (r - rho) * math.sqrt(u.numel()) / (1 - rho * rho)
            if rho == 0:
                disjoint.append((p, q))
                zs[f"square {p}~{q}"] = corr_z(u * u, v * v)
                zs[f"partner {p}~{q}"] = corr_z(u[:, :half], v[:, half:2 * half])
    assert len(disjoint) >= 10
    assert_within_bounds(zs, "correlation between increments")

    n = math.prod(LATENT)
    b = brownian["whole"].shape[0]
    shifted = {f"{p}~{q}": max_shift_z(brownian[p], brownian[q]) for p, q in disjoint}
    shifted |= {f"draw 1, sample {j}~{j + 1}": max_shift_z(brownian["draw 1"][j:j + 1],
                                                           brownian["draw 1"][j + 1:j + 2]) for j in range(b - 1)}
    lim = z_limit(len(disjoint) * b * n + (b - 1) * n)  # every shift of every row compared
    bad = {k: round(v, 1) for k, v in shifted.items() if not v < lim}
    assert not bad, f"cross-correlation at some shift above {lim:.2f} sd: {bad}"


def test_brownian_increments_add_up_with_the_right_scaling(brownian):
    """sqrt(b - a) I[a, b] + sqrt(c - b) I[b, c] = sqrt(c - a) I[a, c], element by element, for the
    solvers' draws (decreasing times, four in a row) and for a split interval; I[b, a] = -I[a, b] exactly.

    Tolerance, in units where W(hi) - W(lo) has variance 1: W(t) is N(0, u <= 1), so over the n
    elements and the k path points involved |W| < z_limit(n k) (probability 1 - ALPHA); each W is
    built in float64 from 24 levels of 3 operations, so its rounding error is below 3 * 24 * eps
    * max|W|, and an identity over k values of W is exact to k times that."""
    frac = lambda name: abs(INTERVALS[name][1] - INTERVALS[name][0]) / (HI - LO)  # noqa: E731
    term = lambda name: math.sqrt(frac(name)) * brownian[name]  # noqa: E731  W(b) - W(a)
    n = brownian["whole"].numel()

    def tol(k):
        return k * 3 * 24 * torch.finfo(torch.float64).eps * z_limit(n * k)

    draws = sum(term(f"draw {i}") for i in range(4))  # W(0.5) - W(3.0): 4 increments, 8 values of W
    err = (draws + term("whole")).abs().max().item()
    assert err <= tol(10), f"the draws do not add up to the whole path: {err:.3g} > {tol(10):.3g}"
    split = -term("draw 2") + term("[1.7, 2.35]")  # W(1.7) - W(0.9) + W(2.35) - W(1.7)
    err = (split - term("[0.9, 2.35]")).abs().max().item()
    assert err <= tol(6), f"[0.9, 1.7] and [1.7, 2.35] do not add up to [0.9, 2.35]: {err:.3g} > {tol(6):.3g}"
    assert torch.equal(brownian["reversed [0.9, 2.35]"], -brownian["[0.9, 2.35]"])


def test_brownian_path_is_linear_inside_its_finest_level():
    """Below the path's resolution (hi - lo) 2^-depth, W is the straight line between two nodes, as
    documented, not a step or a fresh draw: over 3/8 of one finest cell the increment is 3/8 of the
    cell's, i.e. I[p, q] = sqrt(3/8) I[cell], and equal for two such pieces of the cell.

    With lo = 0, hi = 1 and dyadic times every length is exact in float64. Tolerance: the two ends of
    a piece share their tree nodes, so only the interpolation (3 operations on values |W| <
    z_limit(n), W being N(0, u <= 1)) rounds differently, by at most 3 eps |W| per end; over the
    piece's sqrt(length) that is 2 * 3 eps z_limit(n) / sqrt(3/8 * cell)."""
    n = 4 * 64
    noise = BrownianNoise(sample_keys(4, torch.Generator().manual_seed(9)), (4, 64), torch.float64, "cpu",
                          (1.0, 0.0), 0.0, 1.0)
    cell = 2.0 ** -noise.depth
    a = 0.375 + 5 * cell  # a node of the finest level
    whole = noise.between(a, a + cell)
    first = noise.between(a + cell / 8, a + cell / 2)
    second = noise.between(a + cell / 2, a + 7 * cell / 8)
    tol = 2 * 3 * torch.finfo(torch.float64).eps * z_limit(n) / math.sqrt(3 / 8 * cell)
    for name, piece in {"[1/8, 1/2]": first, "[1/2, 7/8]": second}.items():
        err = (piece - math.sqrt(3 / 8) * whole).abs().max().item()
        assert err <= tol, f"piece {name} of a finest cell: off the straight line by {err:.3g} > {tol:.3g}"
    assert whole.abs().max() > 0
