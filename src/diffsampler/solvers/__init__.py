"""Solver registry: ``names()``, ``get(name, **options)`` and the solver classes.

A new solver is its own module plus one line in ``REGISTRY``. ``ALIASES`` maps the names other tools
use for a registered algorithm (ComfyUI's, k-diffusion's) onto it with its options; ``get`` and
``resolve`` accept them, ``names()`` lists only the registered solvers.
"""

from __future__ import annotations

from .base import Knots, Solver
from .adaptive import DPMAdaptive
from .ancestral import DPM2Ancestral, DPMpp2S, DPMpp2SAncestral
from .cfgpp import (DPMpp2MCFGpp, DPMpp2SAncestralCFGpp, EulerAncestralCFGpp, EulerCFGpp, GradientEstimationCFGpp,
                    RESMultistepAncestralCFGpp, RESMultistepCFGpp)
from .ddim import DDIM, DDPM, LCM, EulerAncestral
from .dpm_solver import DPMSolver
from .dpm_solver_v3 import DPMSolverV3
from .dc_solver import DCSolver
from .dpmpp import DPMpp2M, DPMpp2MSDE, DPMpp3M, DPMpp3MSDE, RESMultistep, RESMultistepAncestral
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

__all__ = ["Knots", "Solver", "REGISTRY", "ALIASES", "ALIAS_GRIDS", "names", "get", "resolve", "canonical",
           "Euler", "Heun", "DDIM", "EulerAncestral",
           "DPMpp2M", "DPMpp3M", "DPMpp2MSDE", "DPMpp3MSDE", "UniPC", "DPM2", "DPM2Ancestral",
           "DPMpp2SAncestral", "LMS", "DDPM", "DPMppSDE", "DPMSolver", "DEIS", "LCM", "RESMultistep", "IPNDM",
           "IPNDMV", "DPMpp2S", "EulerCFGpp", "EulerAncestralCFGpp",
           "DPMSolverSinglestep", "DPMppSinglestep", "SEEDS2", "SEEDS3", "ERSDE",
           "GradientEstimation", "PLMS", "HeunPP2", "SASolver", "SASolverPECE", "PNDM", "DPMpp2MCFGpp", "DPMAdaptive",
           "DPMpp2SAncestralCFGpp", "RESMultistepAncestral", "RESMultistepCFGpp", "RESMultistepAncestralCFGpp",
           "GradientEstimationCFGpp", "DPMSolverV3", "DCSolver"]

REGISTRY: dict[str, type[Solver]] = {
    "er_sde": ERSDE,
    "euler": Euler,
    "gradient_estimation": GradientEstimation,
    "gradient_estimation_cfg_pp": GradientEstimationCFGpp,
    "heun": Heun,
    "heunpp2": HeunPP2,
    "ddim": DDIM,
    "ddpm": DDPM,
    "dpm_2": DPM2,
    "dpm_2_ancestral": DPM2Ancestral,
    "dpm_adaptive": DPMAdaptive,
    "dc_solver": DCSolver,
    "dpm_solver": DPMSolver,
    "dpm_solver_v3": DPMSolverV3,
    "dpm_solver_singlestep": DPMSolverSinglestep,
    "deis": DEIS,
    "dpmpp_2s": DPMpp2S,
    "dpmpp_2s_ancestral": DPMpp2SAncestral,
    "dpmpp_2s_ancestral_cfg_pp": DPMpp2SAncestralCFGpp,
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
    "res_multistep_ancestral": RESMultistepAncestral,
    "res_multistep_ancestral_cfg_pp": RESMultistepAncestralCFGpp,
    "res_multistep_cfg_pp": RESMultistepCFGpp,
    "sa_solver": SASolver,
    "sa_solver_pece": SASolverPECE,
    "seeds_2": SEEDS2,
    "seeds_3": SEEDS3,
    "unipc": UniPC,
}


# Other tools' names for registered algorithms: name -> (registered name, options). ComfyUI's ``*_gpu``
# samplers differ from the others only in where their Brownian tree lives; ``uni_pc`` is UniPC bh1 of
# order 3 (ComfyUI's ``order = min(3, ...)``, lower order on the final steps).
ALIASES: dict[str, tuple[str, dict]] = {
    "uni_pc": ("unipc", {"solver_order": 3, "variant": "bh1"}),
    "uni_pc_bh2": ("unipc", {"solver_order": 3, "variant": "bh2"}),
    "dpmpp_sde_gpu": ("dpmpp_sde", {}),
    "dpmpp_2m_sde_gpu": ("dpmpp_2m_sde", {}),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_2m_sde_heun_gpu": ("dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_3m_sde_gpu": ("dpmpp_3m_sde", {}),
    "dpm_fast": ("dpm_solver_singlestep", {"solver_order": 3, "solver_type": "paper"}),
}

# Aliases that name a grid as well: ``dpm_fast`` is DPM-Solver-3 singlestep on DPM-Solver's fast grid
# (``grids.dpm_fast``; ComfyUI keeps only the first and last noise levels of its schedule and the count).
ALIAS_GRIDS: dict[str, str] = {"dpm_fast": "dpm_fast"}


def names() -> list[str]:
    """Every registered solver name (aliases are in ``ALIASES``)."""
    return sorted(REGISTRY)


def canonical(name: str, **options) -> tuple[str, dict]:
    """``(registered name, options)`` of a registered name or an alias, the caller's options over the alias's."""
    if name in ALIASES:
        target, preset = ALIASES[name]
        return target, {**preset, **options}
    return name, dict(options)


def get(name: str, **options) -> Solver:
    """The solver registered as ``name`` (or aliased, see ``ALIASES``) with ``options``; unknown names or
    options raise ValueError."""
    if not isinstance(name, str) or (name not in REGISTRY and name not in ALIASES):
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(names())}")
    target, options = canonical(name, **options)
    cls = REGISTRY[target]
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        valid = ", ".join(cls.options()) or "none"
        alias = "" if target == name else f" (alias of {target!r})"
        raise ValueError(f"solver {name!r}{alias} has no option(s) {', '.join(unknown)}; valid options: {valid}")
    return cls(**options)


def resolve(solver) -> Solver:
    """A solver object from a registered name, an alias or a solver object."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str):
        return get(solver)
    raise TypeError(f"solver must be a registered name ({', '.join(names())}) or a Solver, "
                    f"got {type(solver).__name__}")
