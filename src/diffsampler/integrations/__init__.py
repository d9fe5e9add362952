"""Models and schedulers of other libraries, and ours inside theirs.

* :func:`from_diffusers`: a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``) or any module
  with their call signature, with the process, prediction type and timestep mapping read from a
  scheduler or its config.
* :func:`from_k_diffusion`: any k-diffusion style denoiser ``D(x, sigma, **cond)``.
* :class:`DiffsamplerScheduler`: every fixed-grid solver as a diffusers scheduler (``pipe.scheduler``).
* :func:`grid_from_scheduler`: the grid a diffusers scheduler steps through, as a diffsampler grid.

diffusers itself is imported only where its classes are needed.
"""

from .diffusers_models import PREDICTION_TYPES, from_diffusers, process_from_config
from .k_diffusion_models import from_k_diffusion

__all__ = ["from_diffusers", "from_k_diffusion", "process_from_config", "PREDICTION_TYPES", "DiffsamplerScheduler",
           "grid_from_scheduler"]


def __getattr__(name: str):
    # The scheduler adapter subclasses diffusers' classes: imported on first use, so diffsampler
    # itself does not need diffusers installed.
    if name in ("DiffsamplerScheduler", "DiffsamplerSchedulerOutput"):
        from . import diffusers_scheduler
        return getattr(diffusers_scheduler, name)
    if name == "grid_from_scheduler":
        from .diffusers_grids import grid_from_scheduler
        return grid_from_scheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
