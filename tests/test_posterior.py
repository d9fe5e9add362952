"""Posterior sampling (``ds.posterior``): AFDPS and DPS against a posterior known in closed form.

The prior is a 2-D Gaussian mixture and the measurement linear-Gaussian, ``y = A x + n`` with
``A`` 1x2 and ``sigma_y = 0.5``; the posterior is then a mixture again
(``GaussianMixture.posterior``). Each population gives one weighted estimate of a vector of
statistics (means, second moments and the posterior's responsibilities, whose exact expectation is
its mode weights); populations are independent, so the z-score of their average uses the spread
across them (as tests/test_steering.py). Runs start from the model's exact marginal at ``t_max``
(scaled_linear keeps ``alpha = 0.068`` there, so its N(0, I) prior is not the marginal).

Measured (this file's sizes, seed 0; reproduce with ``DIFFSAMPLER_FULL_STATS=1`` for the larger ones):
AFDPS ddpm 200 steps, 128 particles, 4096 samples: max |z| 3.0; 256 particles, 16384: 2.3.
AFDPS dpmpp_2m (V = 0) 100 steps, 128 particles: max |z| 0.9. DPS at its best scale is off by
40+ standard errors (mean error 0.3-0.4 against AFDPS's 0.03).
"""

import functools

import numpy as np
import pytest
import torch

import diffsampler as ds
from conftest import stat_size
from diffsampler.posterior import afdps, dps
from diffsampler.posterior.dps import residual_gradient
from diffsampler.posterior.operators import laplacian_mu_y, grad_mu_y

PRIOR = ds.testbeds.GaussianMixture(
    [[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]], [[0.25, 0.0], [0.0, 0.1]]], [0.5, 0.3, 0.2])
A = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
Y = torch.tensor([0.3], dtype=torch.float64)
SIGMA_Y = 0.5
POST = PRIOR.posterior(A, Y, SIGMA_Y ** 2)
Z_MAX = 5.0
PROCESSES = {"scaled_linear": ds.VP.scaled_linear(), "linear": ds.VP.linear()}


def _statistics(x):
    return torch.cat([x, x ** 2, (x[:, 0] * x[:, 1])[:, None], POST.responsibilities(x)], 1)


def _exact():
    w, m, c = POST.weights, POST.means, POST.covs
    second = (w[:, None] * (torch.diagonal(c, 0, 1, 2) + m ** 2)).sum(0)
    cross = (w * (c[:, 0, 1] + m[:, 0] * m[:, 1])).sum()
    return torch.cat([w @ m, second, cross[None], w])


def _start(process, batch, g):
    return PRIOR.sample_marginal(process, process.t_max, batch, generator=g)


@functools.lru_cache(maxsize=None)
def _afdps(solver, steps, particles, batch, process="scaled_linear", seed=0):
    torch.set_num_threads(1)
    p = PROCESSES[process]
    g = torch.Generator().manual_seed(seed)
    res = afdps(PRIOR.denoiser(p, "eps"), _start(p, batch, g), ds.grids.logsnr(p, steps), solver, y=Y,
                operator=ds.posterior.Linear(A), sigma_y=SIGMA_Y, particles=particles, generator=g)
    groups = batch // particles
    w = res.log_weights.exp().reshape(groups, particles, 1)
    return (w * _statistics(res.x).reshape(groups, particles, -1)).sum(1), res


def _z(estimates):
    return (estimates.mean(0) - _exact()) / (estimates.std(0) / len(estimates) ** 0.5)


def _error(estimates):
    return (estimates.mean(0) - _exact()).abs()


# -- AFDPS matches the exact posterior ---------------------------------------------------------------

@pytest.mark.statistical
def test_afdps_reverse_sde_matches_the_exact_posterior():
    est, res = _afdps("ddpm", 200, stat_size(128, 256), stat_size(4096, 16384))
    z = _z(est)
    assert bool((z.abs() < Z_MAX).all()), f"z-scores {z.tolist()}"
    assert res.nfe == 200  # the weights read the steps' own evaluations


@pytest.mark.statistical
@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_afdps_ode_matches_the_exact_posterior(process):
    est, res = _afdps("dpmpp_2m", 100, stat_size(128, 256), stat_size(4096, 16384), process)
    z = _z(est)
    assert bool((z.abs() < Z_MAX).all()), f"{process}: z-scores {z.tolist()}"
    assert res.nfe == 100


@pytest.mark.statistical
def test_the_prior_is_far_from_the_posterior():
    """The measurement moves the mixture a lot (the tests above could not pass by sampling the prior)."""
    g = torch.Generator().manual_seed(0)
    x0, _ = PRIOR.sample(4096, generator=g)
    z = (_statistics(x0).mean(0) - _exact()) / (_statistics(x0).std(0) / 64)
    assert z.abs().max() > 50


@pytest.mark.statistical
def test_dps_is_biased_and_afdps_is_closer():
    """DPS with the exact denoiser, at scales around its best (0.1, 0.2 at 200 steps), misses the
    posterior by tens of standard errors; AFDPS's error is within its Monte-Carlo noise."""
    p = PROCESSES["scaled_linear"]
    afdps_est, _ = _afdps("ddpm", 200, stat_size(128, 256), stat_size(4096, 16384))
    afdps_err = _error(afdps_est)
    batch = stat_size(4096, 16384)
    for scale in (0.1, 0.2):
        g = torch.Generator().manual_seed(0)
        out = dps(PRIOR.denoiser(p, "eps"), _start(p, batch, g), ds.grids.logsnr(p, 200), y=Y,
                  operator=ds.posterior.Linear(A), sigma_y=SIGMA_Y, scale=scale, generator=g)
        s = _statistics(out)
        err = (s.mean(0) - _exact()).abs()
        z = err / (s.std(0) / batch ** 0.5)
        assert z.max() > 20, f"scale {scale}: DPS looks unbiased, z {z.tolist()}"
        # means and mode weights: DPS's worst error is several times AFDPS's
        for sl in (slice(0, 2), slice(5, 8)):
            assert err[sl].max() > 3 * afdps_err[sl].max(), (scale, err.tolist(), afdps_err.tolist())


# -- DPS's rule --------------------------------------------------------------------------------------

def _residual_norm(model, x, t, op, y, per_sample):
    r = (y - op(model(x, t).x0)).reshape(len(x), -1)
    return torch.linalg.vector_norm(r, dim=1).sum() if per_sample else torch.linalg.vector_norm(r)


@pytest.mark.parametrize("per_sample", [True, False])
def test_dps_gradient_equals_finite_differences(per_sample):
    p = PROCESSES["scaled_linear"]
    model = PRIOR.denoiser(p, "eps")
    op = ds.posterior.Linear(A)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, generator=g, dtype=torch.float64)
    t = 0.4 * p.t_max
    ys = Y.expand(3, 1)
    _, grad = residual_gradient(model, x, t, ys, op, per_sample, {})
    fd = torch.zeros_like(x)
    h = 1e-6
    for b in range(3):
        for j in range(2):
            e = torch.zeros_like(x)
            e[b, j] = h
            fd[b, j] = (_residual_norm(model, x + e, t, op, ys, per_sample)
                        - _residual_norm(model, x - e, t, op, ys, per_sample)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_dps_step_is_the_solver_step_minus_scale_times_the_gradient():
    p = PROCESSES["scaled_linear"]
    model = PRIOR.denoiser(p, "eps")
    op = ds.posterior.Linear(A)
    grid = ds.grids.logsnr(p, 5)[:2]  # one step
    x = _start(p, 4, torch.Generator().manual_seed(1))
    out = dps(model, x, grid, y=Y, operator=op, sigma_y=0.05, scale=0.3, generator=torch.Generator().manual_seed(2))
    plain = ds.sample(model, x, grid, "ddpm", generator=torch.Generator().manual_seed(2))
    _, grad = residual_gradient(model, x, float(grid[0]), Y.expand(4, 1), op, True, {})
    torch.testing.assert_close(out, plain - 0.3 * grad, rtol=1e-12, atol=1e-12)
    assert not out.requires_grad and out.grad_fn is None


def test_dps_per_sample_norms_make_a_sample_independent_of_its_batch():
    p = PROCESSES["scaled_linear"]
    model = PRIOR.denoiser(p, "eps")
    grid = ds.grids.logsnr(p, 10)
    x = _start(p, 6, torch.Generator().manual_seed(5))
    x[3:] *= 3.0  # very different companions

    def run(xs, per_sample):
        return dps(model, xs, grid, y=Y, operator=A, sigma_y=0.5, scale=0.5, per_sample=per_sample,
                   generator=torch.Generator().manual_seed(6))

    torch.testing.assert_close(run(x, True)[:3], run(x[:3], True), rtol=1e-12, atol=1e-12)
    assert (run(x, False)[:3] - run(x[:3], False)).abs().max() > 1e-3  # the authors' batch norm couples them


def test_dps_gives_the_network_no_grads_and_keeps_no_graph():
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    p = PROCESSES["scaled_linear"]
    model = ds.Denoiser(lambda x, t: net(x), p, "eps")
    x = p.prior((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = dps(model, x, ds.grids.logsnr(p, 6), y=Y, operator=A, sigma_y=0.5, scale=0.2, solver="dpmpp_2m")
    assert out.grad_fn is None and not out.requires_grad
    assert all(q.grad is None for q in net.parameters())
    assert model.nfe == 6  # one evaluation per step: the step reuses the one the gradient went through


# -- operators ---------------------------------------------------------------------------------------

def test_operators_are_linear_and_shaped():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 8, 8, generator=g,
                                                                                  dtype=torch.float64)
    mask = torch.zeros(8, 8)
    mask[:4] = 1
    ops = [ds.posterior.Inpaint(mask), ds.posterior.Blur(sigma=1.0), ds.posterior.Downsample(2),
           ds.posterior.Linear(torch.randn(5, 192, generator=g, dtype=torch.float64))]
    shapes = [(2, 3, 8, 8), (2, 3, 8, 8), (2, 3, 4, 4), (2, 5)]
    for op, shape in zip(ops, shapes):
        assert op.linear and op(x1).shape == shape, op
        torch.testing.assert_close(op(2 * x1 - 3 * x2), 2 * op(x1) - 3 * op(x2))
    assert torch.equal(ops[0](x1)[..., 4:, :], torch.zeros(2, 3, 4, 8, dtype=torch.float64))
    torch.testing.assert_close(ops[2](torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 2, 2))
    blurred = ops[1](torch.ones(1, 1, 9, 9, dtype=torch.float64))
    torch.testing.assert_close(blurred[0, 0, 4, 4], torch.tensor(1.0, dtype=torch.float64))  # kernel sums to 1


def test_a_nonlinear_operator_gets_its_exact_laplacian():
    op = ds.posterior.as_operator(lambda x: x[:, :1] ** 2)  # y = x1^2
    assert not op.linear
    x = torch.tensor([[0.7, -1.0], [-1.5, 2.0]], dtype=torch.float64)
    y = torch.tensor([[0.3], [0.3]], dtype=torch.float64)
    # mu = (y - x1^2)^2 / (2 s^2): d2/dx1^2 = (12 x1^2 - 4 y) / (2 s^2)
    expected = (12 * x[:, 0] ** 2 - 4 * 0.3) / (2 * 0.25)
    torch.testing.assert_close(laplacian_mu_y(op, x, y, 0.5), expected)
    mu, g = grad_mu_y(op, x, y, 0.5)
    torch.testing.assert_close(g[:, 0], -4 * x[:, 0] * (0.3 - x[:, 0] ** 2) / (2 * 0.25))
    assert bool((g[:, 1] == 0).all())


def test_afdps_runs_with_a_nonlinear_operator_and_one_measurement_per_population():
    p = PROCESSES["scaled_linear"]
    model = PRIOR.denoiser(p, "eps")
    ys = torch.tensor([[-0.8], [0.8]], dtype=torch.float64)
    op = ds.posterior.as_operator(lambda v: torch.tanh(v[:, :1]) + 0.5 * v[:, 1:])

    def run(x, y, g):
        # (ESS-adaptive: the populations resample at different steps, each on its own draws)
        return afdps(model, x, ds.grids.logsnr(p, 100), "ddpm", y=y, operator=op, sigma_y=0.5,
                     particles=64, generator=g)

    full = _start(p, 128, torch.Generator().manual_seed(0))
    res = run(full, ys, torch.Generator().manual_seed(1))
    w = res.log_weights.exp().reshape(2, 64)
    fitted = (w * op(res.x)[:, 0].reshape(2, 64)).sum(1)
    assert fitted[0] < -0.4 and fitted[1] > 0.4, fitted.tolist()
    # the first population alone, with its own measurement, is the same run
    alone = run(full[:64], ys[0], torch.Generator().manual_seed(1))
    torch.testing.assert_close(alone.x, res.x[:64], rtol=1e-10, atol=1e-10)


# -- bad input ---------------------------------------------------------------------------------------

def _bad_afdps(solver="ddpm", **kw):
    p = PROCESSES["scaled_linear"]
    args = dict(y=Y, operator=A, sigma_y=0.5, particles=2)
    args.update(kw)
    return afdps(PRIOR.denoiser(p, "eps"), p.prior((4, 2), dtype=torch.float64), ds.grids.logsnr(p, 4), solver,
                 **args)


def _bad_dps(**kw):
    p = PROCESSES["scaled_linear"]
    args = dict(y=Y, operator=A, sigma_y=0.5, scale=0.5)
    args.update(kw)
    return dps(PRIOR.denoiser(p, "eps"), p.prior((4, 2), dtype=torch.float64), ds.grids.logsnr(p, 4), **args)


def test_bad_input_gets_a_clear_error():
    for bad in (_bad_afdps, _bad_dps):
        with pytest.raises(ValueError, match=r"y has shape \(2,\), but operator .* gives measurements of shape \(1,\)"):
            bad(y=torch.zeros(2, dtype=torch.float64))
        for sigma_y in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="sigma_y .* must be a number > 0"):
                bad(sigma_y=sigma_y)
    numpy_detached = lambda x: torch.from_numpy(x.detach().numpy() @ A.numpy().T)  # noqa: E731
    numpy_direct = lambda x: torch.from_numpy(np.asarray(x.numpy()) @ A.numpy().T)  # noqa: E731
    for op in (numpy_detached, numpy_direct):
        with pytest.raises(ValueError, match="dps: operator <lambda> is not differentiable"):
            _bad_dps(operator=op)
    with pytest.raises(ValueError, match="afdps: operator <lambda> is not differentiable"):
        _bad_afdps(operator=numpy_detached)
    with pytest.raises(ValueError, match="scale .* must be a number >= 0"):
        _bad_dps(scale=-1.0)
    with pytest.raises(ValueError, match="particles must be an integer >= 1, got 0"):
        _bad_afdps(particles=0)
    with pytest.raises(ValueError, match="particles = 3 must divide the batch"):
        _bad_afdps(particles=3)
    with pytest.raises(ValueError, match="afdps: solver 'ddim' .* is not a reverse-SDE kernel"):
        _bad_afdps(solver=ds.solvers.get("ddim", eta=0.5))
    with pytest.raises(ValueError, match="weights must be 'euler'"):
        _bad_afdps(weights="telescoping")
    with pytest.raises(ValueError, match="y must be one measurement"):
        _bad_afdps(y=torch.zeros(3, 1, dtype=torch.float64))  # 2 groups, 3 measurements
