"""Minority guidance (Um et al., ICLR 2024, arXiv:2301.12334) on an exact Gaussian mixture, where the
minority classifier p(l | x_t) is exact up to Monte Carlo, and on the shipped digits model with its
shipped minority classifier, judged by the independent digits evaluator."""

import math

import pytest
import torch
from scipy.stats import spearmanr

import diffsampler as ds
from conftest import stat_size
from diffsampler.guidance import minority_classes, minority_guidance, minority_score
from diffsampler.guidance.minority import paper_time

#: A common component and a rare one that it overlaps: Tweedie's denoiser pulls the rare one's samples
#: towards the common one, which is what the minority score measures (Um et al. 2024).
RARE = 1
GMM = ds.testbeds.GaussianMixture([[0.0], [0.6]], [0.2 ** 2, 0.2 ** 2], [0.9, 0.1])
PROCESS = ds.VP.linear()  # the DDPM schedule of the paper's models: sigma / alpha = 0.21 at t = 0.06
LEVELS = 5


class EmpiricalMinorityClassifier:
    """The exact ``log p(l | x_t)`` of the joint law of ``(x0, l)`` represented by samples: for the
    empirical measure of ``x0_i`` with levels ``l_i``, ``p(x_t | x0) = N(alpha x0, sigma^2 I)`` gives
    ``p(l | x_t) = sum_{i: l_i = l} N(x_t; alpha x0_i, sigma^2) / sum_i N(x_t; alpha x0_i, sigma^2)``, a
    log-sum-exp over the samples of each level; it converges to the mixture's own ``p(l | x_t)`` as the
    samples grow."""

    def __init__(self, process, x0: torch.Tensor, levels: torch.Tensor, n_levels: int):
        self.process, self.levels = process, n_levels
        flat = x0.reshape(len(x0), -1).to(torch.float64)
        self.groups = [flat[levels == k] for k in range(n_levels)]
        assert all(len(g) for g in self.groups)

    def __call__(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        t = time.to(torch.float64)
        a, s = self.process.alpha(t).reshape(-1, 1), self.process.sigma(t).reshape(-1, 1)
        xf = x.reshape(len(x), -1).to(torch.float64)
        per_level = torch.stack([torch.logsumexp(-(xf[:, None, :] - a[:, :, None] * g[None]).pow(2).sum(-1)
                                                 / (2 * s ** 2), -1) for g in self.groups], 1)
        return per_level - torch.logsumexp(per_level, -1, keepdim=True)


def _mixture_levels(n: int, seed: int = 0):
    """``(x0, level, rare responsibility)`` of ``n`` exact mixture samples, levels from their own scores."""
    g = torch.Generator().manual_seed(seed)
    x0, _ = GMM.sample(n, generator=g)
    scores = minority_score(GMM.denoiser(PROCESS, "eps"), x0, generator=g)
    levels, _ = minority_classes(scores, LEVELS)
    return x0, levels, GMM.responsibilities(x0)[:, RARE], scores


def _z(a: torch.Tensor, b: torch.Tensor) -> float:
    """The difference of two sample means in units of its standard error."""
    return float((a.mean() - b.mean()) / (a.var() / len(a) + b.var() / len(b)).sqrt())


# -- the minority score ------------------------------------------------------------------------------------

def test_minority_score_is_higher_for_the_rare_component():
    n = stat_size(4000, 40_000)
    g = torch.Generator().manual_seed(1)
    x0, comp = GMM.sample(n, generator=g)
    scores = minority_score(GMM.denoiser(PROCESS, "eps"), x0, generator=g)
    rare, common = scores[comp == RARE], scores[comp != RARE]
    assert _z(rare, common) > 5, (rare.mean(), common.mean())
    # and so the top level holds the rare component well above its weight 0.1
    levels, thresholds = minority_classes(scores, LEVELS)
    top = comp[levels == LEVELS - 1]
    p_top = (top == RARE).double().mean().item()
    assert p_top > 0.1 + 5 * math.sqrt(0.1 * 0.9 / len(top)), p_top
    assert thresholds.shape == (LEVELS - 1,) and bool((thresholds.diff() > 0).all())


def test_minority_score_is_the_posterior_variance_of_a_gaussian():
    """For data N(0, v I_d) the denoiser is linear and E ||x0 - x0_hat||^2 = d v sigma^2 / (alpha^2 v + sigma^2):
    checks the formula, the paper's default time and the averaging over draws."""
    v, d, n = 0.5, 3, stat_size(4000, 40_000)
    gauss = ds.testbeds.Gaussian(torch.zeros(d), v * torch.eye(d))
    for process in (ds.VP.cosine(), ds.EDM(), ds.Flow()):
        model = gauss.denoiser(process, "velocity" if isinstance(process, ds.Flow) else "eps")
        x0, _ = gauss.sample(n, generator=torch.Generator().manual_seed(2))
        scores = minority_score(model, x0, draws=3, generator=torch.Generator().manual_seed(3))
        t = paper_time(process)
        a, s = float(process.alpha(t)), float(process.sigma(t))
        exact = d * v * s * s / (a * a * v + s * s)
        # the per-draw error is (posterior variance) x chi-square(d) / d: sd of the mean sqrt(2 / (3 d n))
        assert abs(scores.mean().item() - exact) < 5 * exact * math.sqrt(2 / (3 * d * n)), (process, exact)


def test_minority_score_time_convention_and_determinism(one_thread):
    assert paper_time(ds.VP.cosine()) == paper_time(ds.VP.linear()) == paper_time(ds.Flow()) == 0.06
    assert paper_time(ds.VP.linear_discrete()) == 0.06  # step 60 of 1000
    edm = paper_time(ds.EDM())  # the noise-to-signal ratio of the DDPM linear schedule at step 60
    assert edm == pytest.approx(float(ds.VP.linear_discrete().ode_sigma(0.06)), rel=1e-12) and 0.19 < edm < 0.22
    model = GMM.denoiser(PROCESS, "eps")
    x0, _ = GMM.sample(12, generator=torch.Generator().manual_seed(4))
    a = minority_score(model, x0, generator=torch.Generator().manual_seed(5))
    b = minority_score(model, x0, generator=torch.Generator().manual_seed(5), batch=5)
    c = minority_score(model, x0[:5], generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, rtol=1e-12, atol=0)
    # sample k's noise is keyed to its index, not to the batch size: the same score in a shorter batch
    assert torch.allclose(a[:5], c, rtol=1e-12, atol=0)
    assert a.shape == (12,) and a.dtype == torch.float64
    assert not torch.equal(a, minority_score(model, x0, generator=torch.Generator().manual_seed(6)))
    dirac = ds.testbeds.GaussianMixture([[0.3]], [0.0])  # x0_hat = mu exactly: a zero score
    zero = minority_score(dirac.denoiser(PROCESS, "eps"), torch.full((4, 1), 0.3, dtype=torch.float64))
    assert bool((zero < 1e-28).all()), zero


def test_minority_classes_are_equal_count_quantile_bins():
    scores = torch.randperm(100, generator=torch.Generator().manual_seed(0)).double()
    levels, thresholds = minority_classes(scores, 4)
    assert torch.equal(torch.bincount(levels), torch.full((4,), 25))
    assert torch.equal(levels, (scores // 25).long())  # 0..24 -> 0, ..., 75..99 -> 3
    again, same = minority_classes(torch.tensor([-1.0, 30.0, 99.5, 1e9]), thresholds=thresholds)
    assert again.tolist() == [0, 1, 3, 3] and torch.equal(same, thresholds)


# -- guidance on the exact mixture -------------------------------------------------------------------------

def test_minority_guidance_is_classifier_guidance_towards_the_top_level():
    x0, levels, _, _ = _mixture_levels(500)
    clf = EmpiricalMinorityClassifier(PROCESS, x0, levels, LEVELS)
    model = GMM.denoiser(PROCESS, "eps")
    guided = minority_guidance(model, clf, 2.5)
    assert isinstance(guided, ds.guidance.classifier_guidance) and guided.target == LEVELS - 1
    x = torch.randn(16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for t in (0.05, 0.4, torch.linspace(0.1, 0.9, 16, dtype=torch.float64)):
        want = ds.guidance.classifier_guidance(model, clf, 2.5)(x, t, label=LEVELS - 1)
        got = guided(x, t)
        assert torch.equal(got.eps, want.eps)
        assert torch.equal(got.x0, want.x0)
    low = minority_guidance(model, clf, 2.5, target=0)(x, 0.4)
    assert bool((low.x0 < guided(x, 0.4).x0).all())  # towards the common side, away from the rare mean 0.6
    assert torch.equal(minority_guidance(model, clf, 0.0)(x, 0.4).eps, model(x, 0.4).eps)


def test_the_top_level_is_read_from_the_classifier_when_it_does_not_declare_it():
    x0, levels, _, _ = _mixture_levels(300)
    clf = EmpiricalMinorityClassifier(PROCESS, x0, levels, LEVELS)
    model = GMM.denoiser(PROCESS, "eps")
    bare = minority_guidance(model, lambda x, time: clf(x, time), 1.0)  # no levels attribute
    assert bare.target is None
    x = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(bare(x, 0.3).eps, minority_guidance(model, clf, 1.0)(x, 0.3).eps)
    assert bare.target == LEVELS - 1 and bare.levels == LEVELS


def test_a_class_conditional_model_keeps_its_label():
    labelled = ds.testbeds.GaussianMixture([[0.0], [0.6], [3.0]], [0.04, 0.04, 0.04], [0.6, 0.1, 0.3],
                                           labels=[0, 0, 1])
    model = labelled.denoiser(PROCESS, "eps")
    clf = EmpiricalMinorityClassifier(PROCESS, *_mixture_levels(300)[:2], LEVELS)
    x = torch.randn(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    label = torch.tensor([0, 0, 0, 1, 1, 1])
    plain, guided = model(x, 0.5, label=label), minority_guidance(model, clf, 2.0)(x, 0.5, label=label)
    grad = minority_guidance(model, clf, 2.0).log_prob_gradient(x, 0.5, torch.full((6,), LEVELS - 1))
    assert torch.allclose(guided.eps, plain.eps - 2.0 * float(PROCESS.sigma(0.5)) * grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler_ancestral", "unipc", "heun"])
def test_minority_guidance_runs_with_solvers_composes_and_is_per_sample(solver, one_thread):
    x0, levels, _, _ = _mixture_levels(300)
    clf = EmpiricalMinorityClassifier(PROCESS, x0, levels, LEVELS)
    model = GMM.denoiser(PROCESS, "eps")
    x = PROCESS.prior((6, 1), generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    grid = ds.grids.logsnr(PROCESS, 6)
    for guided in (minority_guidance(model, clf, 2.0), ds.guidance.clip_x0(minority_guidance(model, clf, 2.0), 1.5)):
        out = ds.sample(guided, x, grid, solver, generator=torch.Generator().manual_seed(14))
        assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())
        part = ds.sample(guided, x[:3], grid, solver, generator=torch.Generator().manual_seed(14))
        assert torch.allclose(part, out[:3], rtol=1e-10, atol=1e-12)  # a sample does not depend on its batch


@pytest.mark.statistical
def test_minority_guidance_raises_the_rare_component_monotonically_in_the_scale(one_thread):
    """Frequency of the rare component (mean responsibility of the guided samples) at scales 0, 1, 3 with the
    exact minority classifier: it rises with the scale, each step by more than 5 standard errors; scale 0 is
    the mixture (weight 0.1) and scale 1 samples p(x0 | top level) (classifier guidance with the exact classifier)."""
    n_ref, n = stat_size(1500, 5000), stat_size(600, 3000)
    x0, levels, rare_ref, _ = _mixture_levels(n_ref)
    clf = EmpiricalMinorityClassifier(PROCESS, x0, levels, LEVELS)
    model = GMM.denoiser(PROCESS, "eps")
    x_t = GMM.sample_marginal(PROCESS, PROCESS.t_max, n, generator=torch.Generator().manual_seed(9))
    grid = ds.grids.logsnr(PROCESS, 20)
    freq = {}
    for scale in (0.0, 1.0, 3.0):
        out = ds.sample(minority_guidance(model, clf, scale), x_t, grid, "dpmpp_2m")
        freq[scale] = GMM.responsibilities(out)[:, RARE]
    assert abs(freq[0.0].mean() - 0.1) < 5 * (freq[0.0].var() / n).sqrt(), freq[0.0].mean()
    assert _z(freq[1.0], freq[0.0]) > 5 and _z(freq[3.0], freq[1.0]) > 5, {k: v.mean() for k, v in freq.items()}
    top = rare_ref[levels == LEVELS - 1]
    assert abs(_z(freq[1.0], top)) < 4, (freq[1.0].mean(), top.mean())


# -- the shipped digits minority classifier ----------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return ds.models.load("digits"), ds.models.load("digits-minority"), ds.models.load("digits-evaluator")


def test_the_shipped_minority_classifier_loads_and_ranks_held_out_digits(digits, one_thread):
    from diffsampler.models.train import minority_scores

    model, clf, _ = digits
    meta = ds.models.info("digits-minority")
    assert isinstance(clf, torch.nn.Module) and clf.num_classes == meta["minority"]["levels"] == 10
    assert meta["minority"]["scored_by"] == "digits" and len(meta["minority"]["thresholds"]) == 9
    assert minority_guidance(model, clf, 1.0).target == 9  # the rarest level by default
    images, scores = minority_scores("digits-minority", "held_out")
    t = 0.1
    xt = model.process.alpha(t) * images + model.process.sigma(t) * torch.randn(
        images.shape, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        probs = clf(xt, torch.full((len(images),), t)).softmax(-1)
    expected = probs @ torch.arange(10.0)
    rho, p_value = spearmanr(expected.numpy(), scores.numpy())
    # recorded: 0.23 over these 297 digits (sd about 1 / sqrt(296) = 0.058). The ceiling is well below 1: the
    # scores are 5-draw estimates, and the training digits it learnt from are ones the model has memorised
    # (they score lower than held-out digits: the record's means)
    assert rho > 0.1 and p_value < 1e-3, (rho, p_value)
    assert meta["minority"]["train_mean_score"] < meta["quality"]["held_out_mean_score"]


@pytest.mark.statistical
def test_minority_guidance_raises_the_rarest_digits_by_the_evaluator(digits, one_thread):
    """Unconditional digits with and without minority guidance: the digits whose unguided samples have the
    highest exact minority scores (the score, never the classifier) are more frequent among the guided
    samples, as the independent evaluator reads them, and the guided samples' scores are higher."""
    model, clf, evaluator = digits
    n = stat_size(200, 1000)
    x_t = model.process.prior((n, 1, 8, 8), generator=torch.Generator().manual_seed(11))
    grid = ds.grids.logsnr(model.process, 20)
    out = {}
    for scale in (0.0, 1.0):
        with torch.no_grad():
            out[scale] = ds.sample(minority_guidance(model, clf, scale), x_t, grid, "dpmpp_2m")
    # one generator seed for both: sample k's draws are the same noise in both sets, so the pairs compare
    score = {s: minority_score(model, x, generator=torch.Generator().manual_seed(12)) for s, x in out.items()}
    with torch.no_grad():
        read = {s: evaluator(x).argmax(1) for s, x in out.items()}
    mean_score = torch.stack([score[0.0][read[0.0] == d].mean() for d in range(10)])
    rarest = mean_score.argsort(descending=True)[:3]
    hit = {s: torch.isin(read[s], rarest).double() for s in out}
    assert _z(hit[1.0], hit[0.0]) > 3, (rarest.tolist(), hit[0.0].mean(), hit[1.0].mean())
    paired = score[1.0] - score[0.0]  # same start, same score noise: the paired difference
    assert paired.mean() / (paired.var() / n).sqrt() > 3, (score[0.0].mean(), score[1.0].mean())


# -- bad input ---------------------------------------------------------------------------------------------

def test_minority_errors():
    model = GMM.denoiser(PROCESS, "eps")
    x0, levels, _, _ = _mixture_levels(200)
    clf = EmpiricalMinorityClassifier(PROCESS, x0, levels, LEVELS)
    with pytest.raises(TypeError, match="classifier must be callable"):
        minority_guidance(model, 3, 1.0)
    with pytest.raises(TypeError, match="model must be a Denoiser"):
        minority_guidance(lambda x, t: x, clf, 1.0)
    for bad in (-1.0, math.nan, math.inf, True, "3"):
        with pytest.raises(ValueError, match="minority_guidance: scale must be a finite number >= 0"):
            minority_guidance(model, clf, bad)
    with pytest.raises(ValueError, match=r"target must be a level in \[0, 4\]"):
        minority_guidance(model, clf, 1.0, target=LEVELS)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="target must be a non-negative integer"):
            minority_guidance(model, clf, 1.0, target=bad)
    late = minority_guidance(model, lambda x, time: clf(x, time), 1.0, target=7)  # levels read at the first call
    with pytest.raises(ValueError, match=r"target must be a level in \[0, 4\]"):
        late(x0[:4], 0.5)
    with pytest.raises(ValueError, match="transform's own keyword"):
        minority_guidance(model, clf, 1.0)(x0[:4], 0.5, _minority_target=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        minority_score(model, x0, draws=0)
    with pytest.raises(ValueError, match="x0 must be a tensor of shape"):
        minority_score(model, torch.zeros(3))
    with pytest.raises(ValueError, match="t must be in the process's range"):
        minority_score(model, x0, t=2.0)
    with pytest.raises(TypeError, match="model must be a Denoiser"):
        minority_score(lambda x, t: x, x0)
    with pytest.raises(ValueError, match="levels must be an integer in"):
        minority_classes(torch.rand(10), 1)
    with pytest.raises(ValueError, match="levels must be an integer in"):
        minority_classes(torch.rand(3), 4)
    with pytest.raises(ValueError, match="finite numbers"):
        minority_classes(torch.tensor([1.0, math.nan]), 2)
    with pytest.raises(ValueError, match="increasing"):
        minority_classes(torch.rand(5), thresholds=torch.tensor([0.5, 0.2]))
