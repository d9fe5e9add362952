"""Solver registry: ``names()``, ``get(name, **options)`` and the solver classes.

A new solver is its own module plus one line in ``REGISTRY``.
"""

from __future__ import annotations

from .base import Knots, Solver
from .adaptive import DPMAdaptive
from .ancestral import DPM2Ancestral, DPMpp2S, DPMpp2SAncestral
from .cfgpp import DPMpp2MCFGpp, EulerAncestralCFGpp, EulerCFGpp
from .ddim import DDIM, DDPM, LCM, EulerAncestral
from .dpm_solver import DPMSolver
from .dpmpp import DPMpp2M, DPMpp2MSDE, DPMpp3M, DPMpp3MSDE, RESMultistep
from .dpmpp_sde import DPMppSDE
from .karras import DPM2, Euler, Heun
from .heunpp import HeunPP2
from .er_sde import ERSDE
from .lms import DEIS, IPNDM, IPNDMV, LMS, GradientEstimation
from .pndm import PLMS, PNDM
from .sa_solver import SASolver, SASolverPECE
from .seeds import SEEDS2, SEEDS3
from .singlestep import DPMppSinglestep, DPMSolverSinglestep
from .unipc import UniPC

__all__ = ["Knots", "Solver", "REGISTRY", "names", "get", "resolve", "Euler", "Heun", "DDIM", "EulerAncestral",
           "DPMpp2M", "DPMpp3M", "DPMpp2MSDE", "DPMpp3MSDE", "UniPC", "DPM2", "DPM2Ancestral",
           "DPMpp2SAncestral", "LMS", "DDPM", "DPMppSDE", "DPMSolver", "DEIS", "LCM", "RESMultistep", "IPNDM",
           "IPNDMV", "DPMpp2S", "EulerCFGpp", "EulerAncestralCFGpp",
           "DPMSolverSinglestep", "DPMppSinglestep", "SEEDS2", "SEEDS3", "ERSDE",
           "GradientEstimation", "PLMS", "HeunPP2", "SASolver", "SASolverPECE", "PNDM", "DPMpp2MCFGpp", "DPMAdaptive"]

REGISTRY: dict[str, type[Solver]] = {
    "er_sde": ERSDE,
    "euler": Euler,
    "gradient_estimation": GradientEstimation,
    "heun": Heun,
    "heunpp2": HeunPP2,
    "ddim": DDIM,
    "ddpm": DDPM,
    "dpm_2": DPM2,
    "dpm_2_ancestral": DPM2Ancestral,
    "dpm_adaptive": DPMAdaptive,
    "dpm_solver": DPMSolver,
    "dpm_solver_singlestep": DPMSolverSinglestep,
    "deis": DEIS,
    "dpmpp_2s": DPMpp2S,
    "dpmpp_2s_ancestral": DPMpp2SAncestral,
    "ipndm": IPNDM,
    "ipndm_v": IPNDMV,
    "lcm": LCM,
    "lms": LMS,
    "euler_ancestral": EulerAncestral,
    "euler_cfg_pp": EulerCFGpp,
    "euler_ancestral_cfg_pp": EulerAncestralCFGpp,
    "dpmpp_2m": DPMpp2M,
    "dpmpp_2m_cfg_pp": DPMpp2MCFGpp,
    "dpmpp_3m": DPMpp3M,
    "dpmpp_2m_sde": DPMpp2MSDE,
    "dpmpp_sde": DPMppSDE,
    "dpmpp_singlestep": DPMppSinglestep,
    "dpmpp_3m_sde": DPMpp3MSDE,
    "plms": PLMS,
    "pndm": PNDM,
    "res_multistep": RESMultistep,
    "sa_solver": SASolver,
    "sa_solver_pece": SASolverPECE,
    "seeds_2": SEEDS2,
    "seeds_3": SEEDS3,
    "unipc": UniPC,
}


def names() -> list[str]:
    """Every registered solver name."""
    return sorted(REGISTRY)


def get(name: str, **options) -> Solver:
    """The solver registered as ``name`` with ``options``; unknown names or options raise ValueError."""
    if name not in REGISTRY:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(names())}")
    cls = REGISTRY[name]
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        valid = ", ".join(cls.options()) or "none"
        raise ValueError(f"solver {name!r} has no option(s) {', '.join(unknown)}; valid options: {valid}")
    return cls(**options)


def resolve(solver) -> Solver:
    """A solver object from a registered name or a solver object."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str):
        return get(solver)
    raise TypeError(f"solver must be a registered name ({', '.join(names())}) or a Solver, "
                    f"got {type(solver).__name__}")
