"""diffusers models as Denoisers: :func:`from_diffusers` takes a UNet, an SD3 or Flux transformer, a
pipeline or a local pipeline directory, and reads the process, prediction type, timestep mapping and
data-estimate corrections from a scheduler or its config."""

from __future__ import annotations

import inspect
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..denoiser import Denoiser, Prediction, _broadcast
from ..guidance.base import with_x0
from ..process import Flow, Process, VPDiscrete

__all__ = ["from_diffusers", "process_from_config", "diffusers_denoiser", "network_time_input", "DiffusersDenoiser", "PREDICTION_TYPES", "GRID_FLAGS",
           "SOLVER_FLAGS", "SUPPORTED_TRANSFORMERS"]

#: diffusers' ``prediction_type`` values and ours.
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}

_FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                    "FlowMatchLCMScheduler")


def _source(scheduler_or_config):
    """The scheduler (config) a model was trained with: a DiffsamplerScheduler stands for the one it was
    built from (``base_scheduler_config()``, its class name included)."""
    base = getattr(scheduler_or_config, "base_scheduler_config", None)
    return base() if callable(base) else scheduler_or_config


def _config(scheduler_or_config) -> dict:
    scheduler_or_config = _source(scheduler_or_config)
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not hasattr(config, "get"):
        raise TypeError("from_diffusers: expected a diffusers scheduler or its config (a dict), got "
                        f"{type(scheduler_or_config).__name__}")
    return dict(config)


def _is_flow(config: dict, scheduler_or_config) -> bool:
    cls = config.get("_class_name") or type(_source(scheduler_or_config)).__name__
    return cls in _FLOW_SCHEDULERS or config.get("prediction_type") == "flow_prediction"


def _betas(config: dict) -> torch.Tensor:
    n = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if config.get("trained_betas") is not None:
        return torch.as_tensor(config["trained_betas"], dtype=torch.float64)
    # float32 like diffusers: the process must be the one the network was trained on, rounding included.
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32).double()
    if kind == "scaled_linear":
        return (torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float32) ** 2).double()
    if kind == "squaredcos_cap_v2":
        def alpha_bar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float32).double()
    raise ValueError(f"from_diffusers: beta_schedule {kind!r} is not supported; supported: linear, "
                     "scaled_linear, squaredcos_cap_v2, or trained_betas")


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), algorithm 1: shift and scale sqrt(alphabar) so the last value is 0.

    Our processes need alpha > 0 everywhere, so the last node keeps a tiny alpha
    (1e-10 of the first), far below float32 resolution of the data.
    """
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    root[-1] = first * 1e-10
    return root ** 2


def process_from_config(scheduler_or_config) -> Process:
    """The process a diffusers scheduler (or its config) describes: discrete VP, or a flow."""
    config = _config(scheduler_or_config)
    if _is_flow(config, scheduler_or_config):
        return Flow()
    if config.get("rescale_betas_zero_snr"):
        return VPDiscrete(alphas_cumprod=_zero_terminal_snr(_betas(config)), name="diffusers-zero-snr")
    alphas_cumprod = getattr(scheduler_or_config, "alphas_cumprod", None)
    if alphas_cumprod is not None:
        return VPDiscrete(alphas_cumprod=alphas_cumprod.to(torch.float64), name="diffusers")
    return VPDiscrete(alphas_cumprod=torch.cumprod(1 - _betas(config).float(), 0).double(), name="diffusers")


# --------------------------------------------------------------------------------------------------
# Networks: how each kind is called.

#: The transformers we know the call of; any other module is called as a UNet, ``net(x, timestep, **cond)``.
SUPPORTED_TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel")

_SUPPORTED_KINDS = ("a diffusers UNet (UNet2DModel, UNet2DConditionModel; any unet must be a torch.nn.Module "
                    "with their call net(x, timestep, **cond)); " + " or ".join(SUPPORTED_TRANSFORMERS) +
                    "; a diffusers pipeline holding one of these as .unet or .transformer; or a local "
                    "pipeline directory (str or pathlib.Path)")

# Schedulers whose own preconditioning (c_in, c_noise, c_out in sigma) we do not reproduce.
_EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler")


def _net_dtype(net: torch.nn.Module) -> torch.dtype:
    param = next(net.parameters(), None)
    return param.dtype if param is not None else torch.float32


def _unet_network(unet: torch.nn.Module, net_dtype: torch.dtype) -> Callable:
    time_dtype = net_dtype if net_dtype.is_floating_point else torch.float32

    def network(x: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        out = unet(x.to(net_dtype), timestep.to(time_dtype), **cond)
        return getattr(out, "sample", out)

    return network


def _sd3_network(transformer: torch.nn.Module, net_dtype: torch.dtype) -> Callable:
    def network(x: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        return transformer(hidden_states=x.to(net_dtype), timestep=timestep.to(net_dtype), return_dict=False,
                           **cond)[0]

    return network


def _flux_network(transformer: torch.nn.Module, net_dtype: torch.dtype) -> Callable:
    distilled = bool(getattr(transformer.config, "guidance_embeds", False))

    def network(x: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        if cond.get("img_ids") is None:
            raise ValueError("from_diffusers: FluxTransformer2DModel needs img_ids= (the packed latents' positions, "
                             "shape (tokens, 3): the second output of pipe.prepare_latents)")
        if distilled and cond.get("guidance") is None:
            raise ValueError("from_diffusers: this FluxTransformer2DModel is guidance-distilled (guidance_embeds=True) "
                             "and needs guidance= (a tensor of shape (batch,), e.g. torch.full((batch,), 3.5))")
        if cond.get("txt_ids") is None and cond.get("encoder_hidden_states") is not None:
            # FluxPipeline's text positions are always zeros, one row per text token.
            text = cond["encoder_hidden_states"]
            cond["txt_ids"] = text.new_zeros(text.shape[1], 3)
        for ids in ("img_ids", "txt_ids"):
            # Guidance transforms concatenate conditioning along the batch: positions given per sample
            # (batch, tokens, 3) are the same for every sample, so one row of them is the transformer's.
            if cond[ids].ndim == 3:
                cond[ids] = cond[ids][0]
        return transformer(hidden_states=x.to(net_dtype), timestep=timestep.to(net_dtype), return_dict=False,
                           **cond)[0]

    return network


def _network(net: torch.nn.Module) -> tuple[Callable, str]:
    """The call of ``net`` as ``fn(x, time_input, **cond) -> output`` and its kind ("unet", "sd3", "flux")."""
    kind = type(net).__name__
    if kind == "SD3Transformer2DModel":
        return _sd3_network(net, _net_dtype(net)), "sd3"
    if kind == "FluxTransformer2DModel":
        return _flux_network(net, _net_dtype(net)), "flux"
    forward = getattr(net, "forward", None)
    first = next(iter(inspect.signature(forward).parameters), None) if forward is not None else None
    if first == "hidden_states" and kind.endswith(("Transformer2DModel", "TransformerModel", "Transformer3DModel")):
        # A transformer with keyword inputs: a positional call would hand it the wrong arguments silently.
        raise TypeError(f"from_diffusers: {kind} is not supported; supported: {_SUPPORTED_KINDS}")
    return _unet_network(net, _net_dtype(net)), "unet"


# --------------------------------------------------------------------------------------------------
# Scheduler flags.

#: Flags of the grid a scheduler steps through: ``grid_from_scheduler(model.scheduler, steps)``'s business.
GRID_FLAGS = ("timestep_spacing", "steps_offset", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
              "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
              "shift_terminal", "time_shift_type", "final_sigmas_type", "set_alpha_to_one", "interpolation_type",
              "sigma_min", "sigma_max", "use_flow_sigmas", "flow_shift", "lambda_min_clipped", "invert_sigmas",
              "original_inference_steps", "skip_prk_steps")

#: Flags that choose the solver, not the model (see :func:`from_diffusers` for our equivalents).
SOLVER_FLAGS = ("algorithm_type", "solver_order", "solver_type", "lower_order_final", "use_lu_lambdas",
                "euler_at_final", "predict_x0", "solver_p", "disable_corrector", "predictor_order",
                "corrector_order", "tau_func", "stochastic_sampling", "variance_type")


def _scheduler_class(scheduler_or_config):
    """The diffusers scheduler class behind a scheduler or a config (``_class_name``), or None if unknown."""
    scheduler_or_config = _source(scheduler_or_config)
    if not isinstance(scheduler_or_config, dict):  # (diffusers' FrozenDict config is a dict)
        return type(scheduler_or_config)
    name = scheduler_or_config.get("_class_name")
    if not name:
        return None
    import diffusers

    return getattr(diffusers, name, None)


def _uses(cls, flag: str) -> bool:
    """Whether the scheduler class reads ``flag``. A config of unknown class is taken at its word; a
    scheduler made ``from_config`` of another keeps that one's flags in its config without using them."""
    return cls is None or flag in inspect.signature(cls.__init__).parameters


def _lcm_boundary(process: Process, config: dict) -> Callable:
    """LCM's boundary condition (Luo et al. 2023, eq. 9 of Song et al. 2023): the scheduler mixes the
    network's data estimate with the sample, ``x0 <- c_out x0 + c_skip x``, at the training timestep
    scaled by ``timestep_scaling`` (sigma_data = 0.5, as diffusers' LCMScheduler fixes it)."""
    scaling = float(config.get("timestep_scaling", 10.0))
    sigma_data = 0.5

    def correct(pred: Prediction, x: torch.Tensor, t) -> Prediction:
        scaled = torch.as_tensor(process.time_input(t), dtype=torch.float64) * scaling
        denominator = (scaled ** 2 + sigma_data ** 2).sqrt()
        c_skip, c_out = sigma_data ** 2 / denominator ** 2, scaled / denominator
        x0 = pred.x0 * _broadcast(c_out, x) + x * _broadcast(c_skip, x)
        return with_x0(x0, x, process, t)

    return correct


class DiffusersDenoiser(Denoiser):
    """A :class:`~diffsampler.Denoiser` built by :func:`from_diffusers`.

    Besides a Denoiser's attributes it carries ``scheduler`` (the scheduler object or config it was built
    from: ``grid_from_scheduler(model.scheduler, steps)`` is its grid), ``pipeline`` (the pipeline it came
    from, or None), ``module`` (the network) and ``corrections``: the scheduler's data-estimate corrections
    (``clip_sample``, ``thresholding``, LCM's boundary condition), each ``(pred, x, t) -> pred``, applied
    in order to every answer.
    """

    def __init__(self, fn, process, prediction, *, scheduler, module, pipeline=None, corrections=(), **kwargs):
        super().__init__(fn, process, prediction, **kwargs)
        self.scheduler, self.module, self.pipeline = scheduler, module, pipeline
        self.corrections = tuple(corrections)

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        pred = super().__call__(x, t, **cond)
        for correct in self.corrections:
            pred = correct(pred, x, t)
        return pred


def _corrections(model: DiffusersDenoiser, config: dict, cls) -> list:
    """The data-estimate corrections the scheduler applies in its step, as diffusers orders them:
    thresholding, else clipping, then LCM's boundary condition; and a warning for each flag that
    changes the math and that we do not apply."""
    from ..guidance.thresholding import clip_x0, dynamic_threshold

    out = []
    if config.get("thresholding") and _uses(cls, "thresholding"):
        # Saharia et al. 2022 (Imagen, arXiv:2205.11487, section 2.3), as diffusers' _threshold_sample.
        threshold = dynamic_threshold(model, float(config.get("dynamic_thresholding_ratio", 0.995)),
                                      float(config.get("sample_max_value", 1.0)))
        out.append(threshold.transform)
    elif config.get("clip_sample") and _uses(cls, "clip_sample"):
        out.append(clip_x0(model, float(config.get("clip_sample_range", 1.0))).transform)
    name = getattr(cls, "__name__", "")
    if name == "LCMScheduler":
        out.append(_lcm_boundary(model.process, config))
    if config.get("timestep_type") == "continuous" and _uses(cls, "timestep_type"):
        warnings.warn("from_diffusers: scheduler flag timestep_type='continuous' is ignored (the network "
                      "receives the training timestep, not 0.25 log sigma)", UserWarning, stacklevel=3)
    if name == "DDPMScheduler" and str(config.get("variance_type", "")).startswith("learned"):
        warnings.warn(f"from_diffusers: scheduler flag variance_type={config['variance_type']!r} is ignored: the "
                      "learned variance channels are dropped and the solver's own noise is used",
                      UserWarning, stacklevel=3)
    return out


# --------------------------------------------------------------------------------------------------
# Inputs: a module, a pipeline, a directory.

def _is_pipeline(obj) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover - diffusers is needed for pipelines only
        return False
    return isinstance(obj, DiffusionPipeline)


def _pipeline_network(pipe) -> torch.nn.Module:
    for attribute in ("unet", "transformer"):
        net = getattr(pipe, attribute, None)
        if isinstance(net, torch.nn.Module):
            return net
    raise TypeError(f"from_diffusers: the pipeline {type(pipe).__name__} has no .unet or .transformer network; "
                    f"supported: {_SUPPORTED_KINDS}")


def _load_directory(path: Path):
    """A pipeline from a local directory (``model_index.json``), offline."""
    if not path.is_dir():
        raise FileNotFoundError(f"from_diffusers: the path {str(path)!r} is not a directory; expected a local "
                                "pipeline directory (with model_index.json, as save_pretrained writes it)")
    if not (path / "model_index.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:12]
        raise FileNotFoundError(f"from_diffusers: no model in {str(path)!r}: expected a pipeline directory with "
                                f"model_index.json and a unet/ or transformer/ folder; it holds {found}")
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, local_files_only=True)


def from_diffusers(model, scheduler_or_config=None, *, prediction: str | None = None,
                   null: Callable[[dict], dict] | None = None) -> DiffusersDenoiser:
    """A Denoiser for a diffusers network, read with the scheduler it was trained with.

    Parameters
    ----------
    model:
        One of

        * a UNet (``UNet2DModel``, ``UNet2DConditionModel``) or any module with their call
          ``net(x, timestep, **cond)``; the conditioning keywords given to ``sample`` reach it
          (``encoder_hidden_states=``, ``class_labels=``, SDXL's ``added_cond_kwargs=``);
        * ``SD3Transformer2DModel``: called ``net(hidden_states=x, timestep=1000 t, **cond)``; pass
          ``encoder_hidden_states=`` and ``pooled_projections=``;
        * ``FluxTransformer2DModel``: called with ``timestep=t`` in [0, 1] (Flux's pipeline divides its
          timesteps by 1000; the transformer multiplies back). It works on *packed* latents, shape
          ``(batch, tokens, 4 channels)``, and so does the Denoiser: ``x`` and the samples are packed.
          Pass ``encoder_hidden_states=`` (T5), ``pooled_projections=`` (CLIP), ``img_ids=`` (the
          latents' positions), ``guidance=`` for guidance-distilled models (Flux.1-dev), and
          optionally ``txt_ids=`` (zeros by default, as the pipeline's). Positions may be given
          per sample, ``(batch, tokens, 3)`` (one row is used), so that guidance transforms can
          batch them;
        * a diffusers pipeline holding one of these as ``.unet`` or ``.transformer``; its scheduler
          is used unless ``scheduler_or_config`` is given;
        * a local pipeline directory (``str`` or ``pathlib.Path``, with ``model_index.json``), loaded
          offline with ``DiffusionPipeline.from_pretrained``; the pipeline is ``model.pipeline``.
    scheduler_or_config:
        The scheduler (or its config dict) the network was trained with; required for a bare module.
        It fixes the process (betas, ``rescale_betas_zero_snr``, flow), the prediction type and the
        network's time input (the training timestep ``N t - 1`` for discrete VP; ``1000 t`` for flows).
    prediction:
        Overrides the scheduler's ``prediction_type`` (one of ``"eps"``, ``"v"``, ``"x0"``, ``"velocity"``).
    null:
        Maps the conditioning keywords to those of the unconditional pass (classifier-free guidance).

    Returns
    -------
    DiffusersDenoiser
        A Denoiser carrying ``model.scheduler``: the grid diffusers would step through is
        ``ds.integrations.grid_from_scheduler(model.scheduler, steps)``.

    Notes
    -----
    **Scheduler flags.** Those that change the model's answer are applied here: ``prediction_type``,
    ``rescale_betas_zero_snr``, ``thresholding`` (Imagen's dynamic thresholding, Saharia et al. 2022,
    with ``dynamic_thresholding_ratio`` and ``sample_max_value``) or else ``clip_sample`` (with
    ``clip_sample_range``) on the data estimate, the noise estimate re-derived from it, and
    LCMScheduler's boundary condition (``timestep_scaling``). diffusers' DDIM clips the data estimate
    but by default keeps the network's noise estimate for its direction term; ours equals its
    ``step(..., use_clipped_model_output=True)``, which every other scheduler's clipping also is.
    Under classifier-free guidance diffusers corrects the *guided* estimate: build the Denoiser from
    a config without the flag and wrap the guided model, ``clip_x0(cfg(model, 7.5), 1.0)``
    (:mod:`diffsampler.guidance`). Flags of the grid (``timestep_spacing``, ``steps_offset``, the
    Karras / exponential / beta sigmas, ``shift`` and dynamic shifting, ``final_sigmas_type``,
    ``set_alpha_to_one``, ...: :data:`GRID_FLAGS`) belong to ``grid_from_scheduler``. A flag that
    changes the math and is not applied (``timestep_type="continuous"``, DDPM's learned variance) gives
    one ``UserWarning`` naming it and its value. EDM-preconditioned schedulers are refused.

    **Solver flags** (:data:`SOLVER_FLAGS`) are a choice of our solver, not of the model. The
    matching solvers (``ds.sample(model, x, grid, name, **options)``):

    ============================================================  ======================================
    diffusers scheduler (configuration)                           diffsampler solver and options
    ============================================================  ======================================
    DDIMScheduler (``eta``)                                       ``"ddim"`` (``eta=``)
    DDPMScheduler                                                 ``"ddpm"``
    EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler       ``"euler"``
    EulerAncestralDiscreteScheduler                               ``"euler_ancestral"``
    HeunDiscreteScheduler, FlowMatchHeunDiscreteScheduler         ``"heun"``
    KDPM2DiscreteScheduler / KDPM2AncestralDiscreteScheduler      ``"dpm_2"`` / ``"dpm_2_ancestral"``
    LMSDiscreteScheduler                                          ``"lms"``
    PNDMScheduler (``skip_prk_steps=True`` / ``False``)           ``"plms"`` / ``"pndm"``
    DPMSolverMultistep ``algorithm_type="dpmsolver++"``           ``"dpmpp_2m"`` (``solver_order=2``),
                                                                  ``"dpmpp_3m"`` (3); ``solver_type``,
                                                                  ``lower_order_final`` alike
    DPMSolverMultistep ``"dpmsolver"``                            ``"dpm_solver"`` (``solver_order=``)
    DPMSolverMultistep ``"sde-dpmsolver++"``                      ``"dpmpp_2m_sde"`` / ``"dpmpp_3m_sde"``
    DPMSolverMultistep ``use_lu_lambdas=True``                    the same on ``grids.logsnr``
    DPMSolverSinglestep ``"dpmsolver++"`` / ``"dpmsolver"``       ``"dpmpp_singlestep"`` /
                                                                  ``"dpm_solver_singlestep"``
    UniPCMultistep (``solver_type="bh1"``/``"bh2"``,              ``"unipc"`` (``variant=``,
    ``disable_corrector``, ``solver_order``)                      ``corrector=``, ``solver_order=``)
    DEISMultistepScheduler                                        ``"deis"``
    SASolverScheduler                                             ``"sa_solver"`` (``predictor_order``,
                                                                  ``corrector_order``)
    LCMScheduler                                                  ``"lcm"``
    IPNDMScheduler                                                ``"ipndm"``
    ============================================================  ======================================

    **Recipe, a pipeline's own conditioning.** The conditioning keywords are the network's::

        pipe = StableDiffusionPipeline.from_pretrained(path)
        model = ds.integrations.from_diffusers(pipe)
        cond, uncond = pipe.encode_prompt("a cat", "cpu", 1, True, negative_prompt="blurry")
        guided = ds.guidance.cfg(model, 7.5, uncond={"encoder_hidden_states": uncond})
        grid = ds.integrations.grid_from_scheduler(model.scheduler, 30)
        latents = ds.sample(guided, x, grid, "dpmpp_2m", encoder_hidden_states=cond)
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample

    SD3: ``c, nc, pooled, npooled = pipe.encode_prompt(prompt, prompt, prompt)`` and the keywords
    ``encoder_hidden_states=c, pooled_projections=pooled``; decode ``latents / scaling_factor +
    shift_factor``. Flux: ``c, pooled, text_ids = pipe.encode_prompt(prompt, prompt)``,
    ``x, img_ids = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, height, width,
    c.dtype, device, generator)`` (packed noise and positions), the keywords
    ``encoder_hidden_states=c, pooled_projections=pooled, img_ids=img_ids`` (and ``guidance=``); unpack
    the result with ``pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)`` before
    decoding as SD3's.
    """
    pipeline = None
    if isinstance(model, (str, os.PathLike)):
        model = _load_directory(Path(model))
    if _is_pipeline(model):
        pipeline, net = model, _pipeline_network(model)
        if scheduler_or_config is None:
            scheduler_or_config = getattr(pipeline, "scheduler", None)
        if scheduler_or_config is None:
            raise ValueError(f"from_diffusers: the pipeline {type(pipeline).__name__} has no scheduler; pass "
                             "scheduler_or_config= (the scheduler the network was trained with)")
    elif isinstance(model, torch.nn.Module):
        net = model
        if scheduler_or_config is None:
            raise TypeError(f"from_diffusers: a bare {type(net).__name__} needs scheduler_or_config= (the scheduler "
                            "or its config the network was trained with)")
    else:
        raise TypeError(f"from_diffusers: model must be {_SUPPORTED_KINDS}; got {type(model).__name__}")
    fn, kind = _network(net)
    process = process_from_config(scheduler_or_config)
    if kind != "unet" and not isinstance(process, Flow):
        cls = _scheduler_class(scheduler_or_config)
        raise ValueError(f"from_diffusers: {type(net).__name__} is a flow-matching transformer; its scheduler must be "
                         "a flow one (FlowMatchEulerDiscreteScheduler, or prediction_type='flow_prediction'), got "
                         f"{getattr(cls, '__name__', None) or _config(scheduler_or_config).get('_class_name') or 'a discrete-VP config'}")
    fn.module = net  # for hooks that need the module itself (perturbed-attention guidance)
    # Flux's transformer takes the flow's own time t in [0, 1]; the others their scheduler's timestep.
    return diffusers_denoiser(fn, scheduler_or_config, prediction=prediction, null=null, name=type(net).__name__,
                              module=net, pipeline=pipeline,
                              time_input=(lambda t: t) if kind == "flux" else None)


def network_time_input(process: Process, config: dict) -> Callable:
    """The timestep a diffusers scheduler hands its network at process time ``t``: ``N t`` for flows
    (``sigma * num_train_timesteps``), the training timestep ``N t - 1`` for discrete VP."""
    if isinstance(process, Flow):
        scale = float(config.get("num_train_timesteps", 1000))
        return lambda t: t * scale
    return process.time_input


def diffusers_denoiser(fn: Callable, scheduler_or_config, *, prediction: str | None = None,
                       time_input: Callable | None = None, null: Callable[[dict], dict] | None = None,
                       name: str | None = None, module=None, pipeline=None,
                       corrections: tuple | None = None) -> DiffusersDenoiser:
    """The Denoiser of a network ``fn(x, timestep, **cond)`` read with a diffusers scheduler: the process,
    the prediction type, the time input (default :func:`network_time_input`) and the scheduler's
    data-estimate corrections (``corrections`` reuses those of an earlier call, without its warnings).
    :func:`from_diffusers` and the scheduler adapter both build theirs here."""
    config = _config(scheduler_or_config)
    cls = _scheduler_class(scheduler_or_config)
    if getattr(cls, "__name__", None) in _EDM_SCHEDULERS:
        raise ValueError(f"from_diffusers: {cls.__name__} (EDM preconditioning in sigma) is not supported; "
                         "supported: the discrete-VP schedulers (DDIM, DDPM, Euler, DPM-Solver, UniPC, ...) and "
                         "the flow-matching ones")
    process = process_from_config(scheduler_or_config)
    if prediction is None:
        kind = config.get("prediction_type") or ("flow_prediction" if isinstance(process, Flow) else "epsilon")
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"from_diffusers: prediction_type {kind!r} is not one of {sorted(PREDICTION_TYPES)}")
        prediction = PREDICTION_TYPES[kind]
    if str(config.get("variance_type", "")).startswith("learned"):
        fn = _mean_channels(fn)
    denoiser = DiffusersDenoiser(fn, process, prediction, time_input=time_input or network_time_input(process, config),
                                 null=null, name=name, scheduler=scheduler_or_config, module=module, pipeline=pipeline)
    denoiser.corrections = tuple(_corrections(denoiser, config, cls)) if corrections is None else tuple(corrections)
    return denoiser


def _mean_channels(fn: Callable) -> Callable:
    """A network with a learned variance (``variance_type="learned*"``) answers twice the channels: the
    prediction, then the variance; keep the prediction, as diffusers' schedulers do."""
    def network(x: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        out = fn(x, timestep, **cond)
        return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out

    return network

