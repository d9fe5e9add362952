"""Agreement with the peers on the same model, grid and start point.

k-diffusion's samplers run in float64 and agree to float64 round-off; diffusers'
schedulers compute each step in float32 (they upcast/downcast the sample), so the
agreement there is to float32 round-off, well inside 1e-6 relative. The model is
the exact Gaussian-mixture denoiser on each peer's own (float32) schedule.
"""

import warnings

import pytest
import torch

import diffsampler as ds

pytest.importorskip("diffusers")
peers = pytest.importorskip("diffsampler.bench.peers")
try:
    peers.kdiffusion_sampling()
except ImportError:  # pragma: no cover - the dev install provides it
    pytest.skip("k-diffusion is not installed", allow_module_level=True)

GMM = ds.testbeds.random_mixture(2, 3, seed=1)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _start(p, n=16):
    return p.prior((n, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# -- k-diffusion ---------------------------------------------------------------

KD_PROCESSES = {"vp_scaled_linear": ds.VP.scaled_linear, "vp_cosine": ds.VP.cosine, "edm": ds.EDM, "flow": ds.Flow}
KD_SOLVERS = {"euler": "euler", "heun": "heun", "dpmpp_2m": ds.solvers.DPMpp2M(lower_order_final=False),
              "dpm_2": "dpm_2", "lms": "lms"}


@pytest.mark.parametrize("grid_name", ["karras", "uniform"])
@pytest.mark.parametrize("name", list(KD_SOLVERS))
@pytest.mark.parametrize("key", list(KD_PROCESSES))
def test_agrees_with_kdiffusion(key, name, grid_name):
    p = KD_PROCESSES[key]()
    if name == "dpmpp_2m" and key == "flow":
        pytest.skip("deliberate difference, see test_kdiffusion_dpmpp_2m_on_flows_uses_another_time_variable")
    model = GMM.denoiser(p, "velocity" if key == "flow" else "eps")
    x = _start(p)
    grid = ds.grids.get(grid_name, p, 12)
    ours = ds.sample(model, x, grid, KD_SOLVERS[name])
    theirs = peers.run_kdiffusion(name, model, x, grid)
    assert rel(theirs, ours) < 1e-12


@pytest.mark.parametrize("nfe", [6, 7, 8, 20])
@pytest.mark.parametrize("key", ["vp_scaled_linear", "vp_cosine", "edm"])
def test_dpm_fast_agrees_with_kdiffusion(key, nfe):
    """k-diffusion's sample_dpm_fast is DPM-Solver-3 singlestep in the paper's form on DPM-Solver's fast
    grid. It builds its grid in torch's default dtype (float32, which alone moves the result by ~1e-6);
    with float64 as the default the two agree to round-off."""
    p = KD_PROCESSES[key]()
    model = GMM.denoiser(p, "eps")
    x = _start(p)
    ours = ds.sample(model, x, ds.grids.dpm_fast(p, nfe), ds.solvers.DPMSolverSinglestep(3, "paper"))
    assert model.nfe == nfe
    sampling = peers.kdiffusion_sampling()
    sigma_min, sigma_max = float(p.ode_sigma(p.t_min)), float(p.ode_sigma(p.t_max))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs = sampling.sample_dpm_fast(peers.kdiffusion_denoiser(model), x / float(p.ode_scale(p.t_max)),
                                          sigma_min, sigma_max, nfe, disable=True)
    finally:
        torch.set_default_dtype(default)
    assert rel(theirs * float(p.ode_scale(p.t_min)), ours) < 1e-12


def test_kdiffusion_dpmpp_2m_on_flows_uses_another_time_variable():
    """Documented difference: k-diffusion's DPM-Solver++(2M) interpolates the data estimate in -log(sigma)
    of the coordinates it is given, which for a flow in (x, t) is -log(t), not the log-SNR. Both are
    second-order multistep methods (both measured here), exact for point-mass data; they are different
    methods, so the results differ beyond round-off. Ours is DPM-Solver++ as defined, in log-SNR, which
    is what ComfyUI also uses for flows."""
    import numpy as np
    p = ds.Flow()
    model = GMM.denoiser(p, "velocity")
    x = _start(p)
    errs = {"ours": [], "k-diffusion": []}
    steps = [16, 32, 64]
    for n in steps:
        grid = ds.grids.uniform(p, n, end="min")
        ref = GMM.ode_reference(p, x, grid[0], grid[-1])
        ours = ds.sample(model, x, grid, KD_SOLVERS["dpmpp_2m"])
        theirs = peers.run_kdiffusion("dpmpp_2m", model, x, grid)
        assert rel(theirs, ours) > 1e-6
        errs["ours"].append((ours - ref).norm().item())
        errs["k-diffusion"].append((theirs - ref).norm().item())
    for name, e in errs.items():
        assert abs(-np.polyfit(np.log(steps), np.log(e), 1)[0] - 2) < 0.3, (name, e)


STOCHASTIC_KD = [
    ("euler_ancestral", {}, ds.solvers.EulerAncestral()),
    ("euler_ancestral", {"eta": 0.5}, ds.solvers.EulerAncestral(eta=0.5)),
    ("dpmpp_2m_sde", {}, ds.solvers.DPMpp2MSDE(lower_order_final=False)),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7}, ds.solvers.DPMpp2MSDE(
        eta=0.7, solver_type="heun", lower_order_final=False)),
    ("dpmpp_3m_sde", {}, ds.solvers.DPMpp3MSDE(lower_order_final=False, legacy_third_order=True)),
    ("dpmpp_3m_sde", {"eta": 0.0}, ds.solvers.DPMpp3MSDE(eta=0.0, lower_order_final=False,
                                                         legacy_third_order=True)),
    ("dpm_2_ancestral", {}, ds.solvers.DPM2Ancestral()),
    ("dpm_2_ancestral", {"eta": 0.5}, ds.solvers.DPM2Ancestral(eta=0.5)),
    ("dpmpp_2s_ancestral", {}, ds.solvers.DPMpp2SAncestral()),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, ds.solvers.DPMpp2SAncestral(eta=0.0)),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, ds.solvers.get("dpmpp_2s")),
]


@pytest.mark.parametrize("name, options, ours", STOCHASTIC_KD,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o, _ in STOCHASTIC_KD])
@pytest.mark.parametrize("key", ["vp_scaled_linear", "edm"])
def test_agrees_with_kdiffusion_given_the_same_noise(key, name, options, ours):
    """k-diffusion's stochastic samplers take a noise_sampler: fed our per-step draws, they and we agree."""
    from diffsampler.noise import StepNoise

    p = KD_PROCESSES[key]()
    model = GMM.denoiser(p, "eps")
    x = _start(p)
    grid = ds.grids.karras(p, 12)
    mine = ds.sample(model, x, grid, ours, generator=torch.Generator().manual_seed(5))
    noise = StepNoise.from_generator(torch.Generator().manual_seed(5), x.shape, x.dtype, x.device)
    theirs = peers.run_kdiffusion(name, model, x, grid, noise=noise, **options)
    assert rel(theirs, mine) < 1e-12


@pytest.mark.parametrize("key", ["vp_scaled_linear", "edm"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_dpmpp_sde_agrees_with_kdiffusion_on_the_same_brownian_path(key, eta):
    """k-diffusion's sample_dpmpp_sde asks its noise sampler for increments over (sigma, sigma_mid) and
    (sigma, sigma_next); answered from our Brownian path, it and we agree to round-off."""
    from diffsampler.noise import BrownianNoise, sample_keys

    p = KD_PROCESSES[key]()
    model = GMM.denoiser(p, "eps")
    x = _start(p)
    grid = ds.grids.karras(p, 12)
    mine = ds.sample(model, x, grid, ds.solvers.DPMppSDE(eta=eta), generator=torch.Generator().manual_seed(5))
    knots = ds.solvers.Knots.from_grid(p, grid)
    noise = BrownianNoise(sample_keys(len(x), torch.Generator().manual_seed(5)), x.shape, x.dtype, "cpu",
                          knots.s, 0.0, float(p.ode_sigma(p.t_max)))
    theirs = peers.run_kdiffusion("dpmpp_sde", model, x, grid, noise=noise, eta=eta)
    assert rel(theirs, mine) < 1e-11


def test_kdiffusion_3m_is_second_order_and_ours_third():
    """Documented difference: the third-order weight of DPM-Solver++(3M) (see expint.dpmpp_weights).
    With legacy_third_order we reproduce k-diffusion to round-off; with the exact weight the error falls
    faster (slopes over 16..128 steps, VP scaled_linear, log-SNR grid)."""
    import numpy as np
    p = ds.VP.scaled_linear()
    model = GMM.denoiser(p, "eps")
    x = _start(p, 32)
    steps, errs = [16, 32, 64, 128], {"ours": [], "k-diffusion": []}
    for n in steps:
        grid = ds.grids.logsnr(p, n, end="min")
        ref = GMM.ode_reference(p, x, grid[0], grid[-1])
        errs["ours"].append(rel(ds.sample(model, x, grid, ds.solvers.DPMpp3M(lower_order_final=False)), ref))
        errs["k-diffusion"].append(rel(peers.run_kdiffusion("dpmpp_3m_sde", model, x, grid, eta=0.0), ref))
    slope = {k: -np.polyfit(np.log(steps), np.log(v), 1)[0] for k, v in errs.items()}
    assert slope["ours"] > 2.5 and abs(slope["k-diffusion"] - 2) < 0.3, slope
    assert errs["ours"][-1] < errs["k-diffusion"][-1] / 3


# -- diffusers -------------------------------------------------------------------

def _diffusers(cls_name, **config):
    import diffusers
    return getattr(diffusers, cls_name)(**SD, **config)


DIFFUSERS_CASES = [
    ("DDIMScheduler", {"clip_sample": False}, "ddim"),
    ("EulerDiscreteScheduler", {}, "euler"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler"),
    ("HeunDiscreteScheduler", {}, "heun"),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, "heun"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
    ("DPMSolverMultistepScheduler", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, "dpmpp_2m"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, ds.solvers.DPMpp3M(legacy_third_order=True)),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
     "dpm_solver"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 3, "solver_type": "heun",
                                     "final_sigmas_type": "sigma_min"},
     ds.solvers.DPMSolver(solver_order=3, solver_type="heun", legacy_third_order=True)),
    ("DEISMultistepScheduler", {}, "deis"),
    ("DEISMultistepScheduler", {"solver_order": 1}, ds.solvers.DEIS(solver_order=1)),
    ("LMSDiscreteScheduler", {}, "lms"),
    ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, "lms"),
    ("KDPM2DiscreteScheduler", {}, "dpm_2"),
    ("UniPCMultistepScheduler", {}, "unipc"),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
     ds.solvers.UniPC(3, "bh1")),
    ("UniPCMultistepScheduler", {"solver_order": 1}, ds.solvers.UniPC(1)),
    ("UniPCMultistepScheduler", {"disable_corrector": list(range(100))}, ds.solvers.UniPC(corrector=False)),
    ("PNDMScheduler", {"skip_prk_steps": True}, "plms"),
    ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": True, "steps_offset": 1}, "plms"),
    ("DPMSolverSinglestepScheduler", {"lower_order_final": True}, "dpmpp_singlestep"),
    ("DPMSolverSinglestepScheduler", {"lower_order_final": True, "solver_order": 3, "solver_type": "heun"},
     ds.solvers.DPMppSinglestep(3, "heun")),
    ("DPMSolverSinglestepScheduler", {"lower_order_final": True, "solver_order": 3}, ds.solvers.DPMppSinglestep(3)),
    ("DPMSolverSinglestepScheduler", {"lower_order_final": True, "algorithm_type": "dpmsolver", "solver_order": 3,
                                      "final_sigmas_type": "sigma_min"}, "dpm_solver_singlestep"),
    ("DPMSolverSinglestepScheduler", {"lower_order_final": True, "algorithm_type": "dpmsolver", "solver_order": 2,
                                      "solver_type": "heun", "final_sigmas_type": "sigma_min"},
     ds.solvers.DPMSolverSinglestep(2, "heun")),
]


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("cls_name, config, ours", DIFFUSERS_CASES,
                         ids=[f"{c}-{'-'.join(f'{k}={str(v)[:12]}' for k, v in o.items())}"
                              for c, o, _ in DIFFUSERS_CASES])
def test_agrees_with_diffusers(cls_name, config, ours, steps):
    sched = _diffusers(cls_name, **config)
    p = peers.vp_process_of(sched)
    model = GMM.denoiser(p, "eps")
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theirs = peers.run_diffusers(sched, model, x, steps)
    solver = ours if not isinstance(ours, str) else ds.solvers.get(
        ours, **({"lower_order_final": config["lower_order_final"]} if "lower_order_final" in config else {}))
    mine = ds.sample(model, x, peers.diffusers_grid(sched, p), solver)
    assert rel(theirs, mine) < 1e-6


def test_diffusers_deis_3_loses_precision_in_float32_coefficients():
    """Documented difference: diffusers computes DEIS's third-order weights from a closed form in float32,
    where the difference of two nearly equal antiderivatives cancels (relative error ~1e-4 at 30 steps).
    The same closed form in float64 equals our quadrature to 1e-12; at 7 steps the two runs agree to
    1e-6, at 30 the float32 loss shows."""
    import numpy as np
    from diffsampler.solvers.lms import log_lagrange_integrals

    def ind_fn(t, b, c, d):
        lt, lb, lc, ld = np.log(t), np.log(b), np.log(c), np.log(d)
        return t * (lc * (ld - lt + 1) - ld * lt + ld + lt ** 2 - 2 * lt + 2) / ((lb - lc) * (lb - ld))

    rt, r0, r1, r2 = 0.50, 0.55, 0.61, 0.67
    closed = [ind_fn(rt, r0, r1, r2) - ind_fn(r0, r0, r1, r2), ind_fn(rt, r1, r2, r0) - ind_fn(r0, r1, r2, r0),
              ind_fn(rt, r2, r0, r1) - ind_fn(r0, r2, r0, r1)]
    np.testing.assert_allclose(log_lagrange_integrals([r0, r1, r2], r0, rt), closed, rtol=1e-12)
    for steps, agree in ((7, True), (30, False)):
        sched = _diffusers("DEISMultistepScheduler", solver_order=3)
        p = peers.vp_process_of(sched)
        model = GMM.denoiser(p, "eps")
        x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        theirs = peers.run_diffusers(sched, model, x, steps)
        mine = ds.sample(model, x, peers.diffusers_grid(sched, p), ds.solvers.DEIS(solver_order=3))
        assert (rel(theirs, mine) < 1e-6) == agree


@pytest.mark.parametrize("cls_name, ours", [("FlowMatchEulerDiscreteScheduler", "euler"),
                                            ("FlowMatchHeunDiscreteScheduler", "heun")])
def test_agrees_with_diffusers_flow_matching_with_shift(cls_name, ours):
    import diffusers
    sched = getattr(diffusers, cls_name)(shift=3.0)
    t_min = 3 * 0.001 / (1 + 2 * 0.001)
    p = ds.Flow(t_min=t_min)
    model = GMM.denoiser(p, "velocity")
    x = p.prior((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theirs = peers.run_diffusers_flow(sched, model, x, 10)
    mine = ds.sample(model, x, ds.grids.shift(p, ds.grids.uniform(p, 10), 3.0), ours)
    assert rel(theirs, mine) < 1e-6


def test_diffusers_unipc_bh1_into_zero_is_nan():
    """Documented difference: diffusers' UniPC with solver_type="bh1" and its default final_sigmas_type="zero"
    returns NaN: on the last step B(h) = h is infinite and is multiplied by a zero correction. Ours takes
    the step into t = 0 as the data estimate and stays finite; with final_sigmas_type="sigma_min" the two
    agree (test_agrees_with_diffusers)."""
    sched = _diffusers("UniPCMultistepScheduler", solver_type="bh1")
    p = peers.vp_process_of(sched)
    model = GMM.denoiser(p, "eps")
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theirs = peers.run_diffusers(sched, model, x, 10)
    mine = ds.sample(model, x, peers.diffusers_grid(sched, p), ds.solvers.UniPC(variant="bh1"))
    assert bool(torch.isnan(theirs).all()) and bool(torch.isfinite(mine).all())


def test_diffusers_ddim_trailing_steps_to_the_wrong_timestep():
    """Documented difference (diffusers #12633): DDIMScheduler.step() targets ``t - 1000 // steps``, which
    is not the next timestep of its own "trailing" list unless 1000 is a multiple of the step count. At 20
    steps the lists agree and so do we; at 7 steps diffusers steps to 857 and then evaluates the network at
    856 as if the sample were there. We step between the timesteps actually listed."""
    for steps, agree in ((20, True), (7, False)):
        sched = _diffusers("DDIMScheduler", clip_sample=False, timestep_spacing="trailing")
        p = peers.vp_process_of(sched)
        model = GMM.denoiser(p, "eps")
        x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings(record=True) as caught:  # grid_from_scheduler names the quirk it meets
            warnings.simplefilter("always")
            theirs = peers.run_diffusers(sched, model, x, steps)
            grid = peers.diffusers_grid(sched, p)
        assert any("no grid reproduces that" in str(w.message) for w in caught) == (not agree)
        mine = ds.sample(model, x, grid, "ddim")
        assert (rel(theirs, mine) < 1e-6) == agree


def test_diffusers_dpmpp_karras_feeds_the_network_a_rounded_timestep():
    """Documented difference: with Karras sigmas, DPMSolverMultistepScheduler rounds the timesteps it gives
    the network to integers but steps with the unrounded sigmas, so model and update disagree about the
    noise level by up to half a training step. We evaluate and step at the same time, so the two results
    differ by far more than round-off (about 1e-3 relative here); the same configuration without Karras
    sigmas agrees to round-off (test_agrees_with_diffusers)."""
    sched = _diffusers("DPMSolverMultistepScheduler", use_karras_sigmas=True)
    p = peers.vp_process_of(sched)
    model = GMM.denoiser(p, "eps")
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    steps = 40
    theirs = peers.run_diffusers(sched, model, x, steps)
    sig = sched.sigmas.to(torch.float64)  # the noise levels the scheduler steps between, ending at 0
    grid = torch.tensor([min(max(float(p.t_of_ode_sigma(float(s))), p.t_min), 1.0) for s in sig[:-1]] + [0.0])
    mine = ds.sample(model, x, grid, "dpmpp_2m")
    assert rel(theirs, mine) > 1e-5


# -- ComfyUI (not installable: its samplers live in the application) --------------------------------
# Each reference below is our transcription of a ComfyUI sampling loop in k-diffusion's sigma
# coordinates, written independently of the solver it checks (different state, different algebra).

def _kd_model(model):
    return peers.kdiffusion_denoiser(model)


def _comfy_heunpp2(D, x, sigmas, churn, draws, s_tmin=0.0, s_tmax=float("inf")):
    s_end, n = sigmas[-1], len(sigmas) - 1
    for i in range(n):
        gamma = min(churn / n, 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + draws(i) * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        d = (x - D(x, sigma_hat)) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = (x_2 - D(x_2, sigmas[i + 1])) / sigmas[i + 1]
        if sigmas[i + 2] == s_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
            continue
        x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
        d_3 = (x_3 - D(x_3, sigmas[i + 2])) / sigmas[i + 2]
        w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
        x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


@pytest.mark.parametrize("churn", [0.0, 20.0])
@pytest.mark.parametrize("key", ["vp_scaled_linear", "edm"])
def test_heunpp2_is_comfyuis_loop(key, churn):
    """(Churn only below the grid's first noise level: ours never raises the noise past the process's t_max.)"""
    from diffsampler.noise import StepNoise

    p = KD_PROCESSES[key]()
    model = GMM.denoiser(p, "eps")
    x = _start(p)
    grid = ds.grids.karras(p, 10)
    mine = ds.sample(model, x, grid, ds.solvers.HeunPP2(s_churn=churn, s_tmin=0.5, s_tmax=10.0),
                     generator=torch.Generator().manual_seed(5))
    noise = StepNoise.from_generator(torch.Generator().manual_seed(5), x.shape, x.dtype, x.device)
    sigmas = [float(p.ode_sigma(float(t))) for t in grid]
    D = _kd_model(model)
    sig = lambda s: torch.full((len(x),), s, dtype=x.dtype)  # noqa: E731
    y = _comfy_heunpp2(lambda y, s: D(y, sig(s)), x / float(p.ode_scale(float(grid[0]))), sigmas, churn,
                       noise.draw, s_tmin=0.5, s_tmax=10.0)
    assert rel(y, mine) < 1e-12


SA_CASES = [
    ({}, ds.solvers.SASolver(2, 2, simple_order_2=True)),
    ({"tau_func": lambda t: 0}, ds.solvers.SASolver(2, 2, eta=0.0, simple_order_2=True)),
    ({"tau_func": lambda t: 1}, ds.solvers.SASolver(2, 2, tau_window=(0.0, 1.0), simple_order_2=True)),
    ({"predictor_order": 3, "corrector_order": 3}, ds.solvers.SASolver(3, 3, simple_order_2=True)),
    ({"predictor_order": 1, "corrector_order": 1}, ds.solvers.SASolver(1, 1)),
    ({"predictor_order": 3, "corrector_order": 1, "tau_func": lambda t: 0},
     ds.solvers.SASolver(3, 1, eta=0.0, simple_order_2=True)),
]


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("config, ours", SA_CASES, ids=[str(i) for i in range(len(SA_CASES))])
def test_sa_solver_agrees_with_diffusers_given_the_same_noise(config, ours, steps):
    """diffusers' SASolverScheduler draws its noise with randn_tensor once per step; fed our per-step
    draws, it and we agree. Its window ``200 <= timestep <= 800`` is ours at t = (timestep + 1) / 1000.
    diffusers takes the paper's simplified weights at every order-2 step, warm-up included: ours with
    ``simple_order_2``. (Order 4 agrees to 3e-6 at 20 steps: diffusers' closed-form weights in float32.)"""
    from diffsampler.noise import StepNoise

    sched = _diffusers("SASolverScheduler", **config)
    p = peers.vp_process_of(sched)
    model = GMM.denoiser(p, "eps")
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if "tau_func" not in config:  # the same window in process time
        sched.tau_func = lambda ts: 1 if 0.2 <= (float(ts) + 1) / 1000 <= 0.8 else 0
    noise = StepNoise.from_generator(torch.Generator().manual_seed(5), x.shape, x.dtype, x.device)
    theirs = _run_diffusers_with_our_noise("scheduling_sasolver", sched, model, x, steps, noise)
    mine = ds.sample(model, x, peers.diffusers_grid(sched, p), ours, generator=torch.Generator().manual_seed(5))
    assert rel(theirs, mine) < (1e-6 if max(ours.predictor_order, ours.corrector_order) <= 2 else 2e-6)


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_pndm_agrees_with_diffusers_runge_kutta_start(steps, set_alpha_to_one):
    """diffusers' PNDMScheduler with its default pseudo Runge-Kutta start (F-PNDM): 12 evaluations over the
    first three intervals, then fourth-order PLMS. Its half steps are ``num_train_timesteps // steps // 2``
    timesteps, the midpoint in time of its evenly spaced ("leading") timesteps at these step counts.
    Without ``set_alpha_to_one`` its last step goes from timestep 0 to timestep 0 (a step of length zero
    after one more network call), which a strictly decreasing grid leaves out."""
    sched = _diffusers("PNDMScheduler", set_alpha_to_one=set_alpha_to_one)
    p = peers.vp_process_of(sched)
    model = GMM.denoiser(p, "eps")
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theirs = peers.run_diffusers(sched, model, x, steps)
    knots = [float(p.t_of_timestep(float(ts))) for ts in sched._timesteps[::-1]]
    grid = torch.tensor(knots + [0.0] if set_alpha_to_one else knots, dtype=torch.float64)
    counted = GMM.denoiser(p, "eps")
    mine = ds.sample(counted, x, grid, "pndm")
    assert counted.nfe == ds.solvers.PNDM.run_nfe(len(grid) - 1) == len(sched.timesteps) - (not set_alpha_to_one)
    assert rel(theirs, mine) < 1e-6


@pytest.mark.parametrize("order, rtol", [(3, 0.05), (2, 0.05), (3, 0.001)])
@pytest.mark.parametrize("key", ["vp_scaled_linear", "vp_cosine", "edm"])
def test_dpm_adaptive_agrees_with_kdiffusion_sample_by_sample(key, order, rtol):
    """k-diffusion's sample_dpm_adaptive controls one step size for the whole batch; ours one per sample.
    Run one sample at a time through k-diffusion, the batch through us: they agree to round-off (with
    float64 as torch's default dtype, in which k-diffusion builds its times)."""
    ks = peers.kdiffusion_sampling()
    p = KD_PROCESSES[key]()
    model = GMM.denoiser(p, "eps")
    x = _start(p, 6)
    t_hi, t_lo = p.t_max, float(p.t_of_ode_sigma(0.05))
    grid = torch.tensor([t_hi, t_lo], dtype=torch.float64)
    mine = ds.sample(model, x, grid, ds.solvers.DPMAdaptive(order=order, rtol=rtol))
    s_hi, s_lo = float(p.ode_sigma(t_hi)), float(p.ode_sigma(t_lo))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        rows = []
        for row in x:
            y = row[None] / float(p.ode_scale(t_hi))
            out, info = ks.sample_dpm_adaptive(peers.kdiffusion_denoiser(model), y, s_lo, s_hi, order=order,
                                               rtol=rtol, disable=True, return_info=True)
            rows.append(out[0] * float(p.ode_scale(t_lo)))
    finally:
        torch.set_default_dtype(default)
    assert rel(torch.stack(rows), mine) < 1e-9  # float64 round-off through the controller's decisions
    alone = GMM.denoiser(p, "eps")  # the last sample alone: the same accepted and rejected attempts
    ds.sample(alone, x[-1:], grid, ds.solvers.DPMAdaptive(order=order, rtol=rtol))
    assert alone.nfe == info["nfe"]


@pytest.mark.parametrize("steps", [8, 20])
def test_ipndm_agrees_with_diffusers_ipndm_scheduler(steps):
    """diffusers' IPNDMScheduler is iPNDM (Zhang & Chen's PNDM with an Adams-Bashforth warm-up) on a v-prediction
    model whose noise level is sigma = sin^2(pi s / 2), alpha = sqrt(1 - sigma^2), i.e. the offset-free cosine
    VP in the angle time phi = 2 atan2(sigma, alpha) / pi, which it gives the network. Its eps is extrapolated with
    equal-step weights and moved by DDIM's transfer, which in k-diffusion's coordinates is ComfyUI's ipndm, ours.
    (Through ``trained_betas`` the grid stops short of pure noise and of t = 0: from alpha = 0 diffusers divides by
    1e-8, and into t = 0 it returns the data estimate of the extrapolated noise, not the model's.)"""
    import math
    import diffusers

    s = torch.linspace(0.97, 0.03, steps + 1, dtype=torch.float64)
    sched = diffusers.IPNDMScheduler(trained_betas=(torch.sin(s * math.pi / 2) ** 2).tolist())
    sched.set_timesteps(steps)
    p = ds.VP.cosine(s=0.0, t_min=1e-4, t_max=0.999)
    model = GMM.denoiser(p, "v")
    phi = (torch.atan2(sched.betas.double(), sched.alphas.double()) * 2 / math.pi)
    x = p.prior((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theirs = x.clone()
    for ts in sched.timesteps:
        theirs = sched.step(model(theirs, float(ts)).v(p, float(ts)), ts, theirs).prev_sample
    mine = ds.sample(model, x, phi, "ipndm")
    assert rel(theirs, mine) < 1e-6


STOCHASTIC_DIFFUSERS = [
    ("DDPMScheduler", {"clip_sample": False}, "ddpm", "scheduling_ddpm"),
    ("DDIMScheduler", {"clip_sample": False}, ds.solvers.DDIM(eta=1.0), "scheduling_ddim"),
    ("EulerAncestralDiscreteScheduler", {}, "euler_ancestral", "scheduling_euler_ancestral_discrete"),
    ("KDPM2AncestralDiscreteScheduler", {}, "dpm_2_ancestral", "scheduling_k_dpm_2_ancestral_discrete"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde",
     "scheduling_dpmsolver_multistep"),
]


def _run_diffusers_with_our_noise(module, sched, model, x, steps, noise, **step_kwargs):
    """diffusers' loop with its randn_tensor answered by our draws, in order (one per noisy step)."""
    import importlib
    mod = importlib.import_module(f"diffusers.schedulers.{module}")
    calls, original = iter(range(10_000)), mod.randn_tensor
    mod.randn_tensor = lambda *a, **k: noise.draw(next(calls))
    try:
        if step_kwargs:  # DDIM's eta is an argument of step()
            p = model.process
            sched.set_timesteps(steps)
            for ts in sched.timesteps:
                x = sched.step(model(x, float(p.t_of_timestep(float(ts)))).eps, ts, x, **step_kwargs).prev_sample
            return x
        return peers.run_diffusers(sched, model, x, steps)
    finally:
        mod.randn_tensor = original


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("cls_name, config, ours, module", STOCHASTIC_DIFFUSERS,
                         ids=[c[0] for c in STOCHASTIC_DIFFUSERS])
def test_stochastic_schedulers_agree_with_diffusers_given_the_same_noise(cls_name, config, ours, module, steps):
    from diffsampler.noise import StepNoise

    sched = _diffusers(cls_name, **config)
    p = peers.vp_process_of(sched)
    model = GMM.denoiser(p, "eps")
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = StepNoise.from_generator(torch.Generator().manual_seed(5), x.shape, x.dtype, x.device)
    theirs = _run_diffusers_with_our_noise(module, sched, model, x, steps, noise,
                                           **({"eta": 1.0} if cls_name == "DDIMScheduler" else {}))
    mine = ds.sample(model, x, peers.diffusers_grid(sched, p), ours, generator=torch.Generator().manual_seed(5))
    assert rel(theirs, mine) < 1e-6


@pytest.mark.statistical
def test_diffusers_third_order_sde_dpmsolver_drifts_from_the_target():
    """Documented difference: diffusers' DPMSolverMultistep with algorithm_type="sde-dpmsolver++" and
    solver_order=3 weights its second difference D2 by (1 - e^{-2h} - 2h) / (2h)^2 - 0.5, which tends to -1
    as h -> 0 where the expansion needs +h/3 (k-diffusion's -phi_3, and ours): an O(1) weight on an O(h^2)
    term, so its samples do not converge to the target. Given the same noise, its moments drift further from
    exact samples at 50 steps than at 20 (largest z-score 13 -> 35 here), while ours approach them."""
    from diffsampler.noise import StepNoise
    from test_stochastic import TARGET, _moment_z, _parts

    n = 20_000
    exact, _ = TARGET.sample(n, generator=torch.Generator().manual_seed(9))

    def z_max(s):
        a, b = _parts(s), _parts(exact)
        return max(float(_moment_z(a[k], b[k]).max()) for k in range(3))

    z = {}
    for steps in (20, 50):
        sched = _diffusers("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=3)
        p = peers.vp_process_of(sched)
        model = TARGET.denoiser(p, "eps")
        x = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        noise = StepNoise.from_generator(torch.Generator().manual_seed(5), x.shape, x.dtype, x.device)
        theirs = _run_diffusers_with_our_noise("scheduling_dpmsolver_multistep", sched, model, x, steps, noise)
        mine = ds.sample(model, x, peers.diffusers_grid(sched, p), "dpmpp_3m_sde",
                         generator=torch.Generator().manual_seed(5))
        z[steps] = (z_max(theirs), z_max(mine))
    assert z[50][0] > z[20][0] > 10 and z[50][1] < 5 and z[50][1] < z[20][1], z


@pytest.mark.parametrize("steps", [4, 8])
def test_lcm_agrees_with_diffusers_given_the_same_noise(steps):
    """diffusers' LCMScheduler: the consistency model's boundary condition (c_skip, c_out of the scaled
    timestep) belongs to the model, so we wrap it into the Denoiser; each step then jumps to the model's
    data estimate and re-noises it to the next timestep with fresh noise (ours: ``lcm``), the last step
    returning the data estimate."""
    from diffsampler.noise import StepNoise

    sched = _diffusers("LCMScheduler")
    p = peers.vp_process_of(sched)
    exact = GMM.denoiser(p, "eps")
    sched.set_timesteps(steps)

    def consistency(x, timestep):  # c_skip x + c_out x0, LCM's parametrisation at timestep_scaling 10
        scaled = timestep.to(x.dtype)[:, None] * 10.0
        c_skip, c_out = 0.25 / (scaled ** 2 + 0.25), scaled / (scaled ** 2 + 0.25).sqrt()
        t = float(p.t_of_timestep(float(timestep[0])))
        return c_out * exact(x, t).x0 + c_skip * x

    model = ds.Denoiser(consistency, p, "x0")
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = StepNoise.from_generator(torch.Generator().manual_seed(5), x.shape, x.dtype, x.device)
    theirs = _run_diffusers_with_our_noise("scheduling_lcm", sched, exact, x, steps, noise)
    grid = torch.tensor([float(p.t_of_timestep(float(ts))) for ts in sched.timesteps] + [0.0], dtype=torch.float64)
    mine = ds.sample(model, x, grid, "lcm", generator=torch.Generator().manual_seed(5))
    assert rel(theirs, mine) < 1e-6
