"""Posterior sampling for inverse problems ``y = A(x) + n`` with a pretrained diffusion prior.

* :func:`dps`: diffusion posterior sampling (Chung et al. 2023, arXiv:2209.14687), the popular
  baseline: one VJP through the denoiser per step, biased.
* :func:`afdps`: approximation-free ensemble posterior sampling (Chen, Ren, Min, Ying & Izzo 2025,
  arXiv:2506.03979): weighted particles on the steering core, exact in the particle limit.
* operators: :class:`Inpaint`, :class:`Blur`, :class:`Downsample`, :class:`Linear`, or any
  differentiable callable.
"""

from .operators import Blur, Downsample, General, Inpaint, Linear, Operator, as_operator, mu_y
from .dps import dps
from .afdps import afdps

__all__ = ["dps", "afdps", "Operator", "Inpaint", "Blur", "Downsample", "Linear", "General", "as_operator",
           "mu_y", "posterior_digits"]


def posterior_digits(*args, **kwargs):
    """Digits inpainting or denoising (see :func:`diffsampler.posterior.digits.posterior_digits`)."""
    from .digits import posterior_digits as run
    return run(*args, **kwargs)
