"""Classifier guidance and autoguidance on the class-conditional Gaussian mixture, where the exact
noisy classifier and the exact class-conditional model are known."""

import pytest
import torch

import diffsampler as ds
from conftest import stat_size

GMM = ds.testbeds.GaussianMixture(
    [[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]], [[0.25, 0.0], [0.0, 0.1]]],
    [0.5, 0.3, 0.2], labels=[0, 1, 1])


@pytest.mark.parametrize("process", [ds.VP.scaled_linear(), ds.EDM(), ds.Flow()], ids=repr)
def test_exact_classifier_at_scale_one_is_the_class_conditional_model(process):
    """grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x): an identity, so it holds to round-off."""
    prediction = "velocity" if isinstance(process, ds.Flow) else "eps"
    model = GMM.denoiser(process, prediction)
    guided = ds.guidance.classifier_guidance(model, GMM.noisy_classifier(process), 1.0)
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    label = torch.arange(32) % 2
    for t in (0.05 * process.t_max, 0.3 * process.t_max, 0.9 * process.t_max):
        got = guided(x, t, label=label)
        want = model(x, t, label=label)
        torch.testing.assert_close(got.eps, want.eps, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got.x0, want.x0, rtol=1e-9, atol=1e-9)


def test_scale_scales_the_classifier_gradient():
    p = ds.VP.scaled_linear()
    model = GMM.denoiser(p, "eps")
    clf = GMM.noisy_classifier(p)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    label = torch.ones(8, dtype=torch.long)
    base = model(x, 0.4)
    one = ds.guidance.classifier_guidance(model, clf, 1.0)(x, 0.4, label=label)
    three = ds.guidance.classifier_guidance(model, clf, 3.0)(x, 0.4, label=label)
    torch.testing.assert_close(three.eps - base.eps, 3 * (one.eps - base.eps))
    zero = ds.guidance.classifier_guidance(model, clf, 0.0)(x, 0.4, label=label)
    assert torch.equal(zero.eps, base.eps)


@pytest.mark.statistical
def test_classifier_guided_samples_follow_the_class_conditional_distribution():
    p = ds.VP.linear()
    model = GMM.denoiser(p, "eps")
    guided = ds.guidance.classifier_guidance(model, GMM.noisy_classifier(p), 1.0)
    n = stat_size(4_000, 40_000)
    g = torch.Generator().manual_seed(3)
    x_t = GMM.sample_marginal(p, p.t_max, n, generator=g, label=1)
    x = ds.sample(guided, x_t, ds.grids.logsnr(p, stat_size(60, 200), t_max=p.t_max), "ddpm", generator=g,
                  label=torch.ones(n, dtype=torch.long))
    exact, _ = GMM.sample(n, generator=g, label=1)
    # class 1 is components 1 and 2 (split by y): their weights and moments must match exact conditional samples
    for part in (lambda v: v[:, 1] > 1.5, lambda v: v[:, 1] <= 1.5):
        a, b = x[part(x)], exact[part(exact)]
        pa, pb = len(a) / n, len(b) / n
        pooled = (pa + pb) / 2
        assert abs(pa - pb) / (pooled * (1 - pooled) * 2 / n) ** 0.5 < 5
        z_mean = (a.mean(0) - b.mean(0)).abs() / (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
        assert bool((z_mean < 5).all()), z_mean
        z_var = (a.var(0) - b.var(0)).abs() / ((2 * a.var(0) ** 2 / len(a)) + 2 * b.var(0) ** 2 / len(b)).sqrt()
        assert bool((z_var < 5).all()), z_var
    assert (x[:, 0] < -1.5).double().mean() < 0.005  # no mass left on class 0's component (at x = -2)


def test_classifier_guidance_errors():
    p = ds.EDM()
    model = GMM.denoiser(p, "eps")
    guided = ds.guidance.classifier_guidance(model, GMM.noisy_classifier(p))
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="must be passed as label="):
        guided(x, 1.0)
    with pytest.raises(ValueError, match="label must be one class or one per sample"):
        guided(x, 1.0, label=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="classifier must be callable"):
        ds.guidance.classifier_guidance(model, 3)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ds.guidance.classifier_guidance(model, GMM.noisy_classifier(p), float("inf"))


def test_autoguidance_is_its_definition_and_counts_both_networks():
    p = ds.EDM()
    good = GMM.denoiser(p, "x0")
    bad = ds.testbeds.GaussianMixture(GMM.means, GMM.covs * 2.0, GMM.weights, labels=[0, 1, 1]).denoiser(p, "x0")
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    guided = ds.guidance.autoguidance(good, bad, 2.5)
    out = guided(x, 1.5, label=torch.ones(8, dtype=torch.long))
    g, b = good(x, 1.5, label=torch.ones(8, dtype=torch.long)), bad(x, 1.5, label=torch.ones(8, dtype=torch.long))
    torch.testing.assert_close(out.x0, b.x0 + 2.5 * (g.x0 - b.x0))
    torch.testing.assert_close(x, out.x0 + 1.5 * out.eps)
    guided.nfe = 0
    ds.sample(guided, x, ds.grids.karras(p, 5), "euler")
    assert guided.nfe == 10 and good.nfe == 5 and bad.nfe == 5
    assert torch.equal(ds.guidance.autoguidance(good, bad, 1.0)(x, 2.0).x0, good(x, 2.0).x0)


def test_autoguidance_concentrates_on_high_density_without_leaving_the_support():
    """The paper's 2-D picture: a weak model with inflated covariances pushes samples towards the modes.
    Guided samples have a higher mean log-density under the true model than unguided ones, and still
    land in every component."""
    p = ds.EDM()
    good = GMM.denoiser(p, "x0")
    bad = ds.testbeds.GaussianMixture(GMM.means, GMM.covs * 2.0, GMM.weights).denoiser(p, "x0")
    g = torch.Generator().manual_seed(0)
    x_t = p.prior((4000, 2), generator=g, dtype=torch.float64)
    grid = ds.grids.karras(p, 30)
    plain = ds.sample(good, x_t, grid, "heun")
    guided = ds.sample(ds.guidance.autoguidance(good, bad, 2.0), x_t, grid, "heun")
    assert GMM.log_prob(guided).mean() > GMM.log_prob(plain).mean() + 0.2
    comp = (torch.stack([torch.distributions.MultivariateNormal(GMM.means[k], GMM.covs[k]).log_prob(guided)
                         for k in range(3)], 1)).argmax(1)
    share = torch.bincount(comp, minlength=3).double() / len(comp)
    assert bool((share > 0.1).all()), share


def test_autoguidance_rejects_a_weak_model_of_another_process():
    with pytest.raises(ValueError, match="weak model's process"):
        ds.guidance.autoguidance(GMM.denoiser(ds.EDM(), "x0"), GMM.denoiser(ds.VP.cosine(), "eps"), 2.0)


OVERLAP = ds.testbeds.GaussianMixture([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], [0.6, 0.6, 0.6], labels=[0, 1, 2])


def test_gradient_free_guidance_picks_the_most_probable_other_class():
    p = ds.EDM()
    model = OVERLAP.denoiser(p, "x0")
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]], dtype=torch.float64)
    gf = ds.guidance.gradient_free_guidance(model, lambda x0: logits, 2.0)
    ref, w = gf.reference(torch.zeros(2, 2), torch.tensor([1, 2]))
    assert ref.tolist() == [2, 0]
    probs = logits.softmax(1)
    torch.testing.assert_close(w, 2.0 * torch.stack([probs[0, 2] / (probs[0, 2] + probs[0, 1]),
                                                     probs[1, 0] / (probs[1, 0] + probs[1, 2])]))
    fixed = ds.guidance.gradient_free_guidance(model, lambda x0: logits, 2.0, adaptive=False)
    assert fixed.reference(torch.zeros(2, 2), torch.tensor([1, 2]))[1].tolist() == [2.0, 2.0]
    # the guided prediction is its definition
    x = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    label = torch.tensor([1, 2])
    out = gf(x, 1.0, label=label)
    c, r = model(x, 1.0, label=label), model(x, 1.0, label=torch.tensor([2, 0]))
    torch.testing.assert_close(out.x0, c.x0 + w[:, None] * (c.x0 - r.x0))
    torch.testing.assert_close(x, out.x0 + 1.0 * out.eps)


def test_gradient_free_guidance_raises_class_accuracy_over_the_conditional_model():
    """Overlapping classes: samples of the exact class-conditional model are often closer to another
    class; pushing away from the reference class raises the exact Bayes classifier's accuracy."""
    p = ds.VP.linear()
    model = OVERLAP.denoiser(p, "eps")
    bayes = OVERLAP.noisy_classifier(p)
    clean = lambda x0: bayes(x0, torch.full((x0.shape[0],), p.t_min, dtype=torch.float64))  # noqa: E731
    g = torch.Generator().manual_seed(0)
    n = 3000
    label = torch.arange(n) % 3
    x_t = p.prior((n, 2), generator=g, dtype=torch.float64)
    grid = ds.grids.logsnr(p, 20)

    def accuracy(m):
        x = ds.sample(m, x_t, grid, "dpmpp_2m", label=label)
        return (clean(x).argmax(1) == label).double().mean().item(), m.nfe

    base, base_nfe = accuracy(model)
    model.nfe = 0
    guided, guided_nfe = accuracy(ds.guidance.gradient_free_guidance(model, clean, 2.0))
    assert guided > base + 0.05, (base, guided)
    assert guided_nfe == 2 * base_nfe
