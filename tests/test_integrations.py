"""Models from diffusers and k-diffusion as Denoisers: our loop reproduces diffusers' own.

Tiny randomly initialised UNets are built from configs offline; diffusers' denoising
loop (``scheduler.step`` over ``scheduler.timesteps``) and ours run from the same
start on the same timesteps, in float32 as diffusers computes.
"""

import pytest
import torch

import diffsampler as ds
from diffsampler.integrations import from_diffusers, from_k_diffusion, process_from_config

diffusers = pytest.importorskip("diffusers")
peers = pytest.importorskip("diffsampler.bench.peers")


def _unet(conditional: bool = False):
    torch.manual_seed(0)
    if conditional:
        net = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=4, attention_head_dim=2, cross_attention_dim=6)
    else:
        net = diffusers.UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=4)
    return net.eval().requires_grad_(False)


def _their_loop(unet, scheduler, x, steps, **cond):
    scheduler.set_timesteps(steps)
    for ts in scheduler.timesteps:
        out = unet(x, ts, **cond).sample
        x = scheduler.step(out, ts, x).prev_sample
    return x


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = [
    ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}, "ddim", "epsilon"),
    ("DDIMScheduler", {"clip_sample": False, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                       "beta_end": 0.012}, "ddim", "v_prediction"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp_2m", "epsilon"),
    ("DPMSolverMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2"}, "dpmpp_2m", "v_prediction"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp_2m", "sample"),
]


@pytest.mark.parametrize("cls_name, config, ours, prediction_type", CASES)
def test_unet2d_reproduces_diffusers_loop(cls_name, config, ours, prediction_type):
    unet = _unet()
    sched = getattr(diffusers, cls_name)(prediction_type=prediction_type, **config)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = _their_loop(unet, sched, x, 8)
    model = from_diffusers(unet, sched)
    assert model.prediction == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction_type]
    mine = ds.sample(model, x, peers.diffusers_grid(sched, model.process), ours)
    assert model.nfe == 8
    assert theirs.std() > 0.1  # the random network does move the sample
    assert rel(mine, theirs) < 1e-5


def test_unet2d_condition_model_takes_encoder_hidden_states():
    unet = _unet(conditional=True)
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 8, 8, generator=g)
    text = torch.randn(3, 5, 6, generator=g)
    theirs = _their_loop(unet, sched, x, 6, encoder_hidden_states=text)
    model = from_diffusers(unet, sched)
    grid = peers.diffusers_grid(sched, model.process)
    mine = ds.sample(model, x, grid, "dpmpp_2m", encoder_hidden_states=text)
    assert rel(mine, theirs) < 1e-5
    other = ds.sample(model, x, grid, "dpmpp_2m", encoder_hidden_states=torch.randn(3, 5, 6, generator=g))
    assert rel(other, mine) > 1e-3  # the conditioning reaches the network
    # Classifier-free guidance with negative embeddings as the unconditional pass: one network call per step.
    guided = ds.guidance.cfg(model, 4.0, uncond={"encoder_hidden_states": torch.zeros(3, 5, 6)})
    before = model.nfe
    ds.sample(guided, x, grid, "dpmpp_2m", encoder_hidden_states=text)
    assert model.nfe - before == 6


def test_flow_matching_config_reproduces_diffusers_loop():
    unet = _unet()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = _their_loop(unet, sched, x, 8)
    model = from_diffusers(unet, sched)
    assert isinstance(model.process, ds.Flow) and model.prediction == "velocity"
    mine = ds.sample(model, x, peers.diffusers_flow_grid(sched, model.process), "euler")
    assert rel(mine, theirs) < 1e-5


def test_zero_terminal_snr_config():
    p = process_from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                             "rescale_betas_zero_snr": True, "num_train_timesteps": 1000})
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    rescale_betas_zero_snr=True)
    ours = p.alpha(torch.tensor([(i + 1) / 1000 for i in range(999)], dtype=torch.float64)) ** 2
    torch.testing.assert_close(ours, sched.alphas_cumprod[:999].double(), rtol=1e-5, atol=1e-7)
    assert float(p.alpha(1.0)) < 1e-8


def test_bad_arguments_name_what_is_allowed():
    with pytest.raises(TypeError, match="unet must be a torch.nn.Module"):
        from_diffusers(lambda x, t: x, {"num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid' is not supported"):
        process_from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type 'noise'"):
        from_diffusers(_unet(), {"prediction_type": "noise"})
    with pytest.raises(TypeError, match="scheduler or its config"):
        from_diffusers(_unet(), 3)


def test_k_diffusion_denoiser_agrees_with_k_diffusion_sampler():
    try:
        sampling = peers.kdiffusion_sampling()
    except ImportError:  # pragma: no cover - the dev install provides it
        pytest.skip("k-diffusion is not installed")
    gmm = ds.testbeds.random_mixture(2, 3, seed=1)
    exact = gmm.denoiser(ds.EDM(), "x0")

    def D(x, sigma):  # noqa: N802 - k-diffusion's name
        return exact(x, sigma).x0

    model = from_k_diffusion(D)
    grid = ds.grids.karras(model.process, 10)
    x = model.process.prior((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theirs = sampling.sample_heun(D, x, grid.clone(), disable=True)
    mine = ds.sample(model, x, grid, "heun")
    assert rel(mine, theirs) < 1e-10
