import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffsampler as ds
from conftest import PROCESSES, make_process


ALL = list(PROCESSES)


@pytest.mark.parametrize("key", ALL)
def test_float_and_tensor_paths_agree(key):
    p = make_process(key)
    ts = torch.linspace(p.t_min, p.t_max, 37, dtype=torch.float64)
    for fn in ("alpha", "sigma", "d_alpha", "d_sigma", "lambda_", "ode_scale", "ode_sigma"):
        vec = getattr(p, fn)(ts)
        assert vec.dtype == torch.float64
        scal = torch.tensor([float(getattr(p, fn)(float(t))) for t in ts], dtype=torch.float64)
        torch.testing.assert_close(vec, scal, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("key", ALL)
def test_derivatives_match_finite_differences(key):
    p = make_process(key)
    # Avoid the nodes of the piecewise-linear discrete schedule, where the derivative jumps.
    ts = torch.linspace(p.t_min, p.t_max, 23, dtype=torch.float64)[1:-1] + 0.3e-4
    eps = 1e-7
    for f, df in (("alpha", "d_alpha"), ("sigma", "d_sigma")):
        fd = (getattr(p, f)(ts + eps) - getattr(p, f)(ts - eps)) / (2 * eps)
        torch.testing.assert_close(getattr(p, df)(ts), fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", ALL)
def test_lambda_is_decreasing_and_inverted(key):
    p = make_process(key)
    ts = torch.linspace(p.t_min, p.t_max, 101, dtype=torch.float64)
    if not math.isfinite(float(p.lambda_(p.t_max))):
        ts = ts[:-1]
    lam = p.lambda_(ts)
    assert bool((lam[1:] < lam[:-1]).all())
    torch.testing.assert_close(p.t_of_lambda(lam), ts, rtol=1e-9, atol=1e-12)
    s = p.ode_sigma(ts)
    torch.testing.assert_close(p.t_of_ode_sigma(s), ts, rtol=1e-9, atol=1e-12)


@given(u=st.floats(0.0, 1.0))
@settings(max_examples=60, deadline=None)
def test_lambda_inverse_property(u):
    for key in ALL:
        p = make_process(key)
        t = p.t_min + u * (p.t_max - p.t_min)
        lam = float(p.lambda_(t))
        if math.isfinite(lam):
            assert math.isclose(float(p.t_of_lambda(lam)), t, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("key", ["vp_scaled_linear", "vp_linear", "vp_cosine"])
def test_vp_preserves_variance(key):
    p = make_process(key)
    ts = torch.linspace(p.t_min, p.t_max, 50, dtype=torch.float64)
    torch.testing.assert_close(p.alpha(ts) ** 2 + p.sigma(ts) ** 2, torch.ones_like(ts))


def test_discrete_vp_nodes_are_the_training_timesteps():
    p = ds.VP.scaled_linear()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    idx = torch.tensor([0, 1, 10, 500, 998, 999])
    t = (idx + 1).to(torch.float64) / 1000
    torch.testing.assert_close(p.alpha(t) ** 2, ac[idx], rtol=1e-12, atol=0)
    torch.testing.assert_close(p.time_input(t), idx.to(torch.float64))
    torch.testing.assert_close(p.t_of_timestep(idx.to(torch.float64)), t)
    assert float(p.alpha(0.0)) == 1.0 and float(p.sigma(0.0)) == 0.0


def test_squaredcos_matches_the_cosine_formula():
    p = ds.VP.squaredcos_cap_v2()
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    for i in (0, 100, 700):  # far from the beta cap
        assert math.isclose(float(p.alpha((i + 1) / 1000)) ** 2, f((i + 1) / 1000) / f(0), rel_tol=1e-9)


def test_vp_discrete_from_alphas_cumprod_equals_from_betas():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    a = ds.VP.discrete(betas=betas)
    b = ds.VP.discrete(alphas_cumprod=torch.cumprod(1 - betas, 0))
    ts = torch.rand(20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.sigma(ts), b.sigma(ts))


@pytest.mark.parametrize("bad", [dict(), dict(betas=[0.1, 1.5]), dict(alphas_cumprod=[0.5, 0.9])])
def test_vp_discrete_rejects_bad_schedules(bad):
    with pytest.raises(ValueError, match="VP.discrete"):
        ds.VP.discrete(**bad)


def test_edm_and_flow_closed_forms():
    e, f = ds.EDM(), ds.Flow()
    assert float(e.alpha(3.0)) == 1.0 and float(e.sigma(3.0)) == 3.0 and float(e.time_input(3.0)) == 3.0
    assert math.isclose(float(f.lambda_(0.25)), math.log(3.0))
    assert float(f.ode_sigma(0.4)) == 0.4 and float(f.ode_scale(0.4)) == 1.0
    assert math.isclose(float(e.ode_sigma(0.4)), 0.4)


@pytest.mark.parametrize("key", ALL)
def test_prior_scale_and_batch_independence(key):
    p = make_process(key)
    x = p.prior((4000, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # The sample standard deviation of 12000 normals is within 3% of the truth with overwhelming probability.
    assert abs(x.std().item() / p.prior_std - 1) < 0.03
    small = p.prior((3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(small, x[:3], rtol=0, atol=0)


def test_prior_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        ds.EDM().prior((0, 2))
