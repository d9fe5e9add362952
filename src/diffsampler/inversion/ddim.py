"""DDIM-style inversion: any deterministic registered solver run backward over the sampling grid.

DDIM inversion (Song, Meng & Ermon 2021, arXiv:2010.02502, section 4.3; Dhariwal & Nichol 2021,
appendix F) integrates the probability-flow ODE from the data to the noise with the sampler's own
step. The exponential-integrator and linear-multistep engines are formulas in log-SNR and noise level
that hold for negative step sizes, so the solver object is the same; :class:`~diffsampler.Run` with
``backward=True`` drives it over the reversed grid. Two ends need their own step:

* out of ``t = 0`` (where no solver can step): :func:`~diffsampler.inversion.base.first_step`, the exact
  inverse of every sampler's last step (which returns the data estimate), by fixed-point iteration;
* into ``alpha = 0`` (a flow's ``t = 1``, pure noise): log-SNR is infinite there, so that step is DDIM's
  first-order one (``x_1 = eps_hat``), which is the limit every log-SNR integrator takes.

The round trip (invert, then sample forward with the same solver) is exact only in the limit: its
error falls at the solver's order as the steps grow (the tests measure it). For exact round trips use
:class:`~diffsampler.inversion.bdia` or :class:`~diffsampler.inversion.edict`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import solvers as _solvers
from ..loop import Run, sample
from .base import Inversion, InversionMethod, first_step, move, nfe_of

__all__ = ["solver_inversion", "deterministic"]


def deterministic(solver, who: str = "invert") -> _solvers.Solver:
    """``solver`` resolved, or a clear error if it cannot be run backward."""
    s = _solvers.resolve(solver)
    if s.stochastic or s.adaptive:
        kind = "stochastic (it draws fresh noise, which a backward run cannot undo)" if s.stochastic else \
            "adaptive (it picks its own steps inside each interval)"
        raise ValueError(f"{who}: method {getattr(solver, 'name', solver)!r} is a {kind} solver; allowed: a "
                         f"deterministic solver that takes the grid's steps ({', '.join(deterministic_names())}), "
                         f"a solver object with its noise off (ds.solvers.get('ddim', eta=0.0)), or one of "
                         f"'bdia', 'edict', 'edit_friendly' (the stochastic, edit-friendly DDPM inversion), "
                         f"'polaris'")
    return s


def deterministic_names() -> list[str]:
    out = []
    for n in _solvers.names():
        s = _solvers.get(n)
        if not s.stochastic and not s.adaptive:
            out.append(n)
    return out


@dataclass(frozen=True)
class solver_inversion(InversionMethod):  # noqa: N801 - used like a function
    """DDIM-style inversion with ``solver`` (a name or a solver object, deterministic).

    ``refine``: fixed-point iterations of the step out of ``t = 0`` (see
    :func:`~diffsampler.inversion.base.first_step`); each costs one network evaluation.
    ``regenerate`` is ``ds.sample`` with the same solver from ``inv.x``.
    """

    solver: object = "ddim"
    refine: int = 2

    name = "ddim"
    paper = "Song, Meng & Ermon 2021, arXiv:2010.02502 (DDIM inversion)"

    def __post_init__(self):
        object.__setattr__(self, "solver", deterministic(self.solver))
        self._require(isinstance(self.refine, int) and not isinstance(self.refine, bool) and self.refine >= 0,
                      "refine", "an integer >= 0")

    def invert(self, model, x0, grid, *, generator=None, **cond) -> Inversion:
        process = model.process
        before = nfe_of(model)
        x, times = x0, grid.tolist()
        if times[-1] == 0.0:
            x = first_step(model, x0, times[-2], self.refine, cond)
            times = times[:-1]
        into_noise = float(process.alpha(times[0])) == 0.0
        back = times[::-1][:-1] if into_noise else times[::-1]
        if len(back) >= 2:
            run = Run(model, x, back, self.solver, backward=True, **cond)
            for _ in range(len(run)):
                run.step()
            x = run.x
        if into_noise and len(times) >= 2:
            # into alpha = 0 (a flow's pure noise) lambda is infinite: DDIM's step, x_1 = eps_hat
            x = move(process, model(x, times[1], **cond), times[0])
        return Inversion(x, self, grid, {}, nfe_of(model) - before)

    def regenerate(self, model, inv, grid, **cond) -> torch.Tensor:
        g = self.check(inv, grid, model.process)
        return sample(model, inv.x, g, self.solver, **cond)
