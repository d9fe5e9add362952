"""Tiny random-weight diffusers pipelines, built from configs offline, for tests.

Each builder returns a *fresh* pipeline object with its own scheduler (a test may replace
``pipe.scheduler`` or change its config freely), assembled from network components that are built
once per process and shared: treat ``pipe.unet`` / ``pipe.transformer`` / the text encoders / the VAE
as read-only (``copy.deepcopy`` one before changing its weights, dtype or attention processors).
Every network is in eval mode with ``requires_grad`` off, as a user's loaded pipeline is in use.

The shapes are the real architectures' shapes, only narrow: Stable Diffusion's UNet with cross
attention, SDXL's two text encoders and ``"text_time"`` added conditioning, SD3's joint transformer
with two CLIP encoders and a T5, Flux's packed-latent transformer with CLIP + T5. Each runs
``pipe(prompt="a cat", num_inference_steps=3, height=HEIGHT, width=WIDTH, output_type="latent")`` on
one CPU core in well under a second; ``HEIGHT`` / ``WIDTH`` below are sizes every builder accepts.

Tokenizers are built in code from a hand-written vocabulary (no download): a byte-level BPE CLIP
tokenizer whose vocabulary is the 256 byte symbols (each also as a word end) plus a few merges, and a
T5 (unigram) tokenizer over the letters and a few words.

Builders: :func:`sd`, :func:`sd_img2img`, :func:`sd_inpaint`, :func:`sdxl`, :func:`sd3`, :func:`flux`;
:func:`save_sd` writes the SD pipeline to a local directory; :func:`image` and :func:`mask` give inputs
for img2img and inpainting.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import transformers  # noqa: E402

__all__ = ["sd", "sd_img2img", "sd_inpaint", "sdxl", "sd3", "flux", "save_sd", "image", "mask",
           "HEIGHT", "WIDTH", "SD_SCHEDULER_CONFIG", "clip_tokenizer", "t5_tokenizer"]

#: An image size every builder accepts (SD checks multiples of 8; the latents are a quarter of it or less).
HEIGHT = WIDTH = 16

#: Stable Diffusion 1.x's scheduler configuration (its ``scheduler_config.json``, PNDM's defaults aside).
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
}

#: SD3's scheduler: a flow with a fixed shift of 3.
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}

#: Flux.1-dev's scheduler: the shift depends on the image's token count (``mu``, dynamic shifting).
FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}

_TEXT_WIDTH = 32  # hidden size of every tiny text encoder
_CLIP_LENGTH = 77  # CLIP's context length: the pipelines pad prompts to tokenizer.model_max_length


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE writes bytes as (GPT-2's table, as CLIP uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@functools.lru_cache(maxsize=None)
def clip_tokenizer() -> transformers.CLIPTokenizer:
    """A CLIP tokenizer over a hand-written byte-level vocabulary: every byte is a token, so any prompt
    encodes; the merges make ``"cat"`` and ``"dog"`` one token each (exercising BPE)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
    for symbol in _byte_symbols():
        vocab[symbol + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_LENGTH)


@functools.lru_cache(maxsize=None)
def t5_tokenizer() -> transformers.T5Tokenizer:
    """A T5 (unigram) tokenizer over the lowercase letters and a few whole words."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(letter, -3.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [("▁" + word, -1.0) for word in ("a", "cat", "dog", "photo", "of")]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_config(projection_dim: int = _TEXT_WIDTH) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=len(clip_tokenizer()), hidden_size=_TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=_CLIP_LENGTH, projection_dim=projection_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu", layer_norm_eps=1e-5)


def _clip(seed: int, with_projection: bool = False):
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return _frozen(cls(_clip_config()))


def _t5(seed: int) -> transformers.T5EncoderModel:
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=len(t5_tokenizer()), d_model=_TEXT_WIDTH, d_kv=8, d_ff=37,
                                   num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _frozen(transformers.T5EncoderModel(config))


def _vae(latent_channels: int, seed: int, **config) -> diffusers.AutoencoderKL:
    """A two-level VAE (latents at half the image size); ``config`` adds SD3/Flux's shift and scale."""
    torch.manual_seed(seed)
    return _frozen(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=2, sample_size=HEIGHT, **config))


def _unet(in_channels: int, cross_attention_dim: int, seed: int, **config) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(seed)
    return _frozen(diffusers.UNet2DConditionModel(
        sample_size=HEIGHT // 2, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4, attention_head_dim=2,
        cross_attention_dim=cross_attention_dim, **config))


@functools.lru_cache(maxsize=None)
def _sd_components(in_channels: int) -> dict:
    return {"vae": _vae(4, seed=1), "text_encoder": _clip(seed=2), "tokenizer": clip_tokenizer(),
            "unet": _unet(in_channels, _TEXT_WIDTH, seed=3)}


def _sd_scheduler(scheduler: str, prediction_type: str, **config):
    if not hasattr(diffusers, scheduler):
        raise ValueError(f"tiny_pipelines: scheduler {scheduler!r} is not a diffusers scheduler class name")
    return getattr(diffusers, scheduler).from_config({**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type,
                                                      **config})


def _sd_like(cls, in_channels: int, prediction_type: str, scheduler: str, scheduler_config: dict):
    return cls(**_sd_components(in_channels), scheduler=_sd_scheduler(scheduler, prediction_type, **scheduler_config),
               safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def sd(prediction_type: str = "epsilon", scheduler: str = "PNDMScheduler",
       **scheduler_config) -> diffusers.StableDiffusionPipeline:
    """A Stable Diffusion 1.x text-to-image pipeline: UNet2DConditionModel (4 latent channels, cross
    attention on a 32-wide CLIP text encoder), AutoencoderKL, and the scheduler class ``scheduler`` with
    SD's beta configuration, ``prediction_type`` and ``scheduler_config`` on top (e.g.
    ``scheduler="DDIMScheduler", clip_sample=True``). No safety checker."""
    return _sd_like(diffusers.StableDiffusionPipeline, 4, prediction_type, scheduler, scheduler_config)


def sd_img2img(prediction_type: str = "epsilon", scheduler: str = "PNDMScheduler",
               **scheduler_config) -> diffusers.StableDiffusionImg2ImgPipeline:
    """:func:`sd`'s components as an image-to-image pipeline (``image=``, ``strength=``); see :func:`image`."""
    return _sd_like(diffusers.StableDiffusionImg2ImgPipeline, 4, prediction_type, scheduler, scheduler_config)


def sd_inpaint(prediction_type: str = "epsilon", scheduler: str = "PNDMScheduler",
               **scheduler_config) -> diffusers.StableDiffusionInpaintPipeline:
    """:func:`sd`'s components as an inpainting pipeline (``image=``, ``mask_image=``). The UNet has 4 input
    channels, so the pipeline takes its blending path (it re-noises the known region to each step's time
    and pastes it in), not the 9-channel inpainting UNet's."""
    return _sd_like(diffusers.StableDiffusionInpaintPipeline, 4, prediction_type, scheduler, scheduler_config)


def image(seed: int = 0) -> torch.Tensor:
    """A random ``(1, 3, HEIGHT, WIDTH)`` image in [0, 1], the pipelines' ``image=`` input."""
    return torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def mask() -> torch.Tensor:
    """A ``(1, 1, HEIGHT, WIDTH)`` inpainting mask: 1 (repaint) on the left half, 0 (keep) on the right."""
    out = torch.zeros(1, 1, HEIGHT, WIDTH)
    out[..., : WIDTH // 2] = 1.0
    return out


@functools.lru_cache(maxsize=None)
def _sdxl_components() -> dict:
    time_embed_dim = 8
    # "text_time" embeds the 6 micro-conditioning numbers (original size, crop, target size) and adds
    # the second encoder's pooled projection: 6 * 8 + 32 inputs.
    unet = _unet(4, 2 * _TEXT_WIDTH, seed=13, addition_embed_type="text_time",
                 addition_time_embed_dim=time_embed_dim,
                 projection_class_embeddings_input_dim=6 * time_embed_dim + _TEXT_WIDTH, use_linear_projection=True)
    return {"vae": _vae(4, seed=11), "text_encoder": _clip(seed=12), "text_encoder_2": _clip(14, with_projection=True),
            "tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer(), "unet": unet}


def sdxl(prediction_type: str = "epsilon", scheduler: str = "EulerDiscreteScheduler",
         **scheduler_config) -> diffusers.StableDiffusionXLPipeline:
    """A Stable Diffusion XL text-to-image pipeline: a UNet with cross attention on the two text encoders'
    concatenated hidden states (64 wide) and ``addition_embed_type="text_time"`` (the pipeline passes
    ``added_cond_kwargs={"text_embeds": pooled, "time_ids": ...}``), two CLIP encoders (the second with a
    projection), SDXL's Euler scheduler configuration (``timestep_spacing="leading"``). No watermarker."""
    sched = _sd_scheduler(scheduler, prediction_type, **{"timestep_spacing": "leading", "interpolation_type": "linear",
                                                         **scheduler_config})
    return diffusers.StableDiffusionXLPipeline(**_sdxl_components(), scheduler=sched, add_watermarker=False)


@functools.lru_cache(maxsize=None)
def _sd3_components(with_t5: bool) -> dict:
    torch.manual_seed(21)
    transformer = _frozen(diffusers.SD3Transformer2DModel(
        sample_size=HEIGHT // 2, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=_TEXT_WIDTH,
        pooled_projection_dim=2 * _TEXT_WIDTH))
    return {"transformer": transformer, "vae": _vae(4, seed=22, shift_factor=0.0609, scaling_factor=1.5035),
            "text_encoder": _clip(23, with_projection=True), "tokenizer": clip_tokenizer(),
            "text_encoder_2": _clip(24, with_projection=True), "tokenizer_2": clip_tokenizer(),
            "text_encoder_3": _t5(25) if with_t5 else None, "tokenizer_3": t5_tokenizer() if with_t5 else None}


def sd3(with_t5: bool = True, **scheduler_config) -> diffusers.StableDiffusion3Pipeline:
    """A Stable Diffusion 3 pipeline: SD3Transformer2DModel (joint attention, ``pooled_projections`` from the
    two CLIP encoders' projections, 64 wide), two CLIP encoders with projections, a tiny T5 (or none:
    ``with_t5=False``, the pipeline then uses zeros for its tokens), and FlowMatchEulerDiscreteScheduler
    with SD3's ``shift=3`` (``scheduler_config`` on top). Pass ``max_sequence_length=`` small (e.g. 8) to
    keep the T5 part short."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config({**SD3_SCHEDULER_CONFIG, **scheduler_config})
    return diffusers.StableDiffusion3Pipeline(**_sd3_components(with_t5), scheduler=sched)


@functools.lru_cache(maxsize=None)
def _flux_components(guidance_embeds: bool) -> dict:
    torch.manual_seed(31)
    # 1 latent channel packed in 2x2 patches: the transformer sees 4 channels per token.
    transformer = _frozen(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=_TEXT_WIDTH, pooled_projection_dim=_TEXT_WIDTH, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds))
    return {"transformer": transformer, "vae": _vae(1, seed=32, shift_factor=0.0609, scaling_factor=1.5035),
            "text_encoder": _clip(seed=33), "tokenizer": clip_tokenizer(), "text_encoder_2": _t5(34),
            "tokenizer_2": t5_tokenizer()}


def flux(guidance_embeds: bool = False, **scheduler_config) -> diffusers.FluxPipeline:
    """A Flux.1 pipeline: FluxTransformer2DModel on packed latents (1 latent channel, 2x2 patches: tokens of
    4 channels, with ``img_ids`` / ``txt_ids`` positions), a CLIP encoder (pooled projection) and a tiny T5
    (token embeddings), and FlowMatchEulerDiscreteScheduler with Flux's dynamic shifting. With
    ``guidance_embeds=True`` the transformer is guidance-distilled (Flux.1-dev: ``guidance=`` input).
    Pass ``max_sequence_length=`` small (e.g. 8) to keep the T5 part short."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config({**FLUX_SCHEDULER_CONFIG, **scheduler_config})
    return diffusers.FluxPipeline(**_flux_components(guidance_embeds), scheduler=sched)


def save_sd(path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`sd` (``kwargs`` as there) to the directory ``path`` with ``save_pretrained`` (a local
    pipeline directory as users download one: ``model_index.json``, ``unet/``, ``scheduler/``, ...)."""
    path = Path(path)
    sd(**kwargs).save_pretrained(path, safe_serialization=True)
    return path
