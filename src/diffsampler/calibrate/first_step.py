"""The analytical first step: a Gaussian model of the data replaces the network at large noise.

Wang & Vastola, "The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion Models and
its Applications", TMLR 2024 (arXiv:2311.10892; code: Animadversio/GaussianTeleportationDiffusion) observe
that at large noise a trained model's denoiser is close to the exact denoiser of the Gaussian with the
data's mean and covariance, whose probability-flow ODE is solved in closed form, so the first part of the
trajectory can be jumped over ("teleported") at no network evaluation. The Unified Sampling Framework
(Liu et al., "A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic Models", ICLR
2024, arXiv:2312.07243) makes the same saving its "analytical first step" and searches whether to take it.

The Gaussian is ``N(mu, U diag(v) U^T + c P)``: the top ``r`` principal directions ``U`` with their
variances ``v``, and one variance ``c`` in every direction orthogonal to them (``P = I - U U^T``), the
maximum-likelihood estimate of probabilistic PCA (Tipping & Bishop 1999). With ``r = d`` it is the full
covariance; with ``c = 0`` it is the paper's low-rank model (the residual then scales by ``sigma / sigma_T``).
Along a direction of variance ``l`` the flow rescales ``x - alpha mu`` by the ratio of the marginal's standard
deviations ``sqrt(sigma^2 + alpha^2 l)`` between the two times (METHODS.md, section 0, item 1), so the jump
is exact for Gaussian data in every process.

:class:`AnalyticalFirstStep` is the solver a plan carries: it holds a deterministic base solver and the
statistics, takes the first ``skip`` grid intervals in closed form and runs the base solver on the rest of
the grid, so ``ds.sample(model, x, grid, solver)`` runs it unchanged and ``run_nfe`` counts only network
evaluations.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .. import solvers as _solvers
from ..solvers.base import Knots, Solver, require_grid_steps

__all__ = ["GaussianStats", "AnalyticalFirstStep", "FirstStepState"]


def _as_float64(name: str, value, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.ndim != ndim or not bool(torch.isfinite(t).all()):
        raise ValueError(f"GaussianStats: {name} must be a finite {ndim}-D array, got shape {tuple(t.shape)}")
    return t.detach().cpu().contiguous()


@dataclass(frozen=True, eq=False)
class GaussianStats:
    """A Gaussian model of the data, ``N(mean, basis diag(variances) basis^T + residual (I - basis basis^T))``.

    ``mean`` ``(d,)``; ``basis`` ``(d, r)`` with orthonormal columns; ``variances`` ``(r,)``; ``residual`` the
    variance orthogonal to the basis (0 when ``r = d`` or for the paper's low-rank model); ``shape`` the shape
    of one sample (``(1, 8, 8)`` for the digits), ``d`` values. Build it with :meth:`from_samples`,
    :meth:`from_moments` or :meth:`of_testbed`. Compared by identity (a solver holding it stays hashable).
    """

    mean: torch.Tensor
    basis: torch.Tensor
    variances: torch.Tensor
    residual: float
    shape: tuple

    def __post_init__(self):
        object.__setattr__(self, "mean", _as_float64("mean", self.mean, 1))
        object.__setattr__(self, "basis", _as_float64("basis", self.basis, 2))
        object.__setattr__(self, "variances", _as_float64("variances", self.variances, 1))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        d, r = self.basis.shape
        if self.mean.shape != (d,) or self.variances.shape != (r,) or math.prod(self.shape) != d or r > d:
            raise ValueError(f"GaussianStats: need mean (d,), basis (d, r) with r <= d, variances (r,) and a sample "
                             f"shape of d values; got mean {tuple(self.mean.shape)}, basis {(d, r)}, variances "
                             f"{tuple(self.variances.shape)}, shape {self.shape}")
        if not torch.allclose(self.basis.T @ self.basis, torch.eye(r, dtype=torch.float64), atol=1e-8):
            raise ValueError("GaussianStats: basis must have orthonormal columns")
        if bool((self.variances < 0).any()) or not (math.isfinite(self.residual) and self.residual >= 0):
            raise ValueError(f"GaussianStats: variances and residual must be >= 0, got min variance "
                             f"{float(self.variances.min()) if r else 'none'} and residual {self.residual!r}")
        object.__setattr__(self, "residual", float(self.residual))

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    # -- estimates --------------------------------------------------------------------------------------
    @classmethod
    def from_samples(cls, x0: torch.Tensor, rank: int | None = None) -> "GaussianStats":
        """The estimate from data samples ``x0`` ``(n, ...)``: their mean, the top ``rank`` principal directions
        (``None``: all that ``n`` samples determine, ``min(n - 1, d)``) and, orthogonal to them, the mean of the
        remaining sample variances (probabilistic PCA's maximum-likelihood residual)."""
        if not isinstance(x0, torch.Tensor) or x0.ndim < 2 or x0.shape[0] < 2:
            got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise ValueError(f"GaussianStats.from_samples: x0 must be a batch of at least 2 samples (n, ...), "
                             f"got {got}")
        n, shape = x0.shape[0], tuple(x0.shape[1:])
        flat = x0.detach().to(torch.float64).cpu().reshape(n, -1)
        d = flat.shape[1]
        most = min(n - 1, d)
        if rank is None:
            rank = most
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= most:
            raise ValueError(f"GaussianStats.from_samples: rank = {rank!r} is invalid; allowed: an integer in "
                             f"[1, {most}] (at most n - 1 = {n - 1} and d = {d}), or None")
        mean = flat.mean(0)
        _, singular, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        spectrum = singular.pow(2) / (n - 1)
        total = float((flat - mean).pow(2).sum()) / (n - 1)
        residual = max(0.0, total - float(spectrum[:rank].sum())) / (d - rank) if rank < d else 0.0
        return cls(mean, vh[:rank].T, spectrum[:rank], residual, shape)

    @classmethod
    def from_moments(cls, mean, cov, shape=None) -> "GaussianStats":
        """The Gaussian of a given mean ``(d,)`` and full covariance ``(d, d)`` (exact, every eigenpair kept)."""
        mean = _as_float64("mean", mean, 1)
        cov = _as_float64("cov", cov, 2)
        if cov.shape != (mean.shape[0],) * 2 or not torch.allclose(cov, cov.T):
            raise ValueError(f"GaussianStats.from_moments: cov must be a symmetric ({mean.shape[0]}, {mean.shape[0]}) "
                             f"matrix, got shape {tuple(cov.shape)}")
        evals, evecs = torch.linalg.eigh(cov)
        return cls(mean, evecs, evals.clamp(min=0.0), 0.0, shape if shape is not None else (mean.shape[0],))

    @classmethod
    def of_testbed(cls, testbed) -> "GaussianStats":
        """The exact mean and covariance of a :class:`~diffsampler.testbeds.GaussianMixture` (law of total
        covariance: ``sum_k w_k (Sigma_k + mu_k mu_k^T) - mu mu^T``)."""
        weights, means, covs = (getattr(testbed, a, None) for a in ("weights", "means", "covs"))
        if weights is None or means is None or covs is None:
            raise ValueError(f"GaussianStats.of_testbed: {type(testbed).__name__} carries no data statistics "
                             f"(weights, means, covs); allowed: a ds.testbeds.GaussianMixture, or "
                             f"GaussianStats.from_samples(data)")
        mean = weights @ means
        second = torch.einsum("k,kij->ij", weights, covs + means[:, :, None] * means[:, None, :])
        return cls.from_moments(mean, second - torch.outer(mean, mean))

    # -- the closed-form flow ---------------------------------------------------------------------------
    def check_sample(self, x: torch.Tensor, who: str) -> None:
        if x.ndim < 1 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"{who}: the Gaussian statistics describe samples of {self.dim} values (shape "
                             f"{self.shape}), but the batch has shape {tuple(x.shape)}; allowed: statistics of "
                             f"this model's data (GaussianStats.from_samples on its samples)")

    def flow(self, x: torch.Tensor, alpha_from: float, sigma_from: float, alpha_to: float,
             sigma_to: float) -> torch.Tensor:
        """The exact probability-flow map of this Gaussian from ``x`` at ``(alpha_from, sigma_from)`` to the time
        of ``(alpha_to, sigma_to)`` (any process): every direction of variance ``l`` rescales ``x - alpha mu``
        by ``sqrt(sigma_to^2 + alpha_to^2 l) / sqrt(sigma_from^2 + alpha_from^2 l)``."""
        self.check_sample(x, "GaussianStats.flow")
        flat = x.to(torch.float64).reshape(x.shape[0], -1)
        mean, basis = self.mean.to(flat.device), self.basis.to(flat.device)
        variances = self.variances.to(flat.device)
        centred = flat - alpha_from * mean
        coords = centred @ basis
        ratio = torch.sqrt(sigma_to ** 2 + alpha_to ** 2 * variances) / torch.sqrt(sigma_from ** 2 +
                                                                                  alpha_from ** 2 * variances)
        c = self.residual
        outside = math.sqrt(sigma_to ** 2 + alpha_to ** 2 * c) / math.sqrt(sigma_from ** 2 + alpha_from ** 2 * c)
        out = alpha_to * mean + (coords * ratio) @ basis.T + outside * (centred - coords @ basis.T)
        return out.reshape(x.shape).to(x.dtype)

    # -- storage ----------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as named float64 tensors (what :meth:`save` writes)."""
        return {"mean": self.mean, "basis": self.basis.contiguous(), "variances": self.variances,
                "residual": torch.tensor([self.residual], dtype=torch.float64),
                "shape": torch.tensor(self.shape, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict) -> "GaussianStats":
        missing = sorted({"mean", "basis", "variances", "residual", "shape"} - set(tensors))
        if missing:
            raise ValueError(f"GaussianStats: the stored statistics lack {', '.join(missing)}")
        return cls(tensors["mean"], tensors["basis"], tensors["variances"], float(tensors["residual"][0]),
                   tuple(tensors["shape"].tolist()))

    def digest(self) -> str:
        """The SHA-256 of the statistics' values (names a stored copy and checks it when read back)."""
        h = hashlib.sha256()
        for name, t in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        save_file(self.tensors(), str(path), metadata={"format": "diffsampler.gaussian_stats/1"})
        return path

    @classmethod
    def load(cls, path: str | Path, digest: str | None = None) -> "GaussianStats":
        """Read statistics written by :meth:`save`; with ``digest``, refuse a file whose values differ."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GaussianStats.load: no statistics file at {path} (the analytical first step "
                                    f"of a plan needs the data statistics saved beside its JSON)")
        stats = cls.from_tensors(load_file(str(path)))
        if digest is not None and stats.digest() != digest:
            raise ValueError(f"GaussianStats.load: {path} holds other statistics than the plan was made with "
                             f"(sha256 {stats.digest()[:12]}..., expected {digest[:12]}...)")
        return stats


class FirstStepState(NamedTuple):
    """The wrapper's state: the base solver's own state (over the grid after the jump) and the process values
    ``(alpha_i, sigma_i, alpha_{i+1}, sigma_{i+1})`` of each analytical interval."""

    base: Any
    jumps: tuple


@dataclass(frozen=True, eq=False)
class AnalyticalFirstStep(Solver):
    """The first ``skip`` grid intervals in closed form under a Gaussian model of the data, then ``base``.

    Order: that of ``base`` on the rest of the grid (the jump is exact for Gaussian data and otherwise an
    approximation that does not shrink with the step size). Network evaluations: those of ``base`` over the
    remaining ``steps - skip`` intervals (``run_nfe``); the jump costs none. Deterministic: ``base`` must be a
    deterministic solver that takes the grid's steps, since the jump follows the probability-flow ODE.

    ??? cite "Reference"
        Wang & Vastola, "The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion Models
        and its Applications", TMLR 2024, arXiv:2311.10892.
    """

    base: Solver
    stats: GaussianStats
    skip: int = 1

    name = "analytical_first_step"
    paper = "Wang & Vastola 2024, arXiv:2311.10892"

    def __post_init__(self):
        if not isinstance(self.base, Solver) or isinstance(self.base, AnalyticalFirstStep):
            raise TypeError(f"analytical_first_step: base must be a solver object (ds.solvers.get(name, ...)) other "
                            f"than another analytical first step, got {type(self.base).__name__}")
        require_grid_steps(self.base, "analytical_first_step (base)",
                           "but the analytical jump follows the probability-flow ODE")
        if not isinstance(self.stats, GaussianStats):
            raise TypeError(f"analytical_first_step: stats must be GaussianStats (the data's mean and covariance: "
                            f"GaussianStats.from_samples(data) or .of_testbed(mixture)), got "
                            f"{type(self.stats).__name__}")
        self._require(isinstance(self.skip, int) and not isinstance(self.skip, bool) and self.skip >= 1, "skip",
                      "an integer >= 1 (grid intervals taken in closed form)")

    # metadata follows the base solver
    @property
    def order(self) -> int:
        return self.base.order

    @property
    def global_order(self) -> int:
        return self.base.global_order

    @property
    def nfe_per_step(self) -> int:
        return self.base.nfe_per_step

    @property
    def extra_nfe(self) -> int:
        return self.base.extra_nfe

    def run_nfe(self, steps: int, into_zero: bool = False) -> int:
        """Network evaluations of a run of ``steps`` grid intervals: the base solver's over the last
        ``steps - skip`` (the jump costs none)."""
        if steps <= self.skip:
            raise ValueError(f"analytical_first_step: a grid of {steps} steps leaves no network step after the "
                             f"jump over {self.skip}; allowed: more than skip = {self.skip} steps")
        return self.base.run_nfe(steps - self.skip, into_zero)

    def init(self, knots: Knots, x: torch.Tensor) -> FirstStepState:
        if len(knots) <= self.skip:
            raise ValueError(f"analytical_first_step: the grid has {len(knots)} steps, but skip = {self.skip} "
                             f"intervals are taken in closed form and the base solver needs at least one; allowed: "
                             f"a grid of more than {self.skip} steps")
        self.stats.check_sample(x, "analytical_first_step")
        rest = Knots.from_grid(knots.process, torch.tensor(knots.t[self.skip:], dtype=torch.float64))
        jumps = tuple((knots.alpha[i], knots.sigma[i], knots.alpha[i + 1], knots.sigma[i + 1])
                      for i in range(self.skip))
        return FirstStepState(self.base.init(rest, x), jumps)

    def step(self, model, x: torch.Tensor, i: int, state: FirstStepState, noise) -> tuple[torch.Tensor, Any]:
        if i < self.skip:
            return self.stats.flow(x, *state.jumps[i]), state
        x, base_state = self.base.step(model, x, i - self.skip, state.base, noise)
        return x, state._replace(base=base_state)


def solver_record(solver: Solver) -> dict:
    """A registered solver as JSON data: ``{"name": registered name, "options": {option: value}}``."""
    if _solvers.REGISTRY.get(getattr(solver, "name", None)) is not type(solver):
        raise ValueError(f"calibrate: solver {solver!r} is not a registered solver, so a plan cannot name it; "
                         f"allowed: a solver from ds.solvers.get(name, **options)")
    return {"name": solver.name, "options": {k: getattr(solver, k) for k in type(solver).options()}}
