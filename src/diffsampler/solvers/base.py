"""The solver protocol and the per-grid quantities every solver starts from.

A solver is an immutable object holding only hyperparameters. The loop calls

    state = solver.init(knots, x)
    x, state = solver.step(model, x, i, state, noise)      # for i in range(len(knots))

``init`` precomputes everything that depends only on the grid (per-step
coefficients as Python floats), so a step does tensor work and nothing else. Its
``x`` is a template of the batch (shape, dtype, device), not the sample: the loop
caches initial states per grid and batch layout.
All history (previous model outputs, step ratios) lives in the returned state.
``model`` is a callable ``(x, t) -> Prediction`` with the conditioning bound;
``noise`` is a :class:`~diffsampler.noise.StepNoise` for stochastic solvers and
``None`` otherwise.

Metadata: ``order`` is the convergence order (never "model calls per step"),
``nfe_per_step`` the network evaluations per step (the last step may use fewer),
``extra_nfe`` evaluations spent once per run beyond those (PLMS's warm-up),
``run_nfe(steps, into_zero)`` the evaluations of a whole run, ``adaptive`` whether the solver picks
its own steps (then its cost follows from its tolerances),
``stochastic`` whether the solver draws noise, ``paper`` the citation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .._options import Options
from .._scalars import coefficient
from ..denoiser import Prediction
from ..process import Process

__all__ = ["Knots", "Solver", "Model", "NoiseOptions", "coefficient", "combine", "require_grid_steps"]

Model = Callable[[torch.Tensor, Any], Prediction]


def combine(x: torch.Tensor, a: float, terms, kind: str = "x0") -> torch.Tensor:
    """``a x + sum_j w_j e_j`` for ``terms = ((w_j, e_j), ...)``, where ``e_j`` is a tensor or a
    :class:`~diffsampler.Prediction` standing for its estimate ``kind`` (``"x0"`` or ``"eps"``).

    An estimate not yet formed enters through the network output it derives from
    (``estimate = p at + q raw``, :meth:`Prediction.linear_form`), its share of ``at``
    merged with the term on that tensor. So an estimate evaluated at ``x`` itself costs
    one kernel, as a formed one does, and forming it would cost two more: an Euler or
    DDIM step from an eps network is ``mul`` and ``add_`` in all. A caller that reads an
    estimate again later passes ``pred.x0`` instead where merging is not possible, so it
    is formed once. A term of weight zero is skipped (its estimate may be undefined, as
    x0 at ``t = 1`` of a flow).
    """
    tensors, weights = [x], [a]
    for w, e in terms:
        if w == 0.0:
            continue
        if type(e) is Prediction:
            form = e.linear_form(kind)
            if form is not None:
                at = e.at
                if at is x:  # the common case: the answer at the point being moved
                    weights[0] += w * form[0]
                else:
                    for k, seen in enumerate(tensors):
                        if seen is at:
                            weights[k] += w * form[0]
                            break
                    else:
                        tensors.append(at)
                        weights.append(w * form[0])
                tensors.append(e.raw)
                weights.append(w * form[1])
                continue
            e = e.x0 if kind == "x0" else e.eps
        tensors.append(e)
        weights.append(w)
    out = torch.mul(x, coefficient(weights[0], x))
    for tensor, weight in zip(tensors[1:], weights[1:]):
        if weight != 0.0:
            out.add_(tensor, alpha=weight)
    return out


@dataclass(frozen=True)
class Knots:
    """Process quantities at the times of one grid, as float64 Python numbers.

    ``t[i]``, ``alpha[i]``, ``sigma[i]``, ``lam[i]`` (log-SNR, ``+inf`` at
    ``t = 0``), and the k-diffusion coordinates ``scale[i] = ode_scale`` and
    ``s[i] = ode_sigma``. ``len(knots)`` is the number of steps.
    """

    process: Process
    t: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    lam: tuple[float, ...]
    scale: tuple[float, ...]
    s: tuple[float, ...]

    @classmethod
    def from_grid(cls, process: Process, grid: torch.Tensor) -> "Knots":
        # One vectorised float64 evaluation per quantity, then plain floats for the steps.
        g = grid.to(torch.float64)
        values = lambda v: tuple(v.tolist())  # noqa: E731
        return cls(
            process=process,
            t=values(g),
            alpha=values(process.alpha(g)),
            sigma=values(process.sigma(g).abs()),
            lam=values(process.lambda_(g)),
            scale=values(process.ode_scale(g)),
            s=values(process.ode_sigma(g).abs()),
        )

    def __len__(self) -> int:
        return len(self.t) - 1

    def h(self, i: int) -> float:
        """Step size in log-SNR from knot ``i`` to ``i + 1`` (``inf`` into ``t = 0``)."""
        return self.lam[i + 1] - self.lam[i]


class Solver(Options):
    """Base class of all solvers: a frozen dataclass of hyperparameters plus ``init``/``step``."""

    name: ClassVar[str]
    order: ClassVar[int]
    nfe_per_step: ClassVar[int]
    paper: ClassVar[str]
    # True for solvers whose noise must come from a Brownian path (they ask for
    # increments over arbitrary intervals with noise.between(a, b)).
    brownian: ClassVar[bool] = False
    # Network evaluations spent once per run on top of nfe_per_step per step.
    extra_nfe: ClassVar[int] = 0
    # True for solvers that choose their own steps inside each grid interval (their cost follows
    # from tolerances, not from the grid: nfe_per_step is then per attempt and run_nfe is undefined).
    adaptive: ClassVar[bool] = False

    @property
    def stochastic(self) -> bool:
        return False

    @property
    def global_order(self) -> int:
        """The order of the whole run, which warm-up steps of lower order can cap below ``order``."""
        return self.order

    @classmethod
    def run_nfe(cls, steps: int, into_zero: bool = False) -> int:
        """Network evaluations of a run of ``steps`` steps (at default options). A multi-stage step
        into ``t = 0`` costs one evaluation: it returns the data estimate."""
        return steps * cls.nfe_per_step + cls.extra_nfe - (cls.nfe_per_step - 1 if into_zero else 0)

    def init(self, knots: Knots, x: torch.Tensor) -> Any:
        raise NotImplementedError

    def step(self, model: Model, x: torch.Tensor, i: int, state: Any, noise) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    # helpers for subclasses' __post_init__ (and options(), _require from Options) --------
    def _require_finite_nonneg(self, option: str) -> None:
        v = getattr(self, option)
        self._require(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
                      option, "a finite number >= 0")


@dataclass(frozen=True)
class NoiseOptions:
    """The options of solvers that inject noise at every step: ``eta`` (0 integrates the probability-flow
    ODE, 1 the reverse SDE) and ``s_noise`` (a scale on the injected noise). Mix in before ``Solver``."""

    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self):
        self._require_finite_nonneg("eta")
        self._require_finite_nonneg("s_noise")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0 and self.s_noise > 0


def require_grid_steps(solver: Solver, who: str, why: str, allowed: str = "a deterministic solver that takes the "
                       "grid's steps (e.g. 'ddim', 'dpmpp_2m', 'heun', or ddim with eta=0)") -> None:
    """Refuse a stochastic or adaptive ``solver`` where ``who`` needs the grid's own deterministic steps
    (inversion, the analytical first step, calibration against the probability-flow ODE), saying ``why``."""
    if solver.stochastic or solver.adaptive:
        kind = "stochastic (it draws noise)" if solver.stochastic else "adaptive (it picks its own steps)"
        raise ValueError(f"{who}: solver {solver.name!r} is {kind}, {why}; allowed: {allowed}")
