"""Models and schedulers of other libraries, and ours inside theirs.

* :func:`from_diffusers`: a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``) or any module
  with their call signature, with the process, prediction type and timestep mapping read from a
  scheduler or its config.
* :func:`from_k_diffusion`: any k-diffusion style denoiser ``D(x, sigma, **cond)``.

diffusers itself is imported only where its classes are needed.
"""

from .diffusers_models import PREDICTION_TYPES, from_diffusers, process_from_config
from .k_diffusion_models import from_k_diffusion

__all__ = ["from_diffusers", "from_k_diffusion", "process_from_config", "PREDICTION_TYPES"]
