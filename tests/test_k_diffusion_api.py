"""``ds.k_diffusion``: k-diffusion's functional interface over our solvers, against k-diffusion itself.

The model is the exact Gaussian-mixture denoiser as a k-diffusion denoiser ``D(x, sigma, **extra_args)``
in EDM scale. Stochastic samplers get the same noise through one ``noise_sampler`` (a fresh copy of a
seeded stream for each side: both ask in the same order). Everything runs in float64, where the two
agree to round-off (measured below 1e-13 relative; dpm_adaptive's controller decisions below 1e-9).
"""

import inspect

import pytest
import torch

import diffsampler as ds

peers = pytest.importorskip("diffsampler.bench.peers")
try:
    KS = peers.kdiffusion_sampling()
except ImportError:  # pragma: no cover - the dev install provides it
    pytest.skip("k-diffusion is not installed", allow_module_level=True)

GMM = ds.testbeds.GaussianMixture([[2.0, 0.0], [-1.5, 1.5], [0.0, -2.0]], [0.3, 0.2, 0.4], labels=[0, 1, 1])
BASE = GMM.denoiser(ds.EDM(0.002, 80.0), "eps")
LABEL = torch.tensor([0, 1, 0, 1, 1])


pytestmark = pytest.mark.usefixtures("one_thread")


def D(x, sigma, label=None):
    """A k-diffusion denoiser: one sigma per sample, returns the data estimate."""
    cond = {} if label is None else {"label": label}
    return BASE(x, sigma.to(torch.float64), **cond).x0


def noise_stream(seed=7):
    """Draws in order from one seeded stream, scaled by a smooth function of the interval asked for, so
    that both the order of the requests and their arguments must match."""
    g = torch.Generator().manual_seed(seed)

    def sampler(sigma, sigma_next):
        scale = 1.0 + 0.1 * torch.tanh(torch.as_tensor(sigma - sigma_next, dtype=torch.float64))
        return torch.randn((len(LABEL), 2), generator=g, dtype=torch.float64) * scale
    return sampler


def _float64(fn):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return fn()
    finally:
        torch.set_default_dtype(default)


def _start():
    return torch.randn((len(LABEL), 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


KD_CASES = [
    ("euler", {}), ("heun", {}), ("dpm_2", {}), ("lms", {}), ("lms", {"order": 2}), ("dpmpp_2m", {}),
    ("euler_ancestral", {}), ("euler_ancestral", {"eta": 0.5}), ("dpm_2_ancestral", {}),
    ("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.0}), ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7}), ("dpmpp_3m_sde", {}), ("dpmpp_sde", {}),
    ("dpmpp_sde", {"eta": 0.5}),
]


@pytest.mark.parametrize("name, options", KD_CASES, ids=[f"{n}-{o}" for n, o in KD_CASES])
def test_the_same_call_gives_kdiffusions_result(name, options):
    _same_call(name, options, _float64(lambda: KS.get_sigmas_karras(10, 0.002, 80.0)))


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "lms", "heun"])
def test_the_same_call_on_a_schedule_that_stops_short_of_zero(name):
    """(Where the last step does not denoise, a lower-order final step would show: k-diffusion has none.)"""
    _same_call(name, {}, _float64(lambda: KS.get_sigmas_karras(8, 0.05, 80.0))[:-1])


def _same_call(name, options, sigmas):
    x = _start()
    stochastic = "noise_sampler" in inspect.signature(getattr(KS, f"sample_{name}")).parameters
    extra = {"noise_sampler": noise_stream()} if stochastic else {}
    theirs = _float64(lambda: getattr(KS, f"sample_{name}")(D, x, sigmas, extra_args={"label": LABEL},
                                                           disable=True, **options, **extra))
    extra = {"noise_sampler": noise_stream()} if stochastic else {}
    ours = getattr(ds.k_diffusion, f"sample_{name}")(D, x, sigmas, extra_args={"label": LABEL}, disable=True,
                                                     **options, **extra)
    assert rel(ours, theirs) < 1e-12


def test_dpm_fast_and_dpm_adaptive_keep_kdiffusions_signatures():
    x = _start()
    theirs = _float64(lambda: KS.sample_dpm_fast(D, x, 0.03, 80.0, 9, disable=True))
    ours = ds.k_diffusion.sample_dpm_fast(D, x, 0.03, 80.0, 9, disable=True)
    assert rel(ours, theirs) < 1e-12
    # k-diffusion controls one step size for the batch, we one per sample: compare sample by sample
    row = x[:1]
    theirs, info = _float64(lambda: KS.sample_dpm_adaptive(D, row, 0.05, 80.0, rtol=0.01, disable=True,
                                                           return_info=True))
    ours, mine = ds.k_diffusion.sample_dpm_adaptive(D, row, 0.05, 80.0, rtol=0.01, disable=True, return_info=True)
    assert rel(ours, theirs) < 1e-9 and mine["nfe"] == info["nfe"]
    with pytest.raises(ValueError, match="eta > 0"):
        ds.k_diffusion.sample_dpm_fast(D, x, 0.03, 80.0, 9, eta=1.0)


def test_callback_sees_kdiffusions_dict():
    sigmas = _float64(lambda: KS.get_sigmas_karras(6, 0.002, 80.0))
    x = _start()
    seen = {"theirs": [], "ours": []}
    _float64(lambda: KS.sample_heun(D, x, sigmas, disable=True, callback=seen["theirs"].append))
    ds.k_diffusion.sample_heun(D, x, sigmas, disable=True, callback=seen["ours"].append)
    assert len(seen["ours"]) == len(seen["theirs"]) == 6
    for a, b in zip(seen["ours"], seen["theirs"]):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"]) == float(a["sigma_hat"])
        assert rel(a["x"], b["x"]) < 1e-12 and rel(a["denoised"], b["denoised"]) < 1e-12


def test_float32_schedules_and_samples_are_accepted():
    sigmas = KS.get_sigmas_karras(10, 0.002, 80.0)  # float32, ends 0.0019999996
    assert sigmas.dtype == torch.float32
    x = _start().float()
    theirs = KS.sample_dpmpp_2m(lambda y, s: D(y.double(), s).float(), x, sigmas, disable=True)
    ours = ds.k_diffusion.sample_dpmpp_2m(lambda y, s: D(y.double(), s).float(), x, sigmas, disable=True)
    assert ours.dtype == torch.float32 and rel(ours, theirs) < 1e-5


def test_every_registered_solver_and_alias_has_a_function():
    for name in ds.solvers.names() + list(ds.solvers.ALIASES):
        fn = getattr(ds.k_diffusion, f"sample_{name}")
        assert fn.__name__ == f"sample_{name}" and f"sample_{name}" in ds.k_diffusion.__all__
    sigmas = _float64(lambda: KS.get_sigmas_karras(4, 0.002, 80.0))
    out = ds.k_diffusion.sample_uni_pc(D, _start(), sigmas, disable=True)
    assert torch.equal(out, ds.k_diffusion.sample_unipc(D, _start(), sigmas, disable=True, solver_order=3,
                                                        variant="bh1"))


def test_flow_denoisers_are_selectable():
    """ComfyUI's CONST denoisers: x = (1 - sigma) x0 + sigma eps; k-diffusion's Euler integrates them in
    (x, sigma) as ours does on a flow."""
    flow = GMM.denoiser(ds.Flow(), "velocity")

    def D_flow(x, sigma):
        return flow(x, sigma.to(torch.float64)).x0

    sigmas = torch.linspace(1.0, 0.0, 9, dtype=torch.float64)
    x = torch.randn((4, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs = KS.sample_euler(D_flow, x, sigmas, disable=True)
    ours = ds.k_diffusion.sample_euler(D_flow, x, sigmas, disable=True, model_type="flow")
    assert rel(ours, theirs) < 1e-12
    assert rel(ours, ds.sample(flow, x, ds.grids.explicit(ds.Flow(), sigmas), "euler")) < 1e-12
    with pytest.raises(ValueError, match="at most 1"):
        ds.k_diffusion.sample_euler(D_flow, x, sigmas * 2, model_type="flow")


def test_bad_calls_get_clear_errors():
    sigmas = _float64(lambda: KS.get_sigmas_karras(4, 0.002, 80.0))
    x = _start()
    with pytest.raises(ValueError, match="no option"):
        ds.k_diffusion.sample_euler(D, x, sigmas, order=3)
    with pytest.raises(ValueError, match="model_type must be one of"):
        ds.k_diffusion.sample_euler(D, x, sigmas, model_type="vp")
    with pytest.raises(ValueError, match="strictly decreasing"):
        ds.k_diffusion.sample_euler(D, x, sigmas.flip(0))
    with pytest.raises(TypeError, match="k-diffusion denoiser"):
        ds.k_diffusion.sample_euler(None, x, sigmas)
    with pytest.raises(ValueError, match="r = 0.3 is not implemented"):
        ds.k_diffusion.sample_dpmpp_sde(D, x, sigmas, r=0.3)
    assert ds.k_diffusion.sample_euler(D, x, sigmas[:1]) is x  # no step to take
