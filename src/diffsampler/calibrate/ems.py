"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al. 2023, arXiv:2310.13268).

DPM-Solver-v3 writes the probability-flow ODE in log-SNR ``lambda`` around three per-dimension
functions of ``lambda`` fitted to the model at hand (the paper's section 3.1 and appendix C.1.1):

* ``l``: the best diagonal linear part of ``N(x, lambda) = sigma eps_theta(x, lambda)``,
  ``l = E[diag grad_x N]`` over the marginal at ``lambda``. Estimated with Rademacher probes
  ``v``: ``E[v * (J_N v)] = diag J_N`` (Hutchinson's diagonal estimator), one Jacobian-vector
  product of the model per probe.
* ``s`` and ``b``: with ``f = (N - l x) / alpha``, the per-dimension least-squares fit
  ``f' ~ s f + b`` of the total ``lambda``-derivative of ``f`` along the ODE. ``f'`` needs the
  derivative of ``N`` along the ODE direction ``dx/dlambda = (dlog alpha/dlambda) x - N``: its
  ``x`` part is a Jacobian-vector product, its explicit ``lambda`` part a central difference at
  fixed ``x`` (networks' time inputs are not differentiable in general: discrete embeddings, integer
  timesteps), and ``dl/dlambda`` a second-order finite difference of the estimated ``l`` over the grid.

The expectations are Monte Carlo averages over the states of probability-flow trajectories from the
caller's start points, solved with the library on the statistics grid itself (uniform in ``lambda``,
as the authors' statistics are; the paper: 1024 samples on 200 to 250 steps). The authors' repository
ships precomputed statistics and no estimator; this one follows the appendix.

Where ``f`` hardly varies over the samples (a single Gaussian makes it deterministic) ``s`` is not
identified: a small ridge (``ridge`` times ``E f^2``) on the variance sends it to 0, and ``b`` to the
mean of ``f'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..loop import sample, take

__all__ = ["ModelStatistics", "ems", "statistics_grid"]

# Relative step of the central difference in lambda (float64: truncation ~1e-8, cancellation ~1e-12).
LAMBDA_DIFFERENCE = 1e-4


@dataclass(frozen=True, eq=False)
class ModelStatistics:
    """DPM-Solver-v3's statistics ``l``, ``s``, ``b`` on a grid uniform in log-SNR.

    ``lam`` (``K + 1``, increasing: from the noisiest time to the least noisy) and ``t`` (the process
    times there) are float64; ``l``, ``s``, ``b`` have shape ``(K + 1, *shape)``, one value per data
    dimension and grid point. ``process`` is the ``repr`` of the process they were estimated on
    (checked, with ``t``, by the solver). ``l = 1, s = b = 0`` (:meth:`degenerate`) make
    DPM-Solver-v3 DPM-Solver++. Saved and loaded as safetensors (:meth:`save`, :meth:`load`).
    """

    lam: torch.Tensor
    t: torch.Tensor
    l: torch.Tensor  # noqa: E741 - the paper's name
    s: torch.Tensor
    b: torch.Tensor
    process: str

    def __post_init__(self):
        lam = self.lam
        if not (isinstance(lam, torch.Tensor) and lam.ndim == 1 and len(lam) >= 2):
            raise ValueError(f"ModelStatistics: lam must be a 1-D tensor of at least 2 log-SNRs, got "
                             f"{tuple(lam.shape) if isinstance(lam, torch.Tensor) else type(lam).__name__}")
        if not (torch.isfinite(lam).all() and (lam[1:] > lam[:-1]).all()):
            raise ValueError("ModelStatistics: lam must be finite and strictly increasing")
        if not (isinstance(self.t, torch.Tensor) and self.t.shape == lam.shape):
            raise ValueError(f"ModelStatistics: t must have lam's shape {tuple(lam.shape)}")
        for name in ("l", "s", "b"):
            v = getattr(self, name)
            if not (isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[0] == len(lam)
                    and v.shape == self.l.shape):
                raise ValueError(f"ModelStatistics: {name} must have shape (len(lam) = {len(lam)}, *data shape), "
                                 f"the same as l; got "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
            if not torch.isfinite(v).all():
                raise ValueError(f"ModelStatistics: {name} has non-finite values")

    @property
    def shape(self) -> tuple[int, ...]:
        """The data shape (one sample) the statistics describe."""
        return tuple(self.l.shape[1:])

    @classmethod
    def degenerate(cls, process, t: torch.Tensor, shape) -> "ModelStatistics":
        """``l = 1, s = b = 0`` at the times ``t`` (decreasing, as a grid): DPM-Solver++'s statistics."""
        t = torch.as_tensor(t, dtype=torch.float64)
        lam = process.lambda_(t).to(torch.float64)
        full = (len(t), *tuple(shape))
        return cls(lam, t, torch.ones(full, dtype=torch.float64), torch.zeros(full, dtype=torch.float64),
                   torch.zeros(full, dtype=torch.float64), repr(process))

    def check(self, process, shape) -> None:
        """Raise ValueError unless these statistics are of ``process`` and of samples of ``shape``."""
        lam = process.lambda_(self.t.to(torch.float64)).to(torch.float64)
        if repr(process) != self.process or not torch.allclose(lam, self.lam, rtol=1e-9, atol=1e-9):
            raise ValueError(f"dpm_solver_v3: statistics = ModelStatistics of {self.process} do not belong to the "
                             f"model's process {process!r}; allowed: statistics estimated on this process "
                             f"(ds.calibrate.ems(model, x))")
        if tuple(shape) != self.shape:
            raise ValueError(f"dpm_solver_v3: statistics are of samples of shape {self.shape}, the batch's "
                             f"samples have shape {tuple(shape)}; allowed: statistics of the same data shape")

    def save(self, path) -> None:
        """Write the statistics to ``path`` as safetensors (the process in the metadata)."""
        from safetensors.torch import save_file

        tensors = {name: getattr(self, name).contiguous() for name in ("lam", "t", "l", "s", "b")}
        save_file(tensors, str(path), metadata={"process": self.process, "format": "dpm_solver_v3_ems"})

    @classmethod
    def load(cls, path) -> "ModelStatistics":
        """Statistics written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ModelStatistics.load: no file at {str(path)!r}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "dpm_solver_v3_ems":
                raise ValueError(f"ModelStatistics.load: {str(path)!r} is not a statistics file written by "
                                 f"ModelStatistics.save (metadata {meta})")
            tensors = {k: f.get_tensor(k) for k in ("lam", "t", "l", "s", "b")}
        return cls(**tensors, process=meta["process"])


def statistics_grid(process, steps: int, t_max=None, t_min=None) -> torch.Tensor:
    """``steps + 1`` decreasing times uniform in log-SNR from ``t_max`` to ``t_min`` (the process's by
    default), both of finite log-SNR: the grid statistics are estimated on."""
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 2):
        raise ValueError(f"ems: steps = {steps!r} is invalid; allowed: an integer >= 2")
    t_max = float(process.t_max if t_max is None else t_max)
    t_min = float(process.t_min if t_min is None else t_min)
    lam_a, lam_b = float(process.lambda_(t_max)), float(process.lambda_(t_min))
    if not (torch.isfinite(torch.tensor([lam_a, lam_b])).all() and lam_b > lam_a):
        raise ValueError(f"ems: the statistics span t_max = {t_max} to t_min = {t_min} has log-SNR {lam_a} to "
                         f"{lam_b}; allowed: finite log-SNRs, increasing (t_min > 0 where the process reaches data, "
                         f"t_max < 1 for a flow)")
    lam = torch.linspace(lam_a, lam_b, steps + 1, dtype=torch.float64)
    t = process.t_of_lambda(lam).to(torch.float64)
    t[0], t[-1] = t_max, t_min  # exactly the span asked for
    return t


def _d_log_alpha_d_lambda(process, t: float) -> float:
    """``d log(alpha) / d lambda = (alpha'/alpha) / (alpha'/alpha - sigma'/sigma)`` at ``t``."""
    a, s = float(process.alpha(t)), float(process.sigma(t))
    da, dsig = float(process.d_alpha(t)), float(process.d_sigma(t))
    return (da / a) / (da / a - dsig / s)


def ems(model, x: torch.Tensor, *, steps: int = 200, probes: int = 4, t_min=None, solver="unipc",
        ridge: float = 1e-8, generator: torch.Generator | None = None, **cond) -> ModelStatistics:
    """Estimate DPM-Solver-v3's empirical model statistics of ``model`` (see the module docstring).

    Parameters
    ----------
    model:
        A :class:`~diffsampler.Denoiser` (or a guidance transform of one: the statistics then belong to
        that guidance scale) whose network is differentiable in its input (autograd JVPs).
    x:
        Start points at the process's ``t_max``, drawn by the caller (``process.prior``): the Monte Carlo
        samples are the states of their probability-flow trajectories.
    steps:
        Intervals of the statistics grid (uniform in log-SNR from ``t_max`` to ``t_min``).
    probes:
        Rademacher probes per sample for ``l`` (an exact answer at 1 probe when the Jacobian is diagonal).
    t_min:
        The least noisy time of the grid (the process's ``t_min`` by default; it must have finite log-SNR).
    solver:
        The solver of the trajectories on the statistics grid (a name or a solver object).
    ridge:
        Relative ridge on ``Var f`` in the fit of ``s`` (see the module docstring).
    generator:
        The source of the probes (a fixed seed by default, so the estimate is reproducible).
    **cond:
        Conditioning keywords passed to the model at every evaluation.

    Cost: ``steps`` evaluations for the trajectories, then at each grid point one evaluation with
    ``probes + 1`` JVPs over the batch and two more for the difference in ``lambda``.
    """
    process = model.process
    if not (isinstance(probes, int) and not isinstance(probes, bool) and probes >= 1):
        raise ValueError(f"ems: probes = {probes!r} is invalid; allowed: an integer >= 1")
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise ValueError(f"ems: ridge = {ridge!r} is invalid; allowed: a number >= 0")
    if not (isinstance(x, torch.Tensor) and x.ndim >= 2 and x.is_floating_point()):
        raise ValueError(f"ems: x must be a floating batch of start points (batch, ...), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    grid = statistics_grid(process, steps, None, t_min)
    gen = generator if generator is not None else torch.Generator(device=x.device).manual_seed(0)
    x = x.to(torch.float64)
    n = x.shape[0]

    states = [x]
    with torch.no_grad():
        sample(model, x, grid, solver, callback=lambda info: states.append(info["x"]), **cond)

    lam = process.lambda_(grid).to(torch.float64)
    moments = {k: [] for k in ("l", "f", "ff", "af", "a", "xf", "x")}
    for j, t in enumerate(grid.tolist()):
        xj = states[j].detach()
        alpha, sigma = float(process.alpha(t)), abs(float(process.sigma(t)))
        dloga = _d_log_alpha_d_lambda(process, t)

        def noise_term(y, time=t):  # N = sigma eps at fixed time
            # the JVP evaluates probes + 1 copies of the batch at once: per-sample conditioning follows
            given = cond if y.shape[0] == n else take(cond, torch.arange(n).repeat(y.shape[0] // n), n)
            return model(y, time, **given).eps * abs(float(process.sigma(time)))

        with torch.no_grad():
            N = noise_term(xj)
            dx = dloga * xj - N  # dx / dlambda along the probability-flow ODE
        v = torch.randint(0, 2, (probes, *xj.shape), generator=gen, device=xj.device).to(xj.dtype) * 2 - 1
        tangents = torch.cat([v.reshape(probes * n, *xj.shape[1:]), dx])
        _, jv = torch.autograd.functional.jvp(noise_term, xj.repeat(probes + 1, *([1] * (xj.ndim - 1))), tangents)
        jv = jv.detach()
        l_j = (v * jv[:probes * n].reshape(probes, *xj.shape)).mean(dim=(0, 1))
        # explicit lambda-derivative of N at fixed x: central difference (forward at the noisy end, where
        # times beyond t_max may not exist)
        delta = LAMBDA_DIFFERENCE * max(1.0, abs(float(lam[j])))
        with torch.no_grad():
            if j == 0:
                t1, t2 = (float(process.t_of_lambda(torch.tensor(float(lam[j]) + k * delta, dtype=torch.float64)))
                          for k in (1, 2))
                dN_dlam = (-3 * N + 4 * noise_term(xj, t1) - noise_term(xj, t2)) / (2 * delta)
            else:
                tp, tm = (float(process.t_of_lambda(torch.tensor(float(lam[j]) + k * delta, dtype=torch.float64)))
                          for k in (1, -1))
                dN_dlam = (noise_term(xj, tp) - noise_term(xj, tm)) / (2 * delta)
        dN = dN_dlam + jv[probes * n:]  # total derivative along the ODE
        f = (N - l_j * xj) / alpha
        # f' = [dN - l' x - l dx] / alpha - dloga f; the l' x part is added once l' is known (below)
        a = (dN - l_j * dx) / alpha - dloga * f
        moments["l"].append(l_j)
        for key, value in (("f", f), ("ff", f * f), ("af", a * f), ("a", a), ("xf", xj * f / alpha),
                           ("x", xj / alpha)):
            moments[key].append(value.mean(dim=0))
    m = {k: torch.stack(v) for k, v in moments.items()}
    l = m["l"]  # noqa: E741
    dl = torch.gradient(l, spacing=(lam,), dim=0, edge_order=2)[0]
    # f' = a - l' x / alpha: its moments from the stored ones
    e_f1 = m["a"] - dl * m["x"]
    e_f1f = m["af"] - dl * m["xf"]
    var_f = m["ff"] - m["f"] ** 2
    s = (e_f1f - e_f1 * m["f"]) / (var_f + ridge * m["ff"] + torch.finfo(torch.float64).tiny)
    b = e_f1 - s * m["f"]
    return ModelStatistics(lam, grid, l, s, b, repr(process))
