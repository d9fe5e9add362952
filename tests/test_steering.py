"""Steering drivers against closed-form tilted targets, and their contracts.

The target of FK steering toward a linear reward ``r(x) = a.x`` from a Gaussian mixture is the
mixture tilted by ``exp(lam r)``: a mixture again (``GaussianMixture.tilted``). Each population
(group of particles) gives one weighted estimate of a vector of statistics (means, second
moments, and the tilted mixture's responsibilities, whose exact expectation is its weights); the
groups are independent, so the z-score of their average uses the spread across groups. The
self-normalised estimate of a population has a bias of order 1/particles, which the particle
counts below keep under a standard error (and the test that the error shrinks with particles
measures that bias directly).
"""

import pytest
import torch

import diffsampler as ds
from conftest import SOLVER_CONFIGS, config_id, stat_size

TARGET = ds.testbeds.GaussianMixture(
    [[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]], [[0.25, 0.0], [0.0, 0.1]]], [0.5, 0.3, 0.2])
A = torch.tensor([1.0, 0.5], dtype=torch.float64)
LAM = 0.5
TILT = TARGET.tilted(A, LAM)
PROCESS = ds.VP.scaled_linear()
STEPS = 50
Z_MAX = 5.0


def linear_reward(x0, **cond):
    return x0.reshape(len(x0), -1) @ A


def _statistics(x):
    return torch.cat([x, x ** 2, (x[:, 0] * x[:, 1])[:, None], TILT.responsibilities(x)], 1)


def _exact():
    w, m, c = TILT.weights, TILT.means, TILT.covs
    second = (w[:, None] * (torch.diagonal(c, 0, 1, 2) + m ** 2)).sum(0)
    cross = (w * (c[:, 0, 1] + m[:, 0] * m[:, 1])).sum()
    return torch.cat([w @ m, second, cross[None], w])


def _fk_estimates(particles, batch, seed=0, solver="ddpm", **kw):
    g = torch.Generator().manual_seed(seed)
    x_T = PROCESS.prior((batch, 2), generator=g, dtype=torch.float64)
    res = ds.steering.fk(TARGET.denoiser(PROCESS, "eps"), x_T, ds.grids.logsnr(PROCESS, STEPS), solver,
                         linear_reward, particles=particles, generator=g, lam=LAM, **kw)
    groups = batch // particles
    w = res.log_weights.exp().reshape(groups, particles, 1)
    return (w * _statistics(res.x).reshape(groups, particles, -1)).sum(1), res


def _z(estimates):
    return (estimates.mean(0) - _exact()) / (estimates.std(0) / len(estimates) ** 0.5)


EVERY_STEP = dict(resample_every=1, resample_window=(1, STEPS))


@pytest.mark.statistical
def test_fk_diff_reaches_the_tilted_mixture():
    est, res = _fk_estimates(32, stat_size(2048, 8192), **EVERY_STEP)
    z = _z(est)
    assert bool((z.abs() < Z_MAX).all()), f"z-scores {z.tolist()}"
    assert res.nfe == STEPS  # the potentials read the next step's own evaluations


@pytest.mark.statistical
def test_fk_error_shrinks_as_particles_grow():
    """1 particle is the untilted model (no selection); 4 are visibly biased; 32 less so.

    Measured on the mode weights (bounded statistics): 0.38 / 0.07 / 0.03 at 4096 samples, where a
    mode weight's standard error is at most 0.5 / sqrt(4096) = 0.008 at one particle per group."""
    batch = stat_size(4096, 16384)
    estimates = [_fk_estimates(p, batch, **EVERY_STEP)[0] for p in (1, 4, 32)]
    errors = [(e.mean(0) - _exact())[-3:].abs().max().item() for e in estimates]
    assert errors[0] > 3 * errors[1] and errors[1] > errors[2], errors
    assert _z(estimates[0]).abs().max() > 20  # the tilt is far from the prior


@pytest.mark.statistical
@pytest.mark.parametrize("potential", ["max", "add", "immediate"])
def test_fk_potentials_with_the_final_correction_reach_the_same_target(potential):
    """One intermediate resampling, then the final correction exp(lam r_0) / prod G: the same tilt.
    (With many candidate steps these potentials over-tilt the intermediate targets, "add" the most,
    and need many more particles; the final correction keeps them consistent.)"""
    est, _ = _fk_estimates(64, stat_size(4096, 16384), potential=potential, resample_every=STEPS // 2,
                           resample_window=(STEPS // 2, STEPS // 2))
    z = _z(est)
    assert bool((z.abs() < Z_MAX).all()), f"{potential}: z-scores {z.tolist()}"


@pytest.mark.statistical
def test_an_ess_schedule_must_accumulate_the_weights_it_does_not_resample_with():
    batch = stat_size(2048, 8192)
    kept, _ = _fk_estimates(32, batch, ess_threshold=0.5, **EVERY_STEP)
    assert bool((_z(kept).abs() < Z_MAX).all()), f"z-scores {_z(kept).tolist()}"
    dropped, _ = _fk_estimates(32, batch, ess_threshold=0.5, keep_weights=False, **EVERY_STEP)
    assert _z(dropped).abs().max() > 4 * Z_MAX, "the authors' adaptive branch (weights dropped) is biased"


def test_default_schedule_is_the_authors_scaled_to_the_grid():
    assert ds.steering.schedule_steps(100) == [5, 10, 15, 20, 25, 30, 100]
    assert ds.steering.schedule_steps(20) == [1, 2, 3, 4, 5, 6, 20]
    assert ds.steering.schedule_steps(10, every=2, window=(2, 6)) == [2, 4, 6, 10]


def test_svdd_reward_grows_with_candidates_and_with_one_over_alpha():
    batch = 256
    means = {}
    for m, alpha in [(1, 0.0), (4, 0.0), (16, 0.0), (16, 1.0), (16, 4.0)]:
        g = torch.Generator().manual_seed(1)
        x_T = PROCESS.prior((batch, 2), generator=g, dtype=torch.float64)
        res = ds.steering.svdd(TARGET.denoiser(PROCESS, "eps"), x_T, ds.grids.logsnr(PROCESS, 20), "ddpm",
                               linear_reward, candidates=m, alpha=alpha, generator=g)
        means[m, alpha] = res.rewards.mean().item()
        assert res.nfe == 1 + m * 19  # one evaluation to start, then M per step but the last
    # standard error of a mean reward over 256 samples is about 1.5 / 16 = 0.1
    assert means[1, 0.0] + 0.5 < means[4, 0.0] < means[16, 0.0] - 0.2
    assert means[16, 4.0] < means[16, 1.0] - 0.2 < means[16, 0.0] - 0.4


def test_best_of_n_picks_the_highest_reward_of_each_population():
    g = torch.Generator().manual_seed(2)
    x_T = PROCESS.prior((12, 2), generator=g, dtype=torch.float64)
    grid = ds.grids.logsnr(PROCESS, 10)
    res = ds.steering.best_of_n(TARGET.denoiser(PROCESS, "eps"), x_T, grid, "dpmpp_2m", linear_reward, particles=4,
                                generator=g)
    plain = ds.sample(TARGET.denoiser(PROCESS, "eps"), x_T, grid, "dpmpp_2m")
    assert torch.equal(res.x, plain)
    r = linear_reward(plain).reshape(3, 4)
    assert torch.equal(res.best, plain.reshape(3, 4, 2)[torch.arange(3), r.argmax(1)])
    assert res.nfe == 10 and res.log_weights.shape == (12,)
    torch.testing.assert_close(torch.logsumexp(res.log_weights.reshape(3, 4), 1), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("ess_threshold", [None, 0.5])
def test_a_population_does_not_depend_on_the_other_populations(ess_threshold):
    """Group 0 of a batch of 8 groups equals group 0 run alone (same generator), also when each
    population resamples on its own ESS (then the groups resample at different steps: the resampling
    draws and the copies' noise keys must follow the population's own history)."""
    outs = []
    for groups in (8, 1):
        g = torch.Generator().manual_seed(4)
        x_T = PROCESS.prior((4 * groups, 2), generator=g, dtype=torch.float64)
        res = ds.steering.fk(TARGET.denoiser(PROCESS, "eps"), x_T, ds.grids.logsnr(PROCESS, 12), "ddpm",
                             linear_reward, particles=4, generator=g, lam=2.0, resample_every=1,
                             resample_window=(1, 12), resampler="systematic", ess_threshold=ess_threshold)
        outs.append((res.x[:4], res.log_weights[:4]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


STOCHASTIC = [c for c in SOLVER_CONFIGS if ds.solvers.get(c[0], **c[1]).stochastic]
DRIVERS = {
    "fk": lambda *a, **k: ds.steering.fk(*a, lam=1.0, resample_every=1, resample_window=(1, 6), **k),
    "svdd": lambda *a, **k: ds.steering.svdd(*a, candidates=2, **k),
    "best_of_n": ds.steering.best_of_n,
}


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("cfg", STOCHASTIC, ids=config_id)
def test_every_driver_runs_with_every_stochastic_solver_and_guidance(driver, cfg):
    mixture = ds.testbeds.random_mixture(2, 3, seed=3)
    labelled = ds.testbeds.GaussianMixture(mixture.means, mixture.covs, mixture.weights, labels=[0, 1, 1])
    p = ds.VP.scaled_linear()
    model = ds.guidance.cfg(labelled.denoiser(p, "eps"), scale=2.0)
    g = torch.Generator().manual_seed(0)
    x_T = p.prior((4, 2), generator=g, dtype=torch.float64)
    label = torch.tensor([0, 0, 1, 1])
    res = DRIVERS[driver](model, x_T, ds.grids.karras(p, 6), ds.solvers.get(cfg[0], **cfg[1]), linear_reward,
                          particles=2, generator=g, label=label)
    assert res.x.shape == (4, 2) and res.best.shape == (2, 2) and bool(torch.isfinite(res.x).all())
    assert res.rewards.shape == (4,) and res.nfe > 0


def _bad(reward=linear_reward, particles=2, solver="ddpm", method=ds.steering.fk, **kw):
    g = torch.Generator().manual_seed(0)
    x_T = PROCESS.prior((4, 2), generator=g, dtype=torch.float64)
    return method(TARGET.denoiser(PROCESS, "eps"), x_T, ds.grids.logsnr(PROCESS, 6), solver, reward,
                  particles=particles, generator=g, **kw)


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"reward returned \(4, 1\) at step 1"):
        _bad(reward=lambda x0: x0[:, :1], resample_every=1, resample_window=(1, 6))
    with pytest.raises(ValueError, match=r"reward is not finite at step 1 .* samples \[0, 1, 2, 3\]"):
        _bad(reward=lambda x0: x0[:, 0] * float("nan"), resample_every=1, resample_window=(1, 6))
    with pytest.raises(ValueError, match="particles must be an integer >= 1, got 0"):
        _bad(particles=0)
    with pytest.raises(ValueError, match="particles = 3 must divide the batch"):
        _bad(particles=3)
    for method in (ds.steering.fk, ds.steering.svdd):
        with pytest.raises(ValueError, match="draws no noise.*use one of .*ddpm"):
            _bad(solver="dpmpp_2m", method=method)
    with pytest.raises(ValueError, match="potential must be one of diff, max, add, immediate"):
        _bad(potential="sum")
    with pytest.raises(ValueError, match="resample_window"):
        _bad(resample_window=(0, 3))
    with pytest.raises(ValueError, match="ess_threshold"):
        _bad(ess_threshold=1.5)
    with pytest.raises(ValueError, match="candidates must be an integer >= 1"):
        _bad(method=ds.steering.svdd, candidates=0)


@pytest.mark.parametrize("method", [ds.steering.fk, ds.steering.svdd, ds.steering.best_of_n])
def test_drivers_build_no_autograd_graph_through_the_network(method):
    net = torch.nn.Linear(2, 2).double()  # parameters require grad, as a user's network's do
    model = ds.Denoiser(lambda x, t: net(x), PROCESS, "eps")
    g = torch.Generator().manual_seed(0)
    x_T = PROCESS.prior((4, 2), generator=g, dtype=torch.float64)
    res = method(model, x_T, ds.grids.logsnr(PROCESS, 5), "ddpm", linear_reward, particles=2, generator=g)
    assert not res.x.requires_grad and not res.best.requires_grad
