"""The testbed itself must be right before it can judge solvers: check it against independent formulas."""

import math

import pytest
import torch

import diffsampler as ds
from conftest import PROCESSES, make_process, stat_size


def test_denoiser_is_tweedie_of_the_density():
    """E[x0 | x_t] = (x + sigma^2 grad log p_t(x)) / alpha, with the gradient by autograd of log_prob."""
    gmm = ds.testbeds.random_mixture(4, 3, seed=2)
    for key in PROCESSES:
        p = make_process(key)
        t = 0.5 * (p.t_min + p.t_max)
        x = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
        grad, = torch.autograd.grad(gmm.log_prob(x, p, t).sum(), x)
        a, s = float(p.alpha(t)), float(p.sigma(t))
        torch.testing.assert_close(gmm.x0(x.detach(), p, t), (x.detach() + s * s * grad) / a, rtol=1e-9, atol=1e-10)


def test_per_sample_times_equal_scalar_times():
    gmm = ds.testbeds.ring8()
    p = ds.VP.linear()
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ts = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.9], dtype=torch.float64)
    batched = gmm.x0(x, p, ts)
    single = torch.cat([gmm.x0(x[i:i + 1], p, float(ts[i])) for i in range(5)])
    torch.testing.assert_close(batched, single)
    model = gmm.denoiser(p, "v")
    torch.testing.assert_close(model(x, ts).x0, batched)


def test_log_prob_is_a_normalised_density():
    gmm = ds.testbeds.ring8(radius=1.0, std=0.3)
    axis = torch.linspace(-4, 4, 401, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    dens = gmm.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp()
    assert abs(dens.sum().item() * (axis[1] - axis[0]).item() ** 2 - 1) < 1e-4


@pytest.mark.statistical
def test_exact_samples_match_the_moments():
    gmm = ds.testbeds.random_mixture(3, 3, seed=4)
    n = stat_size(40_000, 400_000)
    x, comp = gmm.sample(n, generator=torch.Generator().manual_seed(0))
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    second = (gmm.weights[:, None, None] * (gmm.covs + gmm.means[:, :, None] * gmm.means[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    # 5 standard errors of the sample mean per coordinate
    se = (torch.diagonal(cov) / n).sqrt()
    assert bool(((x.mean(0) - mean).abs() < 5 * se).all())
    freq = torch.bincount(comp, minlength=3).double() / n
    assert bool(((freq - gmm.weights).abs() < 5 * (gmm.weights * (1 - gmm.weights) / n).sqrt()).all())


def test_class_posterior_is_bayes_rule():
    gmm = ds.testbeds.GaussianMixture([[0, 0], [2, 0], [0, 2]], [0.3, 0.2, 0.5], [1, 2, 3], labels=[0, 1, 1])
    p = ds.EDM()
    x = torch.randn(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    post = gmm.class_posterior(x, p, 0.7)
    torch.testing.assert_close(post.sum(1), torch.ones(7, dtype=torch.float64))
    lp0 = gmm.log_prob(x, p, 0.7, label=0) + math.log(1 / 6)
    lp1 = gmm.log_prob(x, p, 0.7, label=1) + math.log(5 / 6)
    torch.testing.assert_close(post[:, 1], torch.sigmoid(lp1 - lp0))


@pytest.mark.parametrize("key", list(PROCESSES))
def test_ode_reference_matches_the_closed_form_flow(key):
    """The numerical reference (DOP853) against the exact single-Gaussian flow map."""
    p = make_process(key)
    gauss = ds.testbeds.Gaussian([0.3, -0.5, 1.0], [[0.5, 0.2, 0.0], [0.2, 0.3, 0.1], [0.0, 0.1, 0.8]])
    x = p.prior((16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t_to in (p.t_min, 0.0, 0.5 * (p.t_min + p.t_max)):
        exact = gauss.flow_map(p, x, p.t_max, t_to)
        ref = gauss.ode_reference(p, x, p.t_max, t_to)
        assert (ref - exact).abs().max().item() < 1e-8 * max(1.0, exact.abs().max().item())


def test_flow_map_of_a_point_mass():
    """Point-mass data: the flow keeps eps = (x - alpha mu) / sigma fixed."""
    p = ds.VP.scaled_linear()
    point = ds.testbeds.Gaussian([1.0, -2.0], torch.zeros(2, 2))
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = point.flow_map(p, x, 0.9, 0.2)
    eps = (x - float(p.alpha(0.9)) * point.means[0]) / float(p.sigma(0.9))
    torch.testing.assert_close(out, float(p.alpha(0.2)) * point.means[0] + float(p.sigma(0.2)) * eps)


def test_bad_mixture_arguments():
    with pytest.raises(ValueError, match="covs must have shape"):
        ds.testbeds.GaussianMixture([[0, 0]], torch.ones(2, 3))
    with pytest.raises(ValueError, match="positive"):
        ds.testbeds.GaussianMixture([[0, 0], [1, 1]], [1.0, 1.0], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="positive semi-definite"):
        ds.testbeds.GaussianMixture([[0, 0]], [[[1.0, 0.0], [0.0, -1.0]]])
    gmm = ds.testbeds.ring8()
    with pytest.raises(ValueError, match="2 values per sample"):
        gmm.x0(torch.zeros(3, 5), ds.EDM(), 1.0)
    with pytest.raises(ValueError, match="labels must be in"):
        gmm.x0(torch.zeros(3, 2), ds.EDM(), 1.0, label=9)
    with pytest.raises(ValueError, match="unknown testbed"):
        ds.testbeds.get("moons")
