"""Stochastic solvers against the exact target: a two-sample comparison with exact mixture samples.

Both sample sets are split by the component of highest posterior probability
under the data density, and the proportions, means and covariances of the parts
are compared with z-scores built from the sample sizes. A z-score above 5 fails
(probability below 1e-6 per statistic for a correct sampler, ignoring the
discretisation bias, which the step counts below keep well under one standard
error in the reduced run).
"""

import pytest
import torch

import diffsampler as ds
from conftest import CORE_PROCESSES, make_process, natural_grid, natural_prediction, stat_size

TARGET = ds.testbeds.GaussianMixture(
    [[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]], [[0.25, 0.0], [0.0, 0.1]]],
    [0.5, 0.3, 0.2], labels=[0, 1, 2])

STOCHASTIC = [
    ("ddim", {"eta": 1.0}, 200),
    ("ddim", {"eta": 0.5}, 200),
    ("euler", {"s_churn": 10.0}, 200),
    ("heun", {"s_churn": 10.0}, 100),
    ("euler_ancestral", {}, 200),
    ("dpmpp_2m_sde", {}, 100),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}, 100),
    ("dpmpp_3m_sde", {}, 300),
    ("ddpm", {}, 200),
    ("dpm_2_ancestral", {}, 100),
    ("dpmpp_2s_ancestral", {}, 100),
    ("dpmpp_sde", {}, 100),  # on uniform flow grids the long last log-SNR steps need more steps
    ("seeds_2", {}, 100),
    ("seeds_2", {"solver_type": "phi_2", "eta": 0.5}, 100),
    ("seeds_3", {}, 60),
    ("er_sde", {}, 100),
    ("er_sde", {"max_stage": 1}, 200),
    ("euler_ancestral_cfg_pp", {}, 200),
    ("sa_solver", {}, 100),
    ("sa_solver", {"tau_window": (0.0, 1.0), "predictor_order": 2, "corrector_order": 2}, 100),
    ("sa_solver_pece", {"tau_window": (0.0, 1.0)}, 60),
]
Z_MAX = 5.0


def _parts(x):
    lp = torch.stack([TARGET.log_prob(x, label=k) for k in range(3)], 1) + TARGET.log_weights
    comp = lp.argmax(1)
    return [x[comp == k] for k in range(3)]


def _moment_z(a, b):
    """z-scores of the differences of means and covariance entries between samples a and b."""
    zs = []
    ma, mb = a.mean(0), b.mean(0)
    zs.append((ma - mb).abs() / (a.var(0) / len(a) + b.var(0) / len(b)).sqrt())
    ca, cb = a - ma, b - mb
    pa, pb = ca[:, :, None] * ca[:, None, :], cb[:, :, None] * cb[:, None, :]
    se = (pa.var(0) / len(a) + pb.var(0) / len(b)).sqrt()
    zs.append(((pa.mean(0) - pb.mean(0)).abs() / se).flatten())
    return torch.cat(zs)


def assert_matches_target(x, n_exact, generator):
    exact, _ = TARGET.sample(n_exact, generator=generator)
    got, ref = _parts(x), _parts(exact)
    for k in range(3):
        p1, p2 = len(got[k]) / len(x), len(ref[k]) / n_exact
        pooled = (len(got[k]) + len(ref[k])) / (len(x) + n_exact)
        z_prop = abs(p1 - p2) / (pooled * (1 - pooled) * (1 / len(x) + 1 / n_exact)) ** 0.5
        assert z_prop < Z_MAX, f"component {k}: weight {p1:.4f} vs exact {p2:.4f} (z = {z_prop:.1f})"
        z = _moment_z(got[k], ref[k])
        assert bool((z < Z_MAX).all()), f"component {k}: moment z-scores {z.tolist()}"


@pytest.mark.statistical
@pytest.mark.parametrize("name, options, steps", STOCHASTIC, ids=lambda v: str(v))
@pytest.mark.parametrize("key", CORE_PROCESSES)
def test_stochastic_solver_samples_the_target(key, name, options, steps):
    p = make_process(key)
    solver = ds.solvers.get(name, **options)
    # (a solver on Brownian noise pays for the path's bridges at every step: half the samples in CI)
    n = stat_size(4_000 if solver.brownian else 8_000, 100_000)
    steps = stat_size(steps, 4 * steps)
    g = torch.Generator().manual_seed(11)
    # Start from the exact marginal at t_max, not the prior: they differ where alpha(t_max) > 0.
    x_T = TARGET.sample_marginal(p, p.t_max, n, generator=g)
    assert solver.stochastic
    x = ds.sample(TARGET.denoiser(p, natural_prediction(p)), x_T, natural_grid(key, p, steps), solver, generator=g)
    assert_matches_target(x, 4 * n, g)


@pytest.mark.statistical
def test_the_check_rejects_a_wrong_sampler():
    """The same check must fail for samples of a visibly different distribution (the deterministic
    sampler at 3 steps, which collapses variance), or it proves nothing."""
    p = ds.VP.scaled_linear()
    n = stat_size(8_000, 100_000)
    g = torch.Generator().manual_seed(12)
    x_T = TARGET.sample_marginal(p, p.t_max, n, generator=g)
    x = ds.sample(TARGET.denoiser(p, "eps"), x_T, ds.grids.logsnr(p, 3), "ddim")
    with pytest.raises(AssertionError):
        assert_matches_target(x, 4 * n, g)


@pytest.mark.statistical
def test_brownian_noise_samples_the_target_and_keeps_the_path_across_step_counts():
    """With brownian=True a stochastic solver still samples the target, and a run with twice the steps
    ends near the coarse run's samples (same path), far nearer than a run with independent noise."""
    p = ds.VP.scaled_linear()
    n = stat_size(3_000, 100_000)
    g = torch.Generator().manual_seed(13)
    x_T = TARGET.sample_marginal(p, p.t_max, n, generator=g)
    model = TARGET.denoiser(p, "eps")
    solver = ds.solvers.get("dpmpp_2m_sde")
    run = lambda steps, seed, **kw: ds.sample(model, x_T, ds.grids.karras(p, steps), solver,  # noqa: E731
                                              generator=torch.Generator().manual_seed(seed), **kw)
    coarse, fine = run(100, 1, brownian=True), run(200, 1, brownian=True)
    assert_matches_target(fine, 4 * n, g)
    other = run(200, 2, brownian=True)
    same_path = (coarse - fine).norm(dim=1).median()
    other_path = (coarse - other).norm(dim=1).median()
    assert same_path < 0.3 * other_path, (same_path, other_path)


@pytest.mark.statistical
@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("key", CORE_PROCESSES)
def test_lcm_with_a_consistency_function_is_exact_at_any_step_count(key, steps):
    """With the exact consistency function of a Gaussian (its closed-form flow map to t = 0) as the
    model's data estimate, multistep consistency sampling draws the Gaussian exactly for any step count."""
    p = make_process(key)
    gauss = ds.testbeds.Gaussian([0.5, -1.0], [[0.4, 0.1], [0.1, 0.2]])

    def consistency(x, time):
        t = float(time[0])
        return gauss.flow_map(p, x, t, 0.0)

    model = ds.Denoiser(consistency, p, "x0", time_input=lambda t: t)
    n = stat_size(20_000, 200_000)
    g = torch.Generator().manual_seed(21)
    x_T = gauss.sample_marginal(p, p.t_max, n, generator=g)
    x = ds.sample(model, x_T, natural_grid(key, p, steps), "lcm", generator=g)
    exact, _ = gauss.sample(n, generator=g)
    z = _moment_z(x, exact)
    assert bool((z < Z_MAX).all()), z.tolist()


@pytest.mark.parametrize("key", ["vp_scaled_linear", "edm"])
def test_seeds_2_without_noise_is_dpmpp_2s(key):
    """SEEDS-2 with eta = 0 integrates the probability-flow ODE with DPM-Solver++(2S)'s stages."""
    p = make_process(key)
    model = TARGET.denoiser(p, natural_prediction(p))
    x = p.prior((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = natural_grid(key, p, 12)
    a = ds.sample(model, x, grid, ds.solvers.get("seeds_2", eta=0.0))
    b = ds.sample(model, x, grid, "dpmpp_2s")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_er_sde_weights_are_the_papers_integrals():
    """ER-SDE-Solver-3's stage weights, with the integrals done by scipy's adaptive quadrature, against
    the solver's table; the 200-point left Riemann sum of the reference code is ~1e-3 off."""
    from scipy.integrate import quad

    from diffsampler.solvers.base import Knots
    from diffsampler.solvers.er_sde import default_noise_scale as phi

    p = ds.VP.scaled_linear()
    knots = Knots.from_grid(p, ds.grids.karras(p, 8, end="min"))
    plans = list(ds.solvers.get("er_sde").plan(knots))
    i = 4
    lev = [s / a for s, a in zip(knots.sigma, knots.alpha)]
    l_s, l_t, a_t = lev[i], lev[i + 1], knots.alpha[i + 1]
    r = phi(l_t) / phi(l_s)
    w2 = a_t * (l_t - l_s + phi(l_t) * quad(lambda v: 1 / phi(v), l_t, l_s, epsabs=0, epsrel=1e-13)[0])
    w3 = a_t * ((l_t - l_s) ** 2 / 2 + phi(l_t) * quad(lambda v: (v - l_s) / phi(v), l_t, l_s, epsabs=0,
                                                          epsrel=1e-13)[0])
    d1, d1_prev = 1 / (l_s - lev[i - 1]), 1 / (lev[i - 1] - lev[i - 2])
    u = 2 / (l_s - lev[i - 2])
    want = [a_t * (1 - r) + w2 * d1 + w3 * u * d1, -w2 * d1 - w3 * u * (d1 + d1_prev), w3 * u * d1_prev]
    assert plans[i].A == pytest.approx(a_t / knots.alpha[i] * r, rel=1e-14)
    assert list(plans[i].P) == pytest.approx(want, rel=1e-10)
    assert plans[i].C == pytest.approx(a_t * (l_t ** 2 - l_s ** 2 * r ** 2) ** 0.5, rel=1e-14)
    step = (l_s - l_t) / 200
    riemann = sum(1 / phi(l_t + k * step) for k in range(200)) * step
    exact = quad(lambda v: 1 / phi(v), l_t, l_s, epsabs=0, epsrel=1e-13)[0]
    assert 1e-4 < abs(riemann / exact - 1) < 1e-2
