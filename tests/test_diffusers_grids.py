"""grid_from_scheduler: the grid is the one the diffusers scheduler itself steps through.

Every case runs the scheduler's own ``set_timesteps`` and checks our grid against what it produced
(``sigmas``, ``timesteps``, and for DDIM/PNDM the states its own ``step`` reaches), then a few
end-to-end runs compare ``ds.sample`` with diffusers' denoising loop on a tiny random UNet.
"""

import copy
import inspect
import os
import warnings

import pytest
import torch

import diffsampler as ds
from diffsampler.integrations import from_diffusers, process_from_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
from diffsampler.integrations.diffusers_grids import grid_from_scheduler  # noqa: E402
from test_integrations import _unet, rel  # noqa: E402

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
ALPHA_CLASSES = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler"]
NOISY_STEPS = ("DDPMScheduler", "LCMScheduler")  # their steps add noise: zero eps does not expose the states
SIGMA_CLASSES = ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
                 "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                 "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                 "LMSDiscreteScheduler", "DPMSolverSDEScheduler", "SASolverScheduler"]
# Schedulers listing each stage: Heun repeats its knot, KDPM2 and DPM-Solver SDE interleave a midpoint.
REPEATS, INTERLEAVES = ("HeunDiscreteScheduler",), ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                                                    "DPMSolverSDEScheduler")


def _options(cls_name):
    return inspect.signature(getattr(diffusers, cls_name).__init__).parameters


def _vp_cases():
    cases = []
    for name in ALPHA_CLASSES + SIGMA_CLASSES:
        opts = _options(name)
        base = dict(SD)
        if "timestep_spacing" in opts:
            for spacing in ("linspace", "leading", "trailing"):
                for offset in (0, 1):
                    cases.append((name, {**base, "timestep_spacing": spacing, "steps_offset": offset}, 7))
        else:
            cases.append((name, base, 7))
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if flag in opts:
                cases.append((name, {**base, flag: True}, 10))
        if "final_sigmas_type" in opts:
            cases.append((name, {**base, "final_sigmas_type": "sigma_min"}, 10))
        if "set_alpha_to_one" in opts:
            cases.append((name, {**base, "set_alpha_to_one": False}, 10))
    # Stable Diffusion's own scheduler configs; PNDM with and without its PRK warm-up.
    sd = {**SD, "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}
    cases += [("PNDMScheduler", {**sd, "skip_prk_steps": True}, 10),
              ("PNDMScheduler", {**sd, "skip_prk_steps": True}, 50),
              ("DDIMScheduler", {**sd, "clip_sample": False}, 50), ("PNDMScheduler", {}, 10)]
    return cases


def _distinct(values):
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def _reference(scheduler, steps, **kwargs):
    ref = copy.deepcopy(scheduler)
    ref.set_timesteps(steps, **kwargs)
    return ref


def _ddim_family_states(ref):
    """alphas_cumprod of the states diffusers' own steps reach, driven with a zero noise prediction.

    With eps = 0 each step maps x to sqrt(alphas_cumprod[target] / alphas_cumprod[start]) x, so the
    squared sample tracks the state (started small, so that clip_sample never clips x0). PRK's
    Runge-Kutta steps take four calls each, the first three of which return stage states
    (t - h/2 twice, t - h): only every fourth call ends a step.
    """
    start = 1e-3
    x = torch.full((1,), start)
    first = float(ref.alphas_cumprod[int(ref.timesteps[0])])
    prk_calls = len(getattr(ref, "prk_timesteps", []))
    states = [first]
    for call, ts in enumerate(ref.timesteps):
        x = ref.step(torch.zeros(1), ts, x).prev_sample
        if call >= prk_calls or call % 4 == 3:
            states.append(first * (float(x[0]) / start) ** 2)
    # PLMS's repeated second timestep re-takes its first step: the same state twice.
    return [s for i, s in enumerate(states) if i == 0 or abs(s / states[i - 1] - 1) > 1e-6]


@pytest.mark.parametrize("cls_name, config, steps", _vp_cases())
def test_vp_grid_is_the_schedulers_own(cls_name, config, steps):
    scheduler = getattr(diffusers, cls_name)(**config)
    before = getattr(scheduler, "num_inference_steps", None), copy.deepcopy(scheduler.timesteps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grid = grid_from_scheduler(scheduler, steps)
    warned = any("no grid reproduces" in str(w.message) for w in caught)
    after = getattr(scheduler, "num_inference_steps", None), scheduler.timesteps
    assert after[0] == before[0] and (after[1] is before[1] is None or torch.equal(after[1], before[1]))  # untouched
    assert grid.dtype == torch.float64 and grid.ndim == 1 and bool((grid[1:] < grid[:-1]).all())
    p = process_from_config(scheduler)
    ref = _reference(scheduler, steps)
    ours_timesteps = p.time_input(grid[:-1])
    n_train = p.num_train_timesteps

    if cls_name in ALPHA_CLASSES:
        evaluated = _distinct([int(v) for v in ref.timesteps])
        if cls_name == "PNDMScheduler" and len(ref.prk_timesteps):
            prk = [int(v) for v in ref.prk_timesteps]
            evaluated = _distinct(prk[::4] + [int(v) for v in ref.plms_timesteps])
        # Every knot but the last is an evaluation, at the scheduler's integer timestep and alphas_cumprod.
        torch.testing.assert_close(ours_timesteps, torch.tensor(evaluated[:len(grid) - 1], dtype=torch.float64),
                                   rtol=0, atol=1e-9)
        ac = ref.alphas_cumprod.double()[torch.tensor(evaluated[:len(grid) - 1])]
        torch.testing.assert_close(p.alpha(grid[:-1]) ** 2, ac, rtol=1e-6, atol=0)
        if cls_name not in NOISY_STEPS:
            states = torch.tensor(_ddim_family_states(ref), dtype=torch.float64)
            consistent = len(states) == len(grid) and torch.allclose(p.alpha(grid) ** 2, states, rtol=1e-5)
            assert warned != consistent, (warned, states, p.alpha(grid) ** 2)
            if len(grid) < len(evaluated) + 1:  # the dropped last step from alphas_cumprod[0] to itself
                assert evaluated[-1] == 0 and not ref.config.set_alpha_to_one
        else:
            assert float(grid[-1]) == 0.0 and len(grid) == len(evaluated) + 1
        return

    assert not warned
    sigmas = [float(s) for s in ref.sigmas.double()]
    timesteps = [float(v) for v in ref.timesteps.double()]
    if cls_name in REPEATS:
        sigmas, timesteps = _distinct(sigmas), _distinct(timesteps)
    elif cls_name in INTERLEAVES:
        sigmas, timesteps = _distinct(sigmas), timesteps[0::2]
    if len(sigmas) == len(grid) + 1 and sigmas[-1] == sigmas[-2]:
        sigmas = sigmas[:-1]  # DEIS ends on sigma_min twice: a zero step
    torch.testing.assert_close(p.ode_sigma(grid), torch.tensor(sigmas, dtype=torch.float64), rtol=1e-6, atol=0)
    on_node = 0
    for ours, theirs, sigma in zip(ours_timesteps.tolist(), timesteps, sigmas):
        node_sigma = float(p.ode_sigma((theirs + 1) / n_train))
        if theirs == round(theirs) and abs(node_sigma / sigma - 1) < 1e-6:
            assert ours == theirs  # a training node: the network gets the scheduler's integer timestep
            on_node += 1
        else:  # between nodes diffusers interpolates log-sigma (or rounds): see grid_from_scheduler
            assert abs(ours - theirs) <= 1.0  # within one training interval
    if not any(config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) \
            and config.get("timestep_spacing") != "linspace":
        assert on_node == len(grid) - 1


FLOW_CASES = [
    ("FlowMatchEulerDiscreteScheduler", {}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, {"mu": 0.8}),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True, "shift_terminal": 0.05}, {"mu": 1.1}),
    ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"use_beta_sigmas": True}, {}),
    ("FlowMatchHeunDiscreteScheduler", {}, {}),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, {}),
]


@pytest.mark.parametrize("cls_name, config, kwargs", FLOW_CASES)
def test_flow_grid_is_the_schedulers_own(cls_name, config, kwargs):
    scheduler = getattr(diffusers, cls_name)(**config)
    grid = grid_from_scheduler(scheduler, 9, **kwargs)
    ref = _reference(scheduler, 9, **kwargs)
    sigmas, timesteps = _distinct(ref.sigmas.double().tolist()), _distinct(ref.timesteps.double().tolist())
    torch.testing.assert_close(grid, torch.tensor(sigmas, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(1000 * grid[:-1], torch.tensor(timesteps, dtype=torch.float64), rtol=1e-6, atol=1e-5)
    assert float(grid[-1]) == 0.0


def test_flux_style_sigmas_and_mu():
    steps = 6
    sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    grid = grid_from_scheduler(scheduler, sigmas=sigmas, mu=0.9)
    ref = copy.deepcopy(scheduler)
    ref.set_timesteps(sigmas=sigmas, mu=0.9)
    torch.testing.assert_close(grid, ref.sigmas.double(), rtol=0, atol=0)
    assert len(grid) == steps + 1


def test_config_dict_gives_the_instances_grid():
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    config = {"_class_name": "DPMSolverMultistepScheduler", **scheduler.config}
    torch.testing.assert_close(grid_from_scheduler(config, 8), grid_from_scheduler(scheduler, 8), rtol=0, atol=0)


def test_sd_ddim_config_keeps_its_last_step():
    scheduler = diffusers.DDIMScheduler(**SD, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    grid = grid_from_scheduler(scheduler, 10)
    ref = _reference(scheduler, 10)
    assert len(grid) == 11  # timesteps 901, ..., 1, then alphas_cumprod[0]
    assert float(p_alpha2 := process_from_config(scheduler).alpha(grid[-1]) ** 2) == pytest.approx(
        float(ref.final_alpha_cumprod), rel=1e-7), p_alpha2


def test_bad_arguments_name_what_is_allowed():
    with pytest.raises(ValueError, match="'TCDScheduler' is not supported; supported: DDIMScheduler"):
        grid_from_scheduler(diffusers.TCDScheduler(), 4)
    with pytest.raises(ValueError, match="needs '_class_name'"):
        grid_from_scheduler({"num_train_timesteps": 1000}, 4)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"steps must be a positive int, got {bad!r}"):
            grid_from_scheduler(diffusers.DDIMScheduler(), bad)
    with pytest.raises(ValueError, match="give steps"):
        grid_from_scheduler(diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match=r"DDIMScheduler.set_timesteps takes no sigmas="):
        grid_from_scheduler(diffusers.DDIMScheduler(), 4, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="invert_sigmas=True"):
        grid_from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True), 4)
    with pytest.raises(ValueError, match="mu"):
        grid_from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 4)
    with pytest.raises(ValueError, match=r"FlowMatchEulerDiscreteScheduler's schedule does not strictly decrease"
                                         r".*t = 0.5 is followed by 0.5"):
        grid_from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(), sigmas=[1.0, 0.5, 0.5])
    with pytest.raises(TypeError, match="needs a Flow process"):
        grid_from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(), 4, process=ds.VP.scaled_linear())


def _pipeline_loop(unet, scheduler, x, steps):
    """diffusers' denoising loop as its pipelines write it (initial scale, scale_model_input, step)."""
    scheduler.set_timesteps(steps)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers have neither
    scale_model_input = getattr(scheduler, "scale_model_input", lambda sample, timestep: sample)
    for ts in scheduler.timesteps:
        out = unet(scale_model_input(x, ts), ts).sample
        x = scheduler.step(out, ts, x).prev_sample
    return x


END_TO_END = [
    ("DDIMScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False,
                       "clip_sample": False}, "ddim"),
    ("EulerDiscreteScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}, "euler"),
    ("EulerDiscreteScheduler", {**SD, "use_karras_sigmas": True}, "euler"),  # knots between training nodes
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, "euler"),
]


@pytest.mark.parametrize("cls_name, config, solver", END_TO_END)
def test_sampling_on_the_grid_reproduces_diffusers_loop(cls_name, config, solver):
    torch.set_num_threads(1)
    unet = _unet()
    scheduler = getattr(diffusers, cls_name)(**config)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = _pipeline_loop(unet, copy.deepcopy(scheduler), x, 6)
    model = from_diffusers(unet, scheduler)
    grid = grid_from_scheduler(scheduler, 6)
    start, init_noise_sigma = x, float(getattr(_reference(scheduler, 6), "init_noise_sigma", 1.0))
    if init_noise_sigma > 1.0:
        # The same start sample in our scale: Euler-family schedulers keep it in EDM scale, and with
        # "linspace"/"trailing" spacing their init_noise_sigma is sigma_max, not the sqrt(sigma_max^2 + 1)
        # of a unit-variance prior (2e-3 apart for SD's schedule).
        start = x * init_noise_sigma * float(model.process.alpha(float(grid[0])))
    mine = ds.sample(model, start, grid, solver)
    assert model.nfe == 6
    assert rel(mine, theirs) < 1e-5
