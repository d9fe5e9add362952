"""``from_diffusers`` on transformers, pipelines and local directories, and the scheduler flags it honours.

Each check runs diffusers' own code (its pipeline's loop, or its scheduler's ``step``) on a tiny
random-weight pipeline built from configs offline (``tests/tiny_pipelines.py``), and ours from the
same start on the same times.
"""

import os
import warnings

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffsampler as ds  # noqa: E402
from diffsampler.integrations.diffusers_grids import grid_from_scheduler  # noqa: E402
from diffsampler.integrations.diffusers_models import DiffusersDenoiser, from_diffusers  # noqa: E402

import tiny_pipelines as tiny  # noqa: E402

STEPS = 4
PROMPT = "a cat"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _latents(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["no_cfg", "cfg"])
def test_sd3_transformer_equals_its_pipeline(scale):
    pipe = tiny.sd3()
    x = _latents((2, 4, tiny.HEIGHT // 2, tiny.WIDTH // 2))
    theirs = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=STEPS, height=tiny.HEIGHT,
                  width=tiny.WIDTH, latents=x, guidance_scale=scale, max_sequence_length=8, num_images_per_prompt=2,
                  output_type="latent").images
    text, neg_text, pooled, neg_pooled = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, negative_prompt="",
                                                            num_images_per_prompt=2, max_sequence_length=8,
                                                            do_classifier_free_guidance=True)
    model = from_diffusers(pipe.transformer, pipe.scheduler)
    assert isinstance(model.process, ds.Flow) and model.prediction == "velocity"
    guided = ds.guidance.cfg(model, scale, uncond={"encoder_hidden_states": neg_text, "pooled_projections": neg_pooled})
    mine = ds.sample(guided, x, grid_from_scheduler(model.scheduler, STEPS), "euler", encoder_hidden_states=text,
                     pooled_projections=pooled)
    assert rel(theirs, x) > 1e-2  # the network moves the sample
    assert rel(mine, theirs) < 1e-5


@pytest.mark.parametrize("distilled", [False, True], ids=["flux_schnell_like", "flux_dev_like"])
def test_flux_transformer_equals_its_pipeline(distilled):
    pipe = tiny.flux(guidance_embeds=distilled)
    batch = 2
    packed, img_ids = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, tiny.HEIGHT, tiny.WIDTH,
                                           torch.float32, "cpu", torch.Generator().manual_seed(0))
    # Flux.1-dev is guidance-distilled (its guidance is an input); the other runs true CFG, two passes.
    cfg = {"guidance_scale": 3.5} if distilled else {"true_cfg_scale": 2.0, "negative_prompt": "a dog"}
    theirs = pipe(prompt=PROMPT, num_inference_steps=STEPS, height=tiny.HEIGHT, width=tiny.WIDTH, latents=packed,
                  max_sequence_length=8, num_images_per_prompt=batch, output_type="latent", **cfg).images
    text, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, num_images_per_prompt=batch, max_sequence_length=8)
    model = from_diffusers(pipe)
    assert model.pipeline is pipe and model.scheduler is pipe.scheduler
    # The grid Flux's pipeline sets: sigmas linspace(1, 1/n, n) shifted by the token count's mu.
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = pipe.scheduler.config
    mu = calculate_shift(packed.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    grid = grid_from_scheduler(model.scheduler, STEPS, sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    # Positions per sample, so that guidance can batch them with the rest.
    keywords = {"encoder_hidden_states": text, "pooled_projections": pooled,
                "img_ids": img_ids.expand(batch, -1, -1)}
    if distilled:
        guided = model
        keywords["guidance"] = torch.full((batch,), 3.5)
    else:
        neg_text, neg_pooled, _ = pipe.encode_prompt("a dog", "a dog", num_images_per_prompt=batch,
                                                     max_sequence_length=8)
        guided = ds.guidance.cfg(model, 2.0, uncond={"encoder_hidden_states": neg_text,
                                                     "pooled_projections": neg_pooled})
    mine = ds.sample(guided, packed, grid, "euler", **keywords)
    assert rel(theirs, packed) > 1e-2
    assert rel(mine, theirs) < 1e-5
    # The packing is the pipeline's own: unpack ours with its helper to decode.
    unpacked = pipe._unpack_latents(mine, tiny.HEIGHT, tiny.WIDTH, pipe.vae_scale_factor)
    assert unpacked.shape == (batch, 1, tiny.HEIGHT // 2, tiny.WIDTH // 2)


def test_flux_needs_its_positions_and_guidance():
    pipe = tiny.flux(guidance_embeds=True)
    model = from_diffusers(pipe)
    x = _latents((1, 16, 4))
    text = torch.zeros(1, 8, 32)
    with pytest.raises(ValueError, match="needs img_ids="):
        model(x, 0.5, encoder_hidden_states=text, pooled_projections=torch.zeros(1, 32))
    with pytest.raises(ValueError, match="guidance-distilled .* needs guidance="):
        model(x, 0.5, encoder_hidden_states=text, pooled_projections=torch.zeros(1, 32), img_ids=torch.zeros(16, 3))
    with pytest.raises(ValueError, match="flow-matching transformer; its scheduler must be a flow one"):
        from_diffusers(pipe.transformer, tiny.SD_SCHEDULER_CONFIG)


def test_sd_pipeline_object_and_directory_equal_the_unet(tmp_path):
    pipe = tiny.sd(scheduler="DDIMScheduler")
    x = _latents((1, 4, tiny.HEIGHT // 2, tiny.WIDTH // 2))
    theirs = pipe(prompt=PROMPT, num_inference_steps=STEPS, height=tiny.HEIGHT, width=tiny.WIDTH, latents=x,
                  guidance_scale=1.0, output_type="latent").images
    text, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    from_unet = from_diffusers(pipe.unet, pipe.scheduler)
    from_pipe = from_diffusers(pipe)
    from_dir = from_diffusers(tiny.save_sd(tmp_path / "sd", scheduler="DDIMScheduler"))
    assert isinstance(from_dir.pipeline, diffusers.StableDiffusionPipeline)
    assert type(from_dir.scheduler).__name__ == "DDIMScheduler" and from_pipe.module is pipe.unet
    grid = grid_from_scheduler(from_pipe.scheduler, STEPS)
    mine = {name: ds.sample(m, x, grid, "ddim", encoder_hidden_states=text)
            for name, m in (("unet", from_unet), ("pipe", from_pipe), ("dir", from_dir))}
    assert rel(mine["unet"], theirs) < 1e-5
    assert torch.equal(mine["pipe"], mine["unet"])
    assert rel(mine["dir"], mine["unet"]) < 1e-6  # the weights went through safetensors unchanged


def _ddim_loop(unet, scheduler, x, steps, **cond):
    scheduler.set_timesteps(steps)
    for ts in scheduler.timesteps:
        out = unet(x, ts, **cond).sample
        # The noise estimate re-derived from the corrected data estimate, as ours (every other scheduler does so).
        x = scheduler.step(out, ts, x, use_clipped_model_output=True).prev_sample
    return x


FLAGS = [
    {"clip_sample": True, "clip_sample_range": 0.5},
    {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
]


@pytest.mark.parametrize("flags", FLAGS, ids=["clip_sample", "thresholding"])
def test_data_estimate_corrections_equal_diffusers_ddim(flags):
    unet = tiny.sd().unet
    sched = diffusers.DDIMScheduler.from_config({**tiny.SD_SCHEDULER_CONFIG, **flags})
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    theirs = _ddim_loop(unet, sched, x, STEPS, encoder_hidden_states=text)
    model = from_diffusers(unet, sched)
    assert len(model.corrections) == 1
    grid = grid_from_scheduler(model.scheduler, STEPS)
    mine = ds.sample(model, x, grid, "ddim", encoder_hidden_states=text)
    plain = ds.sample(from_diffusers(unet, tiny.SD_SCHEDULER_CONFIG), x, grid, "ddim", encoder_hidden_states=text)
    assert rel(plain, theirs) > 1e-3  # the flag bites
    assert rel(mine, theirs) < 1e-5


def test_thresholding_with_dpm_solver_equals_diffusers():
    unet = tiny.sd().unet
    flags = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}
    sched = diffusers.DPMSolverMultistepScheduler.from_config({**tiny.SD_SCHEDULER_CONFIG, **flags})
    x = _latents((2, 4, 8, 8), seed=4)
    text = _latents((2, 77, 32), seed=5)
    sched.set_timesteps(STEPS)
    theirs = x
    for ts in sched.timesteps:
        theirs = sched.step(unet(theirs, ts, encoder_hidden_states=text).sample, ts, theirs).prev_sample
    model = from_diffusers(unet, sched)
    mine = ds.sample(model, x, grid_from_scheduler(model.scheduler, STEPS), "dpmpp_2m", encoder_hidden_states=text)
    assert rel(mine, theirs) < 1e-5


def test_lcm_boundary_condition_is_diffusers():
    unet = tiny.sd().unet
    sched = diffusers.LCMScheduler.from_config(tiny.SD_SCHEDULER_CONFIG)
    model, plain = from_diffusers(unet, sched), from_diffusers(unet, tiny.SD_SCHEDULER_CONFIG)
    x, text = _latents((1, 4, 8, 8)), _latents((1, 77, 32), seed=1)
    # Near the data, where the boundary condition pulls the estimate towards the sample.
    t = float(model.process.t_of_timestep(1))
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(1))
    assert abs(c_skip) > 1e-3
    expected = c_out * plain(x, t, encoder_hidden_states=text).x0 + c_skip * x
    torch.testing.assert_close(model(x, t, encoder_hidden_states=text).x0, expected, rtol=1e-5, atol=1e-6)


def test_flags_of_another_class_grid_or_solver_do_not_warn():
    unet = tiny.sd().unet
    # A scheduler made from DDIM's config keeps clip_sample in its config without using it.
    euler = diffusers.EulerDiscreteScheduler.from_config(
        diffusers.DDIMScheduler.from_config({**tiny.SD_SCHEDULER_CONFIG, "clip_sample": True}).config)
    grid_and_solver = diffusers.DPMSolverMultistepScheduler.from_config(
        {**tiny.SD_SCHEDULER_CONFIG, "use_karras_sigmas": True, "algorithm_type": "dpmsolver", "solver_order": 3,
         "timestep_spacing": "trailing", "final_sigmas_type": "sigma", "lower_order_final": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_diffusers(unet, euler).corrections == ()
        model = from_diffusers(unet, grid_and_solver)
    assert model.corrections == () and model.scheduler is grid_and_solver


def test_a_flag_we_do_not_apply_warns_once_naming_it():
    sched = diffusers.EulerDiscreteScheduler.from_config({**tiny.SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction",
                                                          "timestep_type": "continuous"})
    with pytest.warns(UserWarning, match="timestep_type='continuous' is ignored") as record:
        from_diffusers(tiny.sd().unet, sched)
    assert len([w for w in record if "from_diffusers" in str(w.message)]) == 1


def test_bad_inputs_name_what_is_allowed(tmp_path):
    class NoNetworkPipeline(diffusers.DiffusionPipeline):
        def __init__(self, scheduler):
            super().__init__()
            self.register_modules(scheduler=scheduler)

    with pytest.raises(TypeError, match="has no .unet or .transformer network; supported: a diffusers UNet"):
        from_diffusers(NoNetworkPipeline(diffusers.DDIMScheduler()))
    with pytest.raises(TypeError, match="model must be a diffusers UNet .*got function"):
        from_diffusers(lambda x, t: x, tiny.SD_SCHEDULER_CONFIG)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="no model in .*empty.*model_index.json and a unet/ or transformer/"):
        from_diffusers(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        from_diffusers(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="needs scheduler_or_config="):
        from_diffusers(tiny.sd().unet)

    class PixelTransformer2DModel(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states=None, timestep=None):
            return hidden_states

    with pytest.raises(TypeError, match="PixelTransformer2DModel is not supported; supported:"):
        from_diffusers(PixelTransformer2DModel(), tiny.SD_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="EDMEulerScheduler .* is not supported"):
        from_diffusers(tiny.sd().unet, diffusers.EDMEulerScheduler())


def test_returns_a_denoiser_for_every_kind():
    assert isinstance(from_diffusers(tiny.sd3()), DiffusersDenoiser)
    assert isinstance(from_diffusers(tiny.sdxl()), ds.Denoiser)


def test_sdxl_pipeline_with_cfg_and_added_cond_kwargs_equals_its_loop():
    pipe = tiny.sdxl()
    x = _latents((1, 4, tiny.HEIGHT // 2, tiny.WIDTH // 2))
    theirs = pipe(prompt=PROMPT, negative_prompt="a dog", num_inference_steps=STEPS, height=tiny.HEIGHT,
                  width=tiny.WIDTH, latents=x, guidance_scale=3.0, output_type="latent").images
    text, neg_text, pooled, neg_pooled = pipe.encode_prompt(PROMPT, device="cpu", negative_prompt="a dog")
    size = (tiny.HEIGHT, tiny.WIDTH)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, text.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    model = from_diffusers(pipe)
    guided = ds.guidance.cfg(model, 3.0, uncond={"encoder_hidden_states": neg_text,
                                                 "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": time_ids}})
    # The pipeline scales its latents by init_noise_sigma into Euler's sigma space; ours stay in the VP scale.
    mine = ds.sample(guided, x, grid_from_scheduler(model.scheduler, STEPS), "euler", encoder_hidden_states=text,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    assert rel(mine, theirs) < 1e-5
