"""DPM-Solver-v3 and its empirical model statistics, against closed forms on a single Gaussian."""

import dataclasses

import pytest
import torch

import diffsampler as ds
from diffsampler.calibrate.ems import ModelStatistics, ems, statistics_grid
from conftest import rms

torch.set_num_threads(1)

MEAN, VAR = torch.tensor([0.8, -0.5], dtype=torch.float64), torch.tensor([0.3, 0.05], dtype=torch.float64)
GAUSSIAN = ds.testbeds.Gaussian(MEAN.tolist(), torch.diag(VAR).tolist())  # diagonal: l, f are closed form
MIXTURE = ds.testbeds.random_mixture(2, 3, seed=1)


def process():
    return ds.VP.scaled_linear()


def start(p, n=64, seed=0):
    return p.prior((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_statistics(p, steps):
    """For data N(mu, diag v): N = sigma eps = l (x - alpha mu) with l = sigma^2 / (alpha^2 v + sigma^2) =
    1 / (1 + e^{2 lambda} v), so f = (N - l x) / alpha = -l mu is deterministic: s = 0 and
    b = E f' = -mu dl/dlambda = 2 mu l (1 - l)."""
    t = statistics_grid(p, steps)
    lam = p.lambda_(t).to(torch.float64)
    l = 1.0 / (1.0 + torch.exp(2 * lam)[:, None] * VAR)  # noqa: E741
    return ModelStatistics(lam, t, l, torch.zeros_like(l), 2 * MEAN * l * (1 - l), repr(p))


@pytest.mark.parametrize("make", [ds.VP.scaled_linear, ds.EDM], ids=["vp", "edm"])
def test_ems_recovers_the_closed_form_statistics_of_a_gaussian(make):
    p = make()
    model = GAUSSIAN.denoiser(p, "eps")
    errors = []
    for steps in (60, 200):
        est = ems(model, start(p, 8), steps=steps, probes=1)
        exact = exact_statistics(p, steps)
        assert torch.allclose(est.lam, exact.lam)
        # Hutchinson's estimator is exact for a diagonal Jacobian
        assert torch.allclose(est.l, exact.l, rtol=1e-9, atol=1e-12)
        assert est.s.abs().max() < 1e-4  # not identified: the ridge sends it to ~0
        errors.append(((est.b - exact.b).abs() / (exact.b.abs() + 1e-3)).max().item())
    # b goes through dl/dlambda, a second-order difference over the grid: O(cell^2), 11x for 10/3 the points
    assert errors[1] < 1e-2 and errors[1] < errors[0] / 6, errors


def test_ems_l_on_a_mixture_matches_the_exact_jacobian_diagonal():
    p = process()
    model = MIXTURE.denoiser(p, "eps")
    x = start(p, 48)
    est = ems(model, x, steps=8, probes=8)
    # l at t_max from the exact Jacobian of N = sigma eps at the same states (x itself)
    t = float(p.t_max)
    jac = torch.autograd.functional.jacobian(lambda y: model(y, t).eps.sum(0) * float(p.sigma(t)), x)
    diag = torch.stack([jac[d, :, d] for d in range(2)], dim=1).mean(0)
    # Rademacher variance: the off-diagonal part over 48 * 8 probes
    assert torch.allclose(est.l[0], diag, atol=0.05), (est.l[0], diag)


def test_degenerate_statistics_reduce_to_dpm_solver_pp():
    p = process()
    model = MIXTURE.denoiser(p, "eps")
    x = start(p, 16)
    for steps in (6, 20):
        g = ds.grids.logsnr(p, steps, end="min")
        for order, base in ((2, ds.solvers.get("res_multistep")),
                            (3, ds.solvers.get("dpmpp_3m_sde", eta=0.0, lower_order_final=False))):
            v3 = ds.solvers.get("dpm_solver_v3", solver_order=order, corrector=False, lower_order_final=False)
            a, b = ds.sample(model, x, g, v3), ds.sample(model, x, g, base)
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-13), (steps, order, (a - b).abs().max())


def test_degenerate_statistics_tensors_equal_none():
    """The tabulated path with l = 1, s = b = 0 on a statistics grid equals the closed forms to round-off
    (its quadrature is exact for the exponential of a linear function), corrector included."""
    p = process()
    model = MIXTURE.denoiser(p, "eps")
    x = start(p, 16)
    stats_t = statistics_grid(p, 40)
    g = torch.cat([stats_t[::8], torch.zeros(1, dtype=torch.float64)])  # knots on statistics nodes, then 0
    deg = ModelStatistics.degenerate(p, stats_t, (2,))
    for opts in ({}, {"corrector": True}, {"solver_order": 3, "corrector": True, "corrector_pseudo": False},
                 {"solver_order": 3, "corrector": True, "predictor_pseudo": True}):
        a = ds.sample(model, x, g, ds.solvers.get("dpm_solver_v3", statistics=deg, **opts))
        b = ds.sample(model, x, g, ds.solvers.get("dpm_solver_v3", **opts))
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-11), (opts, (a - b).abs().max())


def test_degenerate_corrector_is_the_exponential_trapezoid():
    """Order 1 with the pseudo corrector, independently: predictor DDIM, then the corrector integrates the
    line through x0_s and x0_t exactly: x_c = (sigma_t/sigma_s) x_s + alpha_t (1 - e^-h) m_s
    + alpha_t (1 - (1 - e^-h)/h) (m_t - m_s)."""
    import math

    p = process()
    model = MIXTURE.denoiser(p, "eps")
    x = start(p, 8)
    g = ds.grids.logsnr(p, 2, end="min")
    t0, t1, t2 = g.tolist()
    ex = ds.sample(model, x, g, ds.solvers.get("dpm_solver_v3", solver_order=1, corrector=True))
    a = lambda t: float(p.alpha(t))  # noqa: E731
    s = lambda t: float(p.sigma(t))  # noqa: E731
    lam = lambda t: float(p.lambda_(t))  # noqa: E731

    def ddim(x, ta, tb, m):
        return s(tb) / s(ta) * x + a(tb) * -math.expm1(lam(ta) - lam(tb)) * m

    m0 = model(x, t0).x0
    x1p = ddim(x, t0, t1, m0)
    m1 = model(x1p, t1).x0
    h = lam(t1) - lam(t0)
    x1 = ddim(x, t0, t1, m0) + a(t1) * (1 + math.expm1(-h) / h) * (m1 - m0)
    x2 = ddim(x1, t1, t2, m1)  # last step: prediction only
    assert torch.allclose(ex, x2, rtol=1e-12, atol=1e-13)


def test_exact_statistics_make_a_gaussian_nearly_exact():
    p = process()
    model = GAUSSIAN.denoiser(p, "eps")
    x = start(p, 32, seed=3)
    stats = exact_statistics(p, 400)
    g = ds.grids.logsnr(p, 5, end="min")
    ref = GAUSSIAN.flow_map(p, x, g[0], g[-1])
    err_v3 = rms(ds.sample(model, x, g, ds.solvers.get("dpm_solver_v3", statistics=stats)), ref)
    err_base = rms(ds.sample(model, x, g, "dpm_solver_v3"), ref)
    assert err_v3 < 1e-3 * err_base, (err_v3, err_base)
    # and the estimated statistics do nearly as well
    est = ems(model, start(p, 16, seed=9), steps=200, probes=1)
    err_est = rms(ds.sample(model, x, g, ds.solvers.get("dpm_solver_v3", statistics=est)), ref)
    assert err_est < 1e-2 * err_base, (err_est, err_base)


def test_estimated_statistics_beat_dpm_solver_pp_on_a_mixture():
    p = process()
    model = MIXTURE.denoiser(p, "eps")
    est = ems(model, start(p, 128, seed=1), steps=100, probes=2)
    x = start(p, 64, seed=2)  # held-out start points
    g = ds.grids.logsnr(p, 6, end="min")
    ref = MIXTURE.ode_reference(p, x, g[0], g[-1])
    err_v3 = rms(ds.sample(model, x, g, ds.solvers.get("dpm_solver_v3", statistics=est, corrector=True)), ref)
    err_pp = rms(ds.sample(model, x, g, "dpmpp_2m"), ref)
    assert err_v3 < err_pp, (err_v3, err_pp)


def test_save_load_round_trip(tmp_path):
    p = process()
    stats = exact_statistics(p, 10)
    path = tmp_path / "ems.safetensors"
    stats.save(path)
    back = ModelStatistics.load(path)
    assert back.process == stats.process
    for name in ("lam", "t", "l", "s", "b"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    (tmp_path / "other.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception):
        ModelStatistics.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="no file"):
        ModelStatistics.load(tmp_path / "missing.safetensors")


def test_bad_input():
    p = process()
    stats = exact_statistics(p, 20)
    x = start(p, 4)
    g = ds.grids.logsnr(p, 4, end="min")
    model_other = GAUSSIAN.denoiser(ds.EDM(), "x0")
    with pytest.raises(ValueError, match="do not belong to the model's process"):
        ds.sample(model_other, ds.EDM().prior((4, 2), dtype=torch.float64), ds.grids.karras(ds.EDM(), 4),
                  ds.solvers.get("dpm_solver_v3", statistics=stats))
    with pytest.raises(ValueError, match="shape"):
        ds.sample(GAUSSIAN.denoiser(p, "eps"), start(p, 4).repeat(1, 2), g,
                  ds.solvers.get("dpm_solver_v3", statistics=stats))
    narrow = ModelStatistics(stats.lam[5:15], stats.t[5:15], stats.l[5:15], stats.s[5:15], stats.b[5:15],
                             stats.process)
    with pytest.raises(ValueError, match="outside the statistics' span"):
        ds.sample(GAUSSIAN.denoiser(p, "eps"), x, g, ds.solvers.get("dpm_solver_v3", statistics=narrow))
    with pytest.raises(ValueError, match="statistics"):
        ds.solvers.get("dpm_solver_v3", statistics="file.safetensors")
    with pytest.raises(ValueError, match="solver_order"):
        ds.solvers.get("dpm_solver_v3", solver_order=4)
    with pytest.raises(ValueError, match="steps"):
        ems(GAUSSIAN.denoiser(p, "eps"), x, steps=1)
    with pytest.raises(ValueError, match="probes"):
        ems(GAUSSIAN.denoiser(p, "eps"), x, probes=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        dataclasses.replace(stats, lam=stats.lam.flip(0))


def test_a_grid_finer_than_the_statistics_is_refused_by_name():
    from diffsampler.calibrate.ems import ModelStatistics
    process = ds.VPLinear()
    stats = ModelStatistics.degenerate(process, torch.linspace(1.0, 1e-3, 10, dtype=torch.float64), (2,))
    model = ds.testbeds.random_mixture(2, 2, seed=0).denoiser(process, "eps")
    x = process.prior((3, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="snap to the same node"):
        ds.sample(model, x, ds.grids.logsnr(process, 20), ds.solvers.get("dpm_solver_v3", statistics=stats))


def test_ems_takes_per_sample_conditioning():
    # its Jacobian-vector products evaluate several copies of the batch at once: the labels follow them
    process = ds.VPLinear()

    def net(x, t, label):
        assert label.shape[0] == x.shape[0]
        return 0.3 * x + label.reshape(-1, 1).to(x.dtype)

    model = ds.Denoiser(net, process, "eps")
    x = process.prior((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = ds.calibrate.ems(model, x, steps=8, probes=2, label=torch.tensor([0, 1, 2, 3]),
                             generator=torch.Generator().manual_seed(1))
    assert stats.shape == (2,) and bool(torch.isfinite(stats.l).all())
