
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffsampler as ds
from conftest import PROCESSES, make_process

BUILDERS = ["uniform", "logsnr", "karras", "quadratic"]


def _build(name, p, steps, **kw):
    # (logsnr from t = 1 of a flow, where lambda = -inf, spaces its knots from an inner bound)
    return ds.grids.get(name, p, steps, **kw)


@given(key=st.sampled_from(list(PROCESSES)), name=st.sampled_from(BUILDERS),
       steps=st.integers(1, 300), end=st.sampled_from(["zero", "min"]))
@settings(max_examples=150, deadline=None)
def test_grid_properties(key, name, steps, end):
    p = make_process(key)
    g = _build(name, p, steps, end=end)
    if g is None:
        return
    assert g.dtype == torch.float64 and g.ndim == 1 and g.numel() == steps + 1
    assert bool((g[1:] < g[:-1]).all()), g
    assert g[0].item() == p.t_max
    if end == "zero":
        assert g[-1].item() == 0.0
        assert bool((g[:-1] >= p.t_min).all())
        if steps > 1:
            assert g[-2].item() == p.t_min
    else:
        assert g[-1].item() == p.t_min


@given(t_lo=st.floats(0.05, 0.4), t_hi=st.floats(0.5, 0.95), steps=st.integers(2, 50))
@settings(max_examples=50, deadline=None)
def test_spacings_are_uniform_in_their_variable(t_lo, t_hi, steps):
    p = ds.VP.cosine()
    g = ds.grids.logsnr(p, steps, end="min", t_min=t_lo, t_max=t_hi)
    d = torch.diff(p.lambda_(g))
    torch.testing.assert_close(d, d[:1].expand_as(d), rtol=1e-8, atol=1e-10)
    g = ds.grids.karras(p, steps, rho=7.0, end="min", t_min=t_lo, t_max=t_hi)
    d = torch.diff(p.ode_sigma(g) ** (1 / 7))
    torch.testing.assert_close(d, d[:1].expand_as(d), rtol=1e-8, atol=1e-10)
    g = ds.grids.quadratic(p, steps, end="min", t_min=t_lo, t_max=t_hi)
    d = torch.diff(g.sqrt())
    torch.testing.assert_close(d, d[:1].expand_as(d), rtol=1e-8, atol=1e-10)


def test_karras_on_edm_matches_the_paper_formula():
    n, rho, smin, smax = 10, 7.0, 0.002, 80.0
    g = ds.grids.karras(ds.EDM(), n)
    i = torch.arange(n, dtype=torch.float64)
    expected = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    torch.testing.assert_close(g[:-1], expected, rtol=1e-12, atol=0)
    assert g[-1] == 0


def test_explicit_grid_and_slicing():
    p = ds.EDM()
    g = ds.grids.explicit(p, [80.0, 10.0, 1.0, 0.0])
    assert g.tolist() == [80.0, 10.0, 1.0, 0.0]
    assert ds.grids.validate(p, g[1:]).tolist() == [10.0, 1.0, 0.0]


@pytest.mark.parametrize("grid, message", [
    ([80.0, 10.0, 10.0, 0.0], r"strictly decreasing; grid\[1\] = 10.0 is followed by grid\[2\] = 10.0"),
    ([1.0, 10.0], "strictly decreasing"),
    ([100.0, 1.0], r"must lie in \[0.002, 80.0\]"),
    ([10.0, 0.001], r"must lie in"),
    ([5.0], "at least 2 times"),
    ([[5.0, 1.0]], "1-D"),
    ([5.0, float("nan")], "non-finite"),
    ("abc", "grid must be"),
])
def test_invalid_grids_are_rejected(grid, message):
    with pytest.raises(ValueError, match=message):
        ds.grids.validate(ds.EDM(), grid)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_steps_must_be_a_positive_integer(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        ds.grids.karras(ds.EDM(), steps)


def test_unknown_grid_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid grids: dpm_fast, karras, logsnr, quadratic, uniform"):
        ds.grids.get("linear", ds.EDM(), 5)


def test_bad_range_and_options():
    with pytest.raises(ValueError, match="t_min < t_max"):
        ds.grids.uniform(ds.EDM(), 5, t_min=10.0, t_max=5.0)
    with pytest.raises(ValueError, match="end must be one of"):
        ds.grids.uniform(ds.EDM(), 5, end="last")
    with pytest.raises(ValueError, match="rho must be > 0"):
        ds.grids.karras(ds.EDM(), 5, rho=0)


def test_shift_is_the_sd3_time_shift_and_matches_diffusers():
    p = ds.Flow()
    g = ds.grids.shift(p, ds.grids.uniform(p, 8), 3.0)
    base = ds.grids.uniform(p, 8)
    torch.testing.assert_close(g, 3 * base / (1 + 2 * base))
    assert g[0] == 1.0 and g[-1] == 0.0
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    t_min = 3 * 0.001 / (1 + 2 * 0.001)
    ours = ds.grids.shift(ds.Flow(t_min=t_min), ds.grids.uniform(ds.Flow(t_min=t_min), 8), 3.0)
    torch.testing.assert_close(ours, sched.sigmas.to(torch.float64), rtol=1e-6, atol=1e-7)


def test_shift_rejects_what_it_cannot_shift():
    with pytest.raises(ValueError, match="only flows"):
        ds.grids.shift(ds.EDM(), ds.grids.karras(ds.EDM(), 4), 2.0)
    with pytest.raises(ValueError, match="factor must be a finite number > 0"):
        ds.grids.shift(ds.Flow(), ds.grids.uniform(ds.Flow(), 4), 0.0)
    with pytest.raises(ValueError, match="must lie in"):  # a shift below 1 pushes t_min out of range
        ds.grids.shift(ds.Flow(), ds.grids.uniform(ds.Flow(), 4), 0.5)


@pytest.mark.parametrize("steps, groups", [(6, [3, 2, 1]), (7, [3, 3, 1]), (8, [3, 3, 2]), (1, [1])])
def test_dpm_fast_grid_groups_are_uniform_in_logsnr_and_cut_evenly(steps, groups):
    p = ds.VP.cosine()
    g = ds.grids.dpm_fast(p, steps)
    assert len(g) == steps + 1 and g[0].item() == p.t_max and g[-1].item() == p.t_min
    lam = p.lambda_(g).tolist()
    bounds = [0]
    for k in groups:
        bounds.append(bounds[-1] + k)
    width = (lam[-1] - lam[0]) / len(groups)
    for (a, b), k in zip(zip(bounds[:-1], bounds[1:]), groups):
        assert lam[b] - lam[a] == pytest.approx(width, rel=1e-9)
        for j in range(a, b):
            assert lam[j + 1] - lam[j] == pytest.approx(width / k, rel=1e-9)


def test_what_k_diffusion_and_numpy_users_pass_is_accepted():
    """float32-rounded ends (k-diffusion's get_sigmas_karras(n, 0.002, 80) ends at 0.0019999996) are
    clamped onto the process's range; numpy integers are step counts; beyond rounding is still refused."""
    import numpy as np
    e = ds.EDM()
    g = ds.grids.validate(e, torch.tensor([80.0, 10.0, 0.0019999996, 0.0], dtype=torch.float32))
    assert g[2].item() == e.t_min and g.dtype == torch.float64
    with pytest.raises(ValueError, match="must lie in"):
        ds.grids.validate(e, [80.0, 10.0, 0.00199, 0.0])
    assert torch.equal(ds.grids.karras(e, np.int64(5)), ds.grids.karras(e, 5))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        ds.grids.karras(e, 5.0)


def test_logsnr_on_a_flow_starts_at_pure_noise_with_an_inner_bound():
    f = ds.Flow()
    g = ds.grids.logsnr(f, 8)
    assert g[0].item() == f.t_max and g[-2].item() == f.t_min and g[-1].item() == 0.0
    lam = f.lambda_(g[1:-1])
    steps = lam[1:] - lam[:-1]
    torch.testing.assert_close(steps, steps[0].expand_as(steps))  # uniform in log-SNR below the first knot
    torch.testing.assert_close(lam[0], -f.lambda_(torch.tensor(f.t_min, dtype=torch.float64)) + steps[0])


def test_a_meta_device_sample_gets_a_clear_error():
    p = ds.VP.scaled_linear()
    model = ds.testbeds.ring8().denoiser(p, "eps")
    with pytest.raises(ValueError, match="'meta' device"):
        ds.sample(model, torch.empty(2, 2, device="meta"), ds.grids.karras(p, 4), "euler")
