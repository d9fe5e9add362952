"""Problems with exact answers: Gaussian mixtures (exact denoisers, densities, classifiers and
reference ODE solutions) and a single Gaussian with a closed-form flow map."""

from .gmm import Gaussian, GaussianMixture, random_mixture, ring8

__all__ = ["GaussianMixture", "Gaussian", "ring8", "random_mixture", "TESTBEDS", "get"]

TESTBEDS = {
    "ring8": ring8,
    "gmm16": lambda: random_mixture(16, components=4, seed=16),
    "gmm64": lambda: random_mixture(64, components=4, seed=64),
}


def get(name: str) -> GaussianMixture:
    """The testbed called ``name``; an unknown name lists the valid ones."""
    if name not in TESTBEDS:
        raise ValueError(f"unknown testbed {name!r}; valid testbeds: {', '.join(sorted(TESTBEDS))}")
    return TESTBEDS[name]()
