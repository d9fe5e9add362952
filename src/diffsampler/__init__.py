"""diffsampler: training-free samplers for pretrained diffusion and flow-matching models.

    import diffsampler as ds
    proc = ds.VP.scaled_linear()
    model = ds.Denoiser(net, proc, prediction="eps")
    grid = ds.grids.karras(proc, steps=10)
    x0 = ds.sample(model, proc.prior((16, 4, 64, 64), generator=g), grid, "dpmpp_2m", generator=g)
"""

from . import calibrate, grids, guidance, integrations, inversion, k_diffusion, models, posterior, solvers, steering, testbeds
from .denoiser import PREDICTIONS, Denoiser, Prediction
from .loop import NonFiniteError, Run, sample
from .generation import generate, load_samples
from .inversion import invert, noise_to, regenerate
from .process import EDM, VP, Flow, Process, VPCosine, VPDiscrete, VPLinear

__version__ = "0.1.0"

__all__ = [
    "Process", "VP", "VPDiscrete", "VPLinear", "VPCosine", "EDM", "Flow",
    "Denoiser", "Prediction", "PREDICTIONS",
    "sample", "Run", "NonFiniteError", "generate", "load_samples", "invert", "regenerate", "noise_to",
    "calibrate", "grids", "guidance", "integrations", "inversion", "k_diffusion", "posterior", "models", "solvers", "steering", "testbeds",
]
