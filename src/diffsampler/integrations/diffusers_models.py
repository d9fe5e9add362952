"""diffusers models as Denoisers: :func:`from_diffusers` reads the process, prediction type and
timestep mapping from a scheduler or its config."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..denoiser import Denoiser
from ..process import Flow, Process, VPDiscrete

__all__ = ["from_diffusers", "process_from_config", "PREDICTION_TYPES"]

#: diffusers' ``prediction_type`` values and ours.
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}

_FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                    "FlowMatchLCMScheduler")


def _config(scheduler_or_config) -> dict:
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not hasattr(config, "get"):
        raise TypeError("from_diffusers: expected a diffusers scheduler or its config (a dict), got "
                        f"{type(scheduler_or_config).__name__}")
    return dict(config)


def _is_flow(config: dict, scheduler_or_config) -> bool:
    cls = config.get("_class_name") or type(scheduler_or_config).__name__
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


def from_diffusers(unet: torch.nn.Module, scheduler_or_config, *, prediction: str | None = None,
                   null: Callable[[dict], dict] | None = None) -> Denoiser:
    """A Denoiser for a diffusers UNet trained with ``scheduler_or_config``.

    The network is called as ``unet(x, timestep, **cond).sample``: pass
    ``encoder_hidden_states=`` (``UNet2DConditionModel``) or ``class_labels=`` to
    ``sample``. Discrete VP models receive the training timestep (``N t - 1``,
    integer on grids built from the scheduler's own timesteps); flow models
    receive ``1000 t`` (diffusers' ``sigma * num_train_timesteps``; a flow's
    ``shift`` is a grid choice here, :func:`diffsampler.grids.shift`). The network
    runs in its own dtype; samples may be kept in another.
    """
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"from_diffusers: unet must be a torch.nn.Module, got {type(unet).__name__}")
    config = _config(scheduler_or_config)
    process = process_from_config(scheduler_or_config)
    if prediction is None:
        kind = config.get("prediction_type", "flow_prediction" if isinstance(process, Flow) else "epsilon")
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"from_diffusers: prediction_type {kind!r} is not one of {sorted(PREDICTION_TYPES)}")
        prediction = PREDICTION_TYPES[kind]
    if isinstance(process, Flow):
        scale = float(config.get("num_train_timesteps", 1000))
        time_input = lambda t: t * scale  # noqa: E731
    else:
        time_input = None
    param = next(unet.parameters(), None)
    net_dtype = param.dtype if param is not None else torch.float32

    def network(x: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        out = unet(x.to(net_dtype), timestep.to(net_dtype if net_dtype.is_floating_point else torch.float32),
                   **cond)
        return getattr(out, "sample", out)

    network.module = unet  # for hooks that need the module itself (perturbed-attention guidance)
    return Denoiser(network, process, prediction, time_input=time_input, null=null,
                    name=type(unet).__name__)
