
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
    with pytest.raises(ValueError, match="valid grids: " + ", ".join(ds.grids.names()) + "$"):
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


# -- the schedules of ComfyUI and k-diffusion --------------------------------------------------------
# Each reference is a float64 transcription of ComfyUI's function (comfy/samplers.py; comfy/k_diffusion/
# sampling.py; comfy_extras/nodes_align_your_steps.py) over ComfyUI's own table of a model's noise levels
# (``model_sampling``), built from the process's definition, not from diffsampler's grid code; the
# k-diffusion functions are the installed package's own. Our grids' noise levels ode_sigma(t) agree
# with theirs to float64 round-off (measured at most 3.3e-13 relative).

import math as _math

import numpy as _np

from diffsampler.process import EDM as _EDM, VPDiscrete as _VPDiscrete

COMFY_PROCESSES = {"vp": ds.VP.scaled_linear, "vp_linear": ds.VP.linear_discrete, "edm": ds.EDM, "flow": ds.Flow}


class _ComfySampling:
    """ComfyUI's model_sampling of a model of the process's kind (ModelSamplingDiscrete, ModelSamplingContinuousEDM,
    ModelSamplingDiscreteFlow with shift 1), in float64."""

    def __init__(self, p):
        if isinstance(p, _VPDiscrete):
            self.kind, ac = "discrete", p.alphas_cumprod
            self.sigmas = ((1 - ac) / ac) ** 0.5
        elif isinstance(p, _EDM):
            self.kind = "edm"
            self.sigmas = torch.linspace(_math.log(p.t_min), _math.log(p.t_max), 1000, dtype=torch.float64).exp()
        else:
            self.kind = "flow"
            self.sigmas = torch.arange(1, 1001, dtype=torch.float64) / 1000
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        if self.kind == "discrete":
            return (sigma.log() - self.log_sigmas).abs().argmin().to(torch.float64)
        return 0.25 * sigma.log() if self.kind == "edm" else sigma * 1000

    def sigma(self, ts):
        if self.kind == "discrete":
            t = ts.clamp(0, len(self.sigmas) - 1)
            lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
            return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()
        return (ts / 0.25).exp() if self.kind == "edm" else ts / 1000


def comfy_simple(ms, steps):
    ss = len(ms.sigmas) / steps
    return [float(ms.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]


def comfy_ddim(ms, steps):
    sigs, x = [0.0], 1
    ss = max(len(ms.sigmas) // steps, 1)
    while x < len(ms.sigmas):
        sigs.append(float(ms.sigmas[x]))
        x += ss
    return sigs[::-1]


def comfy_normal(ms, steps, sgm=False):
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    if sgm:
        ts = torch.linspace(float(start), float(end), steps + 1, dtype=torch.float64)[:-1]
    else:
        ts = torch.linspace(float(start), float(end), steps, dtype=torch.float64)
    return [float(ms.sigma(t)) for t in ts] + [0.0]


def comfy_beta(ms, steps, alpha=0.6, beta=0.6):
    import scipy.stats
    total = len(ms.sigmas) - 1
    ts = _np.rint(scipy.stats.beta.ppf(1 - _np.linspace(0, 1, steps, endpoint=False), alpha, beta) * total)
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(float(ms.sigmas[int(t)]))
        last = t
    return sigs + [0.0]


def comfy_linear_quadratic(ms, steps, threshold_noise=0.025, linear_steps=None):
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        quad_steps = steps - linear_steps
        qc = diff / (linear_steps * quad_steps ** 2)
        lc = threshold_noise / linear_steps - 2 * diff / (quad_steps ** 2)
        const = qc * linear_steps ** 2
        schedule = [1.0 - x for x in lin + [qc * i ** 2 + lc * i + const for i in range(linear_steps, steps)] + [1.0]]
    return [v * float(ms.sigma_max) for v in schedule]


def comfy_kl_optimal(n, sigma_min, sigma_max):
    idx = torch.arange(n, dtype=torch.float64) / (n - 1)
    return (idx * _math.atan(sigma_min) + (1 - idx) * _math.atan(sigma_max)).tan().tolist() + [0.0]


def comfy_laplace(n, sigma_min, sigma_max, mu=0.0, beta=0.5):
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    lmb = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
    return torch.clamp(torch.exp(lmb), min=sigma_min, max=sigma_max).tolist()


def comfy_ays(levels, steps):
    sigmas = list(levels)
    if steps + 1 != len(sigmas):
        xs = _np.linspace(0, 1, len(sigmas))
        ys = _np.log(sigmas[::-1])
        sigmas = _np.exp(_np.interp(_np.linspace(0, 1, steps + 1), xs, ys))[::-1].copy()
    sigmas = list(sigmas[-(steps + 1):])
    sigmas[-1] = 0.0
    return [float(v) for v in sigmas]


def _levels_of(p, grid):
    return [float(p.ode_sigma(float(t))) if float(t) > 0 else 0.0 for t in grid]


def _assert_levels(p, grid, theirs, tol=1e-12):
    ours = _levels_of(p, grid)
    assert len(ours) == len(theirs), (ours, theirs)
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= tol * max(abs(b), 1e-300), (ours, theirs)


COMFY_TABLE_SCHEDULERS = {
    "simple": comfy_simple, "ddim_uniform": comfy_ddim, "normal": comfy_normal,
    "sgm_uniform": lambda ms, n: comfy_normal(ms, n, sgm=True), "beta": comfy_beta,
    "linear_quadratic": comfy_linear_quadratic,
}


@pytest.mark.parametrize("steps", [2, 7, 10, 33])
@pytest.mark.parametrize("name", list(COMFY_TABLE_SCHEDULERS))
@pytest.mark.parametrize("key", list(COMFY_PROCESSES))
def test_comfyui_schedulers_give_comfyuis_noise_levels(key, name, steps):
    p = COMFY_PROCESSES[key]()
    theirs = COMFY_TABLE_SCHEDULERS[name](_ComfySampling(p), steps)
    _assert_levels(p, ds.grids.get(name, p, steps), theirs)


@pytest.mark.parametrize("steps", [2, 7, 10, 33])
@pytest.mark.parametrize("key", list(COMFY_PROCESSES))
def test_kdiffusion_schedules_give_kdiffusions_noise_levels(key, steps):
    """get_sigmas_exponential / polyexponential / karras of the installed k-diffusion (in float64), and
    kl_optimal and laplace as ComfyUI writes them, from the process's sigma_min and sigma_max."""
    peers = pytest.importorskip("diffsampler.bench.peers")
    try:
        ks = peers.kdiffusion_sampling()
    except ImportError:  # pragma: no cover
        pytest.skip("k-diffusion is not installed")
    p = COMFY_PROCESSES[key]()
    lo, hi = float(p.ode_sigma(p.t_min)), float(p.ode_sigma(p.t_max))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _assert_levels(p, ds.grids.exponential(p, steps), ks.get_sigmas_exponential(steps, lo, hi).tolist())
        for rho in (0.5, 1.0, 2.5):
            _assert_levels(p, ds.grids.polyexponential(p, steps, rho),
                           ks.get_sigmas_polyexponential(steps, lo, hi, rho).tolist())
        _assert_levels(p, ds.grids.karras(p, steps), ks.get_sigmas_karras(steps, lo, hi).tolist())
    finally:
        torch.set_default_dtype(default)
    _assert_levels(p, ds.grids.kl_optimal(p, steps), comfy_kl_optimal(steps, lo, hi))
    once = lambda v: [s for k, s in enumerate(v) if k == 0 or s != v[k - 1]]  # noqa: E731 (clamped levels kept once)
    _assert_levels(p, ds.grids.laplace(p, steps, end="min"), once(comfy_laplace(steps + 1, lo, hi)))
    _assert_levels(p, ds.grids.laplace(p, steps), once(comfy_laplace(steps, lo, hi)) + [0.0])


@pytest.mark.parametrize("steps", [3, 10, 25])
def test_vp_schedule_is_kdiffusions_and_uniform_on_vp_linear(steps):
    peers = pytest.importorskip("diffsampler.bench.peers")
    try:
        ks = peers.kdiffusion_sampling()
    except ImportError:  # pragma: no cover
        pytest.skip("k-diffusion is not installed")
    p = ds.VP.linear()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs = ks.get_sigmas_vp(steps).tolist()
    finally:
        torch.set_default_dtype(default)
    _assert_levels(p, ds.grids.vp(p, steps), theirs, tol=1e-11)
    torch.testing.assert_close(ds.grids.vp(p, steps), ds.grids.uniform(p, steps), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="outside"):
        ds.grids.vp(ds.VP.scaled_linear(), steps)  # sigma 152 at t = 1 is beyond Stable Diffusion's 14.6


@pytest.mark.parametrize("steps", [4, 10, 11, 30])
@pytest.mark.parametrize("model, process", [("SD1", ds.VP.scaled_linear), ("SDXL", ds.VP.scaled_linear),
                                            ("SVD", lambda: ds.EDM(0.002, 700.0))])
def test_ays_is_comfyuis_log_linear_interpolation_of_the_published_levels(model, process, steps):
    p = process()
    _assert_levels(p, ds.grids.ays(p, steps, model), comfy_ays(ds.grids.AYS_NOISE_LEVELS[model], steps), tol=1e-11)


@pytest.mark.parametrize("model, theirs, tol", [("SD1", "StableDiffusionSigmas", 4e-3),
                                                ("SDXL", "StableDiffusionXLSigmas", 2e-2),
                                                ("SVD", "StableDiffusionVideoSigmas", 1e-9)])
def test_ays_tables_agree_with_diffusers_to_its_rounding(model, theirs, tol):
    # diffusers keeps the 10-step tables to three decimals (its last level is 0, ours the published
    # sigma_min, which the grid replaces by 0 as both do): SVD's is ours exactly, SD1's within 0.32%
    # (0.399 against 0.3977, a little more than rounding), and its SDXL table differs from the paper's and
    # ComfyUI's (ours) by up to 1.4% (0.113 / 1.342 / 3.771 against 0.1114 / 1.3405 / 3.7682).
    tables = pytest.importorskip("diffusers.schedulers.scheduling_utils").AysSchedules
    diffusers_levels = torch.tensor(tables[theirs][:-1], dtype=torch.float64)
    ours = torch.tensor(ds.grids.AYS_NOISE_LEVELS[model][:-1], dtype=torch.float64)
    relative = ((ours - diffusers_levels).abs() / ours).max().item()
    assert relative < tol
    if model == "SDXL":
        assert relative > 5e-3  # the difference is real, not rounding


def test_comfyui_names_relate_to_ours_as_documented():
    p = ds.VP.scaled_linear()
    for n in (5, 10, 40):
        # exponential is logsnr on VP and EDM; normal is uniform on flows, logsnr on EDM, and uniform
        # on a discrete VP up to the interpolation of noise levels between training timesteps
        for q in (p, ds.EDM()):
            torch.testing.assert_close(ds.grids.exponential(q, n), ds.grids.logsnr(q, n), rtol=1e-12, atol=0)
        torch.testing.assert_close(ds.grids.normal(ds.Flow(), n), ds.grids.uniform(ds.Flow(), n), rtol=1e-14, atol=0)
        torch.testing.assert_close(ds.grids.normal(ds.EDM(), n), ds.grids.logsnr(ds.EDM(), n), rtol=1e-12, atol=0)
        a, b = ds.grids.normal(p, n), ds.grids.uniform(p, n)
        sa, sb = p.ode_sigma(a[:-1]), p.ode_sigma(b[:-1])
        assert ((sa - sb).abs() / sb).max() < 4e-4
    assert set(ds.grids.names()) >= {"simple", "sgm_uniform", "ddim_uniform", "beta", "kl_optimal", "linear_quadratic",
                                     "exponential", "normal", "polyexponential", "vp", "laplace", "ays", "karras"}


def test_comfyui_schedulers_reject_bad_options():
    p = ds.VP.scaled_linear()
    for call, match in ((lambda: ds.grids.ays(p, 10, "SD3"), "model must be one of"),
                        (lambda: ds.grids.ays(ds.Flow(), 10), "outside"),
                        (lambda: ds.grids.beta(p, 10, alpha=0), "alpha must be"),
                        (lambda: ds.grids.polyexponential(p, 10, rho=-1), "rho must be"),
                        (lambda: ds.grids.laplace(p, 10, beta=0), "beta must be"),
                        (lambda: ds.grids.linear_quadratic(p, 10, linear_steps=10), "linear_steps must be"),
                        (lambda: ds.grids.simple(p, 0), "steps must be")):
        with pytest.raises(ValueError, match=match):
            call()
