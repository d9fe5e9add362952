"""``DiffsamplerScheduler`` inside unchanged diffusers pipelines equals ``ds.sample``.

A tiny random-weight Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL) is built from
configs offline and called with prompt embeddings and negative prompt embeddings, classifier-free
guidance on. Through the adapter every fixed-grid solver gives ``ds.sample`` of the same guided model
from the same latents with the same generator, to float32 round-off (in fact the same kernels).
"""

import gc
import os
import threading

import pytest
import torch

import diffsampler as ds

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
from diffsampler.integrations import DiffsamplerScheduler, from_diffusers  # noqa: E402

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
FIXED_GRID = [name for name in ds.solvers.names() if not ds.solvers.REGISTRY[name].adaptive]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, attention_head_dim=2, cross_attention_dim=6).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
        norm_num_groups=4, sample_size=16).eval()
    g = torch.Generator().manual_seed(1)
    return {"unet": unet, "vae": vae, "prompt": torch.randn(2, 5, 6, generator=g),
            "negative": torch.randn(2, 5, 6, generator=g), "latents": torch.randn(2, 4, 8, 8, generator=g)}


def _pipeline(parts, cls=None, **scheduler_config):
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                        **{**SD_BETAS, **scheduler_config})
    cls = cls or diffusers.StableDiffusionPipeline
    pipe = cls(vae=parts["vae"], text_encoder=None, tokenizer=None, unet=parts["unet"], scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, parts, steps=5, seed=4, **options):
    return pipe(prompt_embeds=parts["prompt"], negative_prompt_embeds=parts["negative"], latents=parts["latents"],
                num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **options).images


def _ours(pipe, parts, solver, seed=4, callback=None):
    model = ds.guidance.cfg(from_diffusers(pipe.unet, pipe.scheduler.config), 3.0,
                            uncond={"encoder_hidden_states": parts["negative"]})
    return ds.sample(model, parts["latents"], pipe.scheduler.grid, solver, generator=torch.Generator().manual_seed(seed),
                     callback=callback, encoder_hidden_states=parts["prompt"])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("solver", FIXED_GRID)
def test_every_fixed_grid_solver_in_stable_diffusion_equals_sample(parts, solver):
    pipe = _pipeline(parts)
    pipe.scheduler = DiffsamplerScheduler.from_config(pipe.scheduler.config, solver=solver, grid="karras")
    theirs = _call(pipe, parts)
    assert not theirs.requires_grad  # the pipeline's post-processing needs plain tensors
    cls = ds.solvers.REGISTRY[solver]
    assert len(pipe.scheduler.timesteps) == cls.run_nfe(5, into_zero=True) and pipe.scheduler.order == cls.nfe_per_step
    assert rel(theirs, _ours(pipe, parts, solver)) < 1e-5
    assert rel(theirs, parts["latents"]) > 0.1


def test_solver_options_travel_in_the_config_and_survive_save_and_load(parts, tmp_path):
    pipe = _pipeline(parts)
    config = pipe.scheduler.config
    by_keyword = DiffsamplerScheduler.from_config(config, solver="unipc", grid="karras", solver_order=3, variant="bh2")
    by_object = DiffsamplerScheduler.from_config(config, solver=ds.solvers.get("unipc", solver_order=3, variant="bh2"),
                                                 grid="karras")
    direct = DiffsamplerScheduler(solver=ds.solvers.get("unipc", solver_order=3, variant="bh2"), grid="karras")
    assert by_keyword.solver == by_object.solver == direct.solver == ds.solvers.get("unipc", solver_order=3,
                                                                                    variant="bh2")
    assert direct.config.solver == "unipc" and direct.config.solver_options["variant"] == "bh2"
    by_keyword.save_pretrained(tmp_path)
    loaded = DiffsamplerScheduler.from_pretrained(tmp_path)
    assert loaded.solver == by_keyword.solver and loaded.config.base_scheduler == "PNDMScheduler"
    pipe.scheduler = loaded
    theirs = _call(pipe, parts)
    assert rel(theirs, _ours(pipe, parts, ds.solvers.get("unipc", solver_order=3, variant="bh2"))) < 1e-5
    assert rel(theirs, _ours(pipe, parts, "unipc")) > 1e-4  # the options reached the solver


def test_timesteps_list_every_evaluation_as_diffusers_heun_does(parts):
    scheduler = DiffsamplerScheduler.from_config(_pipeline(parts).scheduler.config, solver="heun", grid="karras")
    scheduler.set_timesteps(4)
    grid, process = scheduler.grid, scheduler.process
    # Heun evaluates at t_i and t_{i+1} in each step, once in the last step into t = 0
    times = [grid[0]] + [t for t in grid[1:-1] for _ in (0, 1)]
    expected = torch.stack([process.time_input(t) for t in times]).float()
    torch.testing.assert_close(scheduler.timesteps, expected)
    assert scheduler.order == 2 and scheduler.num_inference_steps == 4
    heun = diffusers.HeunDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True)
    heun.set_timesteps(4)
    assert len(heun.timesteps) == len(scheduler.timesteps)


def test_a_sample_changed_between_steps_becomes_the_runs_sample(parts):
    # diffusers' callback_on_step_end may replace the latents (inpainting blends them), as ours may
    def theirs_callback(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.9}

    for solver in ("dpmpp_2m", "dpmpp_2s"):
        pipe = _pipeline(parts)
        pipe.scheduler = DiffsamplerScheduler.from_config(pipe.scheduler.config, solver=solver, grid="karras")
        pipe.scheduler.set_timesteps(5)
        order, evaluations = pipe.scheduler.order, len(pipe.scheduler.timesteps)

        # diffusers calls it after every evaluation, ours after every step: change only at step ends
        def at_step_ends(pipe_, i, t, kwargs):
            return theirs_callback(pipe_, i, t, kwargs) if (i + 1) % order == 0 and i + 1 < evaluations else {}

        theirs = _call(pipe, parts, callback_on_step_end=at_step_ends)
        mine = _ours(pipe, parts, solver, callback=lambda info: info["x"] * 0.9 if info["i"] < 4 else None)
        assert rel(theirs, mine) < 1e-5, solver


def test_image_to_image_starts_mid_grid_as_sample_on_the_slice(parts):
    pipe = _pipeline(parts)
    for solver in ("dpmpp_2m", "heun", "euler_ancestral"):
        scheduler = DiffsamplerScheduler.from_config(pipe.scheduler.config, solver=solver, grid="karras")
        scheduler.set_timesteps(6)
        first = 2  # strength 4/6: diffusers' get_timesteps starts at step 2 and its evaluation 2 * order
        scheduler.set_begin_index(first * scheduler.order)
        clean = parts["latents"] * 0.5
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(9))
        start = scheduler.add_noise(clean, noise, scheduler.timesteps[first * scheduler.order:][:1].repeat(2))
        t = scheduler.grid[first]
        process = scheduler.process
        torch.testing.assert_close(start, process.alpha(t).float() * clean + process.sigma(t).float() * noise)
        x = start
        unet = parts["unet"]
        for ts in scheduler.timesteps[first * scheduler.order:]:
            out = unet(x, ts, encoder_hidden_states=parts["prompt"]).sample
            x = scheduler.step(out, ts, x, generator=torch.Generator().manual_seed(2)).prev_sample
        model = from_diffusers(unet, pipe.scheduler.config)
        mine = ds.sample(model, start, scheduler.grid[first:], solver, generator=torch.Generator().manual_seed(2),
                         encoder_hidden_states=parts["prompt"])
        assert rel(x, mine) < 1e-5, solver
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**_pipeline(parts).components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = DiffsamplerScheduler.from_config(img2img.scheduler.config, solver="heun", grid="karras")
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    out = img2img(prompt_embeds=parts["prompt"], negative_prompt_embeds=parts["negative"], image=image, strength=0.5,
                  num_inference_steps=6, output_type="pt", generator=torch.Generator().manual_seed(1)).images
    assert out.shape == (2, 3, 16, 16) and bool(torch.isfinite(out).all())
    # PLMS evaluates four times in its first step wherever it starts: it cannot start mid-grid
    img2img.scheduler = DiffsamplerScheduler.from_config(img2img.scheduler.config, solver="plms", grid="karras")
    with pytest.raises(ValueError, match="cannot start mid-grid"):
        img2img(prompt_embeds=parts["prompt"], negative_prompt_embeds=parts["negative"], image=image, strength=0.5,
                num_inference_steps=6, output_type="latent")


def test_the_same_seed_gives_diffusers_own_pipeline_image_with_diffusers_noise(parts):
    cases = [(diffusers.DDIMScheduler, {"clip_sample": False}, {"eta": 0.6},
              ds.solvers.get("ddim", eta=0.6)),
             (diffusers.EulerAncestralDiscreteScheduler, {}, {}, "euler_ancestral")]
    for cls, config, call_options, solver in cases:
        pipe = _pipeline(parts)
        pipe.scheduler = cls(**SD_BETAS, **config)
        common = dict(prompt_embeds=parts["prompt"], negative_prompt_embeds=parts["negative"], num_inference_steps=6,
                      guidance_scale=3.0, output_type="latent")
        theirs = pipe(generator=torch.Generator().manual_seed(21), **common, **call_options).images
        grid = ds.integrations.grid_from_scheduler(pipe.scheduler, 6)
        pipe.scheduler = DiffsamplerScheduler.from_config(pipe.scheduler.config, solver=solver, grid=grid.tolist(),
                                                          noise="diffusers")
        mine = pipe(generator=torch.Generator().manual_seed(21), **common).images
        assert rel(mine, theirs) < 1e-5, cls.__name__


def test_an_abandoned_run_ends_its_worker(parts):
    pipe = _pipeline(parts)
    scheduler = DiffsamplerScheduler.from_config(pipe.scheduler.config, solver="heun", grid="karras")
    before = threading.active_count()
    for _ in range(3):
        scheduler.set_timesteps(5)
        x = parts["latents"]
        for ts in scheduler.timesteps[:3]:  # interrupted after three evaluations
            out = parts["unet"](x, ts, encoder_hidden_states=parts["prompt"]).sample
            x = scheduler.step(out, ts, x).prev_sample
    scheduler.set_timesteps(5)
    gc.collect()
    assert threading.active_count() == before


def test_sampling_keeps_no_autograd_state_however_many_steps(parts):
    # The network's parameters require grad (as a loaded diffusers model's do): without no_grad each step
    # would keep its activations for backward, so memory would grow with the steps.
    pipe = _pipeline(parts)
    assert any(p.requires_grad for p in pipe.unet.parameters())
    model = from_diffusers(pipe.unet, pipe.scheduler.config)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    def run(steps, **options):
        saved.clear()
        grid = ds.grids.karras(model.process, steps)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ds.sample(model, parts["latents"], grid, "dpmpp_2m", encoder_hidden_states=parts["prompt"], **options)
        return out, sum(saved)

    (_, short_bytes), (long, long_bytes) = run(5), run(30)
    assert short_bytes == long_bytes == 0 and not long.requires_grad and long.grad_fn is None
    (_, with_grad_5), (_, with_grad_30) = run(5, grad=True), run(30, grad=True)
    assert with_grad_30 > 5 * with_grad_5 > 0  # what grad=False saves: activations growing with the steps


def test_bad_input_gets_a_clear_error(parts):
    config = _pipeline(parts).scheduler.config
    with pytest.raises(ValueError, match="adaptive"):
        DiffsamplerScheduler.from_config(config, solver="dpm_adaptive")
    with pytest.raises(ValueError, match="unknown keyword 'etta'"):
        DiffsamplerScheduler.from_config(config, solver="ddim", etta=0.5)
    with pytest.raises(ValueError, match="unknown solver"):
        DiffsamplerScheduler.from_config(config, solver="euler_magic")
    with pytest.raises(ValueError, match="unknown grid 'karas'"):
        DiffsamplerScheduler.from_config(config, grid="karas")
    with pytest.raises(ValueError, match="noise must be one of"):
        DiffsamplerScheduler.from_config(config, noise="numpy")
    churn = DiffsamplerScheduler.from_config(config, solver="heun", grid="karras", s_churn=10.0)
    with pytest.raises(ValueError, match=r"does not begin step \d+ with an evaluation at the step's sample"):
        churn.set_timesteps(5)
    scheduler = DiffsamplerScheduler.from_config(config, solver="heun", grid="karras")
    x = parts["latents"]
    with pytest.raises(RuntimeError, match="call set_timesteps first"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="is not the start of any step"):
        scheduler.step(x, 3.5, x)
    with pytest.raises(ValueError, match="explicit grid has 3 steps"):
        DiffsamplerScheduler.from_config(config, grid=[0.9, 0.5, 0.1, 0.0]).set_timesteps(5)


def test_sdxl_with_guidance_and_added_cond_kwargs_equals_sample(parts):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, attention_head_dim=2, cross_attention_dim=6, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=5 + 6 * 4).eval()
    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    pooled, negative_pooled = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    pipe.scheduler = DiffsamplerScheduler.from_config(scheduler.config, solver="dpmpp_2s_ancestral", grid="karras")
    theirs = pipe(prompt_embeds=parts["prompt"], negative_prompt_embeds=parts["negative"], pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=negative_pooled, latents=parts["latents"], num_inference_steps=5,
                  guidance_scale=3.0, output_type="latent", height=16, width=16,
                  generator=torch.Generator().manual_seed(6)).images
    # SDXL's micro-conditioning: original size, crop corner, target size (16, 16), (0, 0), (16, 16)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(2, 1)
    model = ds.guidance.cfg(from_diffusers(unet, scheduler), 3.0, uncond={
        "encoder_hidden_states": parts["negative"],
        "added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": time_ids}})
    mine = ds.sample(model, parts["latents"], pipe.scheduler.grid, "dpmpp_2s_ancestral",
                     generator=torch.Generator().manual_seed(6), encoder_hidden_states=parts["prompt"],
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    assert rel(theirs, mine) < 1e-5
    other = ds.sample(model, parts["latents"], pipe.scheduler.grid, "dpmpp_2s_ancestral",
                      generator=torch.Generator().manual_seed(6), encoder_hidden_states=parts["prompt"],
                      added_cond_kwargs={"text_embeds": -pooled, "time_ids": time_ids})
    assert rel(other, mine) > 1e-4  # the pooled embeddings reach the network


def test_half_precision_pipelines_sample_in_their_dtype(parts):
    # bfloat16 on CPU stands in for float16 on a GPU: the run keeps the latents' dtype throughout
    import copy
    half = {k: copy.deepcopy(v).to(torch.bfloat16) for k, v in parts.items()}
    pipe = _pipeline(half)
    pipe.scheduler = DiffsamplerScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m_sde", grid="karras")
    theirs = _call(pipe, half, steps=6)
    assert theirs.dtype == torch.bfloat16 and bool(torch.isfinite(theirs).all())
    mine = _ours(pipe, half, "dpmpp_2m_sde")
    assert mine.dtype == torch.bfloat16
    single = _pipeline(parts)
    single.scheduler = pipe.scheduler
    full = _ours(single, parts, "dpmpp_2m_sde")  # the same grid, the float32 network
    # bfloat16 round-off (8 bits of mantissa over 6 steps, guidance in another order), not another sample
    assert rel(theirs.float(), full) < 0.1 and rel(mine.float(), full) < 0.1


# -- the tiny pipelines with their text encoders (tests/tiny_pipelines.py): prompts as users pass them ----------

def test_sd3_and_flux_pipelines_run_the_adapter_and_equal_sample():
    import numpy as np
    import tiny_pipelines as tiny
    from diffsampler.integrations import grid_from_scheduler

    prompt, steps, batch = "a cat", 4, 2
    # SD3: true classifier-free guidance in the pipeline, the default grid (the scheduler's own, shifted)
    pipe = tiny.sd3()
    x = torch.randn(batch, 4, tiny.HEIGHT // 2, tiny.WIDTH // 2, generator=torch.Generator().manual_seed(0))
    source = pipe.scheduler
    pipe.scheduler = DiffsamplerScheduler.from_config(source.config, solver="dpmpp_2m")
    theirs = pipe(prompt=prompt, negative_prompt="", num_inference_steps=steps, height=tiny.HEIGHT, width=tiny.WIDTH,
                  latents=x, guidance_scale=3.0, max_sequence_length=8, num_images_per_prompt=batch,
                  output_type="latent").images
    torch.testing.assert_close(pipe.scheduler.grid, grid_from_scheduler(source, steps), rtol=0, atol=1e-12)
    text, neg_text, pooled, neg_pooled = pipe.encode_prompt(prompt, prompt, prompt, negative_prompt="",
                                                            num_images_per_prompt=batch, max_sequence_length=8,
                                                            do_classifier_free_guidance=True)
    model = ds.guidance.cfg(from_diffusers(pipe.transformer, source), 3.0,
                            uncond={"encoder_hidden_states": neg_text, "pooled_projections": neg_pooled})
    mine = ds.sample(model, x, pipe.scheduler.grid, "dpmpp_2m", encoder_hidden_states=text, pooled_projections=pooled)
    assert rel(theirs, x) > 1e-2 and rel(theirs, mine) < 1e-5
    # Flux (guidance-distilled): the pipeline passes sigmas and the token count's mu; a two-evaluation solver
    pipe = tiny.flux(guidance_embeds=True)
    packed, img_ids = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, tiny.HEIGHT, tiny.WIDTH,
                                           torch.float32, "cpu", torch.Generator().manual_seed(1))
    source = pipe.scheduler
    pipe.scheduler = DiffsamplerScheduler.from_config(source.config, solver="heun")
    theirs = pipe(prompt=prompt, num_inference_steps=steps, height=tiny.HEIGHT, width=tiny.WIDTH, latents=packed,
                  guidance_scale=3.5, max_sequence_length=8, num_images_per_prompt=batch, output_type="latent").images
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    c = source.config
    mu = calculate_shift(packed.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    expected = grid_from_scheduler(source, steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(pipe.scheduler.grid, expected, rtol=0, atol=1e-12)
    assert len(pipe.scheduler.timesteps) == 2 * steps - 1
    text, pooled, _ = pipe.encode_prompt(prompt, prompt, num_images_per_prompt=batch, max_sequence_length=8)
    mine = ds.sample(from_diffusers(pipe.transformer, source), packed, expected, "heun", encoder_hidden_states=text,
                     pooled_projections=pooled, img_ids=img_ids, guidance=torch.full((batch,), 3.5))
    assert rel(theirs, packed) > 1e-2 and rel(theirs, mine) < 1e-5


def test_prompts_img2img_and_inpainting_run_end_to_end_through_the_adapter():
    import tiny_pipelines as tiny

    for build, extra in ((tiny.sd, {}), (tiny.sd_img2img, {"image": tiny.image(), "strength": 0.6}),
                         (tiny.sd_inpaint, {"image": tiny.image(), "mask_image": tiny.mask(), "strength": 1.0})):
        pipe = build()
        for solver in ("dpmpp_2m", "dpmpp_2s_ancestral"):
            pipe.scheduler = DiffsamplerScheduler.from_config(pipe.scheduler.config, solver=solver)
            out = pipe(prompt="a cat", negative_prompt="a dog", num_inference_steps=5, height=tiny.HEIGHT,
                       width=tiny.WIDTH, output_type="pt", generator=torch.Generator().manual_seed(0), **extra).images
            assert out.shape == (1, 3, tiny.HEIGHT, tiny.WIDTH) and bool(torch.isfinite(out).all()), build.__name__
    # inpainting keeps the unmasked half: the pipeline blends the known latents back in after every step (the last
    # one with the clean latents), so there every solver ends on the same values and elsewhere they part
    pipe = tiny.sd_inpaint()
    ends = []
    for solver in ("dpmpp_2m", "heun"):
        pipe.scheduler = DiffsamplerScheduler.from_config(pipe.scheduler.config, solver=solver)
        ends.append(pipe(prompt="a cat", image=tiny.image(), mask_image=tiny.mask(), num_inference_steps=5,
                         height=tiny.HEIGHT, width=tiny.WIDTH, output_type="latent",
                         generator=torch.Generator().manual_seed(0)).images)
    half = ends[0].shape[-1] // 2
    torch.testing.assert_close(ends[0][..., half + 1:], ends[1][..., half + 1:])
    assert rel(ends[0][..., :half], ends[1][..., :half]) > 1e-3


def test_the_readmes_diffusers_recipes_run(tmp_path):
    import re
    from pathlib import Path

    import tiny_pipelines as tiny

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## diffusers pipelines and models", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    namespace = {"pipe": tiny.sd(), "path": tiny.save_sd(tmp_path / "sd"), "height": tiny.HEIGHT,
                 "width": tiny.WIDTH, "picture": tiny.image()}
    for block in blocks:
        exec(compile(block, "README.md (diffusers pipelines and models)", "exec"), namespace)  # noqa: S102
    assert namespace["image"].shape == (1, 3, tiny.HEIGHT, tiny.WIDTH)
    assert namespace["latents"].shape == (1, 4, tiny.HEIGHT // 2, tiny.WIDTH // 2)
    assert bool(torch.isfinite(namespace["latents"]).all())


def test_a_new_solver_does_not_inherit_the_old_ones_options(parts):
    config = _pipeline(parts).scheduler.config
    old = DiffsamplerScheduler.from_config(config, solver="ddim", eta=0.5)
    assert DiffsamplerScheduler.from_config(old.config).solver == ds.solvers.get("ddim", eta=0.5)
    assert DiffsamplerScheduler.from_config(old.config, solver="heun").solver == ds.solvers.get("heun")
    assert DiffsamplerScheduler.from_config(old.config, solver=ds.solvers.get("ddim", eta=1.0)).solver.eta == 1.0


def test_a_failed_or_abandoned_run_never_blocks_the_next(parts):
    scheduler = DiffsamplerScheduler.from_config(_pipeline(parts).scheduler.config, solver="heun", grid="karras")
    scheduler.set_timesteps(4)
    x = parts["latents"]
    bad = torch.full_like(x, float("nan"))
    with pytest.raises(ds.NonFiniteError):
        for ts in scheduler.timesteps:  # NaN outputs: the worker's non-finite check ends the run
            x = scheduler.step(bad, ts, x).prev_sample
    with pytest.raises(ds.NonFiniteError):  # the same evaluation again: a fresh run and its error, not a wait
        scheduler.step(bad, scheduler.timesteps[scheduler.step_index], x)
    scheduler.set_timesteps(4)
    x = parts["latents"]
    for ts in scheduler.timesteps:
        x = scheduler.step(parts["unet"](x, ts, encoder_hidden_states=parts["prompt"]).sample, ts, x).prev_sample
    assert bool(torch.isfinite(x).all())
    # a scheduler dropped mid-run (the pipeline replaced it) takes its worker with it
    before = threading.active_count()
    scheduler = DiffsamplerScheduler.from_config(_pipeline(parts).scheduler.config, solver="heun", grid="karras")
    scheduler.set_timesteps(4)
    out = parts["unet"](x := parts["latents"], scheduler.timesteps[0], encoder_hidden_states=parts["prompt"]).sample
    scheduler.step(out, scheduler.timesteps[0], x)
    assert threading.active_count() == before + 1
    del scheduler
    gc.collect()
    for _ in range(100):
        if threading.active_count() == before:
            break
        threading.Event().wait(0.01)
    assert threading.active_count() == before
