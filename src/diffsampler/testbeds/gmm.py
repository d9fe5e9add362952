"""Gaussian mixtures: data distributions whose every noisy quantity is known in closed form.

For data ``p0 = sum_k pi_k N(mu_k, S_k)`` and ``x_t = alpha x0 + sigma eps``:

* the noisy marginal is ``sum_k pi_k N(alpha mu_k, C_k)`` with ``C_k = alpha^2 S_k + sigma^2 I``;
* the posterior over components is ``r_k(x) ∝ pi_k N(x; alpha mu_k, C_k)``;
* the denoiser is ``E[x0 | x_t] = sum_k r_k (mu_k + alpha S_k C_k^{-1} (x - alpha mu_k))``.

Everything is computed in float64 with torch, so autograd through the denoiser
(JVPs, VJPs, divergences) is exact. Labelled components give the exact
class-conditional denoisers and the exact noisy classifier ``p(c | x_t)``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ..denoiser import PREDICTIONS, Denoiser, Prediction
from ..process import Process

__all__ = ["GaussianMixture", "Gaussian", "ring8", "random_mixture"]


def _full_covariances(covs, k: int, d: int) -> torch.Tensor:
    c = torch.as_tensor(covs, dtype=torch.float64)
    if c.ndim == 0:
        c = c.expand(k)
    if c.shape == (k,):
        return c[:, None, None] * torch.eye(d, dtype=torch.float64)
    if c.shape == (k, d):
        return torch.diag_embed(c)
    if c.shape == (k, d, d):
        return c.clone()
    raise ValueError(f"GaussianMixture: covs must have shape (K,), (K, d) or (K, d, d) = ({k}, {d}, {d}); "
                     f"got {tuple(c.shape)}")


class GaussianMixture:
    """A mixture of Gaussians in ``d`` dimensions with exact denoisers for any process.

    Parameters
    ----------
    means: (K, d)
    covs: (K, d, d) full, (K, d) diagonal, (K,) or a scalar isotropic variances.
        Zero variances are allowed (a point mass is a Gaussian of zero covariance).
    weights: (K,) positive mixture weights, normalised here; uniform by default.
    labels: (K,) integer class of each component, for class-conditional use.
        A ``label`` of ``NULL_LABEL`` (-1) in a call means "no class" for that sample
        (the unconditional mixture), which makes the mixture's denoiser usable with
        classifier-free guidance.
    """

    NULL_LABEL = -1

    def __init__(self, means, covs, weights=None, labels=None):
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim == 1:
            mu = mu[None]
        if mu.ndim != 2:
            raise ValueError(f"GaussianMixture: means must have shape (K, d), got {tuple(mu.shape)}")
        k, d = mu.shape
        cov = _full_covariances(covs, k, d)
        if not torch.allclose(cov, cov.transpose(-1, -2)):
            raise ValueError("GaussianMixture: covariances must be symmetric")
        evals, evecs = torch.linalg.eigh(cov)
        if bool((evals < -1e-12 * evals.abs().max().clamp(min=1.0)).any()):
            raise ValueError("GaussianMixture: covariances must be positive semi-definite")
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.shape != (k,) or not bool((w > 0).all()):
            raise ValueError(f"GaussianMixture: weights must be {k} positive numbers, got {w.tolist()}")
        self.means, self.covs = mu, cov
        self.weights = w / w.sum()
        self.log_weights = torch.log(self.weights)
        self.dim, self.n_components = d, k
        self._cov_evals, self._cov_evecs = evals.clamp(min=0.0), evecs
        self._cov_sqrt = evecs * evals.clamp(min=0.0).sqrt()[:, None, :]  # S = R R^T
        if labels is None:
            self.labels = None
            self.n_classes = 0
        else:
            lab = torch.as_tensor(labels, dtype=torch.int64).flatten()
            if lab.shape != (k,) or bool((lab < 0).any()):
                raise ValueError(f"GaussianMixture: labels must be {k} non-negative integers")
            self.labels = lab
            self.n_classes = int(lab.max()) + 1

    # -- shapes and conditioning --------------------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"GaussianMixture: samples must have shape (batch, ...) with {self.dim} values "
                             f"per sample, got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    def _log_prior(self, batch: int, label) -> torch.Tensor:
        """(batch, K) log mixture weights; given ``label``, those of the class-conditional mixture."""
        lw = self.log_weights.expand(batch, -1)
        if label is None:
            return lw
        if self.labels is None:
            raise ValueError("GaussianMixture: label= given but this mixture has no labels")
        lab = torch.as_tensor(label, dtype=torch.int64).flatten().cpu()
        if lab.numel() == 1:
            lab = lab.expand(batch)
        if lab.shape != (batch,):
            raise ValueError(f"GaussianMixture: label must be one class or one per sample ({batch}), "
                             f"got shape {tuple(lab.shape)}")
        if bool(((lab < self.NULL_LABEL) | (lab >= self.n_classes)).any()):
            raise ValueError(f"GaussianMixture: labels must be in [0, {self.n_classes}) or NULL_LABEL "
                             f"({self.NULL_LABEL}), got {lab.unique().tolist()}")
        keep = (self.labels[None, :] == lab[:, None]) | (lab[:, None] == self.NULL_LABEL)
        masked = torch.where(keep, lw, torch.full_like(lw, -math.inf))
        return masked - torch.logsumexp(masked, dim=-1, keepdim=True)  # the class-conditional weights

    # -- the noisy marginal -------------------------------------------------
    def _posterior(self, x: torch.Tensor, alpha, sigma, label=None):
        """Per-component log-likelihoods (B, K) and posterior means of x0 (B, K, d) at ``x_t = x``."""
        b, d = x.shape
        eye = torch.eye(d, dtype=torch.float64)
        if isinstance(alpha, torch.Tensor) and alpha.ndim > 0:  # one time per sample
            a = alpha.reshape(b, 1, 1, 1)
            cov = a ** 2 * self.covs[None] + sigma.reshape(b, 1, 1, 1) ** 2 * eye
            a_vec = alpha.reshape(b, 1, 1)
        else:
            a = float(alpha)
            cov = a * a * self.covs + float(sigma) ** 2 * eye
            a_vec = a
        chol = torch.linalg.cholesky(cov)
        diff = x[:, None, :] - a_vec * self.means[None]  # (B, K, d)
        if chol.ndim == 3:
            # one time for the batch: invert the K factors once and apply them by einsum (a batched
            # triangular solve would broadcast them to B x K systems, ten times slower on small d)
            inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
            white = torch.einsum("kij,bkj->bki", inv, diff)
            prec_diff = torch.einsum("kji,bkj->bki", inv, white)  # C^{-1} (x - a mu) = L^-T L^-1 (x - a mu)
        else:
            white = torch.linalg.solve_triangular(chol, diff[..., None], upper=False)[..., 0]
            prec_diff = torch.cholesky_solve(diff[..., None], chol)[..., 0]
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_lik = -0.5 * (white ** 2).sum(-1) - 0.5 * logdet - 0.5 * d * math.log(2 * math.pi)
        post_mean = self.means[None] + a_vec * torch.einsum("kij,bkj->bki", self.covs, prec_diff)
        return log_lik, post_mean

    def _alpha_sigma(self, process: Process, t):
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            t = t.to(torch.float64).cpu()
            return process.alpha(t), process.sigma(t).abs()
        return float(process.alpha(t)), abs(float(process.sigma(t)))

    def x0(self, x: torch.Tensor, process: Process, t, label=None) -> torch.Tensor:
        """The exact denoiser ``E[x0 | x_t = x]`` (optionally given the class ``label``)."""
        xf = self._flat(x)
        a, s = self._alpha_sigma(process, t)
        log_lik, post_mean = self._posterior(xf, a, s, label)
        resp = torch.softmax(self._log_prior(xf.shape[0], label) + log_lik, dim=-1)
        return (resp[..., None] * post_mean).sum(1).reshape(x.shape)

    def log_prob(self, x: torch.Tensor, process: Optional[Process] = None, t=0.0, label=None) -> torch.Tensor:
        """Exact log-density of the noisy marginal at ``t`` (of the data when ``process`` is None)."""
        xf = self._flat(x)
        a, s = (1.0, 0.0) if process is None else self._alpha_sigma(process, t)
        log_lik, _ = self._posterior(xf, a, s)
        return torch.logsumexp(self._log_prior(xf.shape[0], label) + log_lik, dim=-1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """``p(component k | x0 = x)``, shape ``(batch, K)``; under this mixture its mean is ``weights``."""
        xf = self._flat(x)
        log_lik, _ = self._posterior(xf, 1.0, 0.0)
        return torch.softmax(self.log_weights + log_lik, dim=-1)

    def tilted(self, a, lam: float = 1.0) -> "GaussianMixture":
        """The mixture reweighted by ``exp(lam a.x)`` (a linear reward), normalised: a mixture again.

        ``N(mu, S) exp(lam a.x) = N(mu + lam S a, S) exp(lam a.mu + lam^2 a'S a / 2)``, so each
        component's mean moves by ``lam S_k a`` and its weight is multiplied by the factor: the
        closed-form target of reward steering (FK steering, SVDD, tree search).
        """
        a = torch.as_tensor(a, dtype=torch.float64).flatten()
        if a.shape != (self.dim,):
            raise ValueError(f"GaussianMixture.tilted: a must have {self.dim} entries, got {tuple(a.shape)}")
        shift = lam * torch.einsum("kij,j->ki", self.covs, a)
        log_factor = lam * self.means @ a + 0.5 * lam * lam * torch.einsum("i,kij,j->k", a, self.covs, a)
        log_w = self.log_weights + log_factor
        return GaussianMixture(self.means + shift, self.covs, torch.softmax(log_w, 0),
                               labels=None if self.labels is None else self.labels.tolist())

    def product(self, other: "GaussianMixture") -> "GaussianMixture":
        """The normalised product of two mixture densities in the same space: a mixture again.

        ``N(a, A) N(b, B) = N(a; b, A + B) N(m, S)`` with ``S = A (A + B)^-1 B`` and
        ``m = B (A + B)^-1 a + A (A + B)^-1 b``, so component ``(k, l)`` has weight proportional
        to ``pi_k rho_l N(a_k; b_l, A_k + B_l)``: the closed-form target of a product of experts,
        and ``mix.product(mix)`` that of annealing at ``beta = 2`` (Feynman-Kac correctors).
        """
        if not isinstance(other, GaussianMixture) or other.dim != self.dim:
            raise ValueError(f"GaussianMixture.product: other must be a GaussianMixture in {self.dim} dimensions")
        a, b = self.means[:, None], other.means[None]                      # (K, 1, d), (1, L, d)
        ca, cb = self.covs[:, None], other.covs[None]                      # (K, 1, d, d), (1, L, d, d)
        total = ca + cb
        solve_a = torch.linalg.solve(total, a.expand(total.shape[:-1])[..., None])[..., 0]   # (A+B)^-1 a
        solve_b = torch.linalg.solve(total, b.expand(total.shape[:-1])[..., None])[..., 0]
        mean = torch.einsum("klij,klj->kli", cb.expand_as(total), solve_a) + \
            torch.einsum("klij,klj->kli", ca.expand_as(total), solve_b)
        cov = ca @ torch.linalg.solve(total, cb.expand_as(total))
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        diff = (a - b).expand(total.shape[:-1])
        log_norm = -0.5 * (torch.einsum("kli,kli->kl", diff, torch.linalg.solve(total, diff[..., None])[..., 0])
                           + torch.logdet(total) + self.dim * math.log(2 * math.pi))
        log_w = self.log_weights[:, None] + other.log_weights[None] + log_norm
        return GaussianMixture(mean.reshape(-1, self.dim), cov.reshape(-1, self.dim, self.dim),
                               torch.softmax(log_w.flatten(), 0))

    def posterior(self, operator, y, noise_var: float) -> "GaussianMixture":
        """The posterior of ``x`` given ``y = A x + n``, ``n ~ N(0, noise_var I)``: a mixture again.

        ``operator`` is the matrix ``A`` (``(m, d)``) and ``y`` one measurement ``(m,)``. Component
        ``k`` becomes ``N(mu + K (y - A mu), S - K A S)`` with ``K = S A' (A S A' + noise_var I)^-1``,
        its weight multiplied by the evidence ``N(y; A mu, A S A' + noise_var I)``; valid for singular
        covariances too. The closed-form target of posterior sampling (DPS, AFDPS).
        """
        mat = torch.as_tensor(operator, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64).flatten()
        if mat.ndim != 2 or mat.shape[1] != self.dim or y.shape != (mat.shape[0],):
            raise ValueError(f"GaussianMixture.posterior: operator must be (m, {self.dim}) and y (m,), got "
                             f"{tuple(mat.shape)} and {tuple(y.shape)}")
        if not noise_var > 0:
            raise ValueError(f"GaussianMixture.posterior: noise_var must be > 0, got {noise_var!r}")
        m = mat.shape[0]
        sa = self.covs @ mat.T                                             # (K, d, m)
        innov = mat @ sa + noise_var * torch.eye(m, dtype=torch.float64)   # (K, m, m)
        gain = torch.linalg.solve(innov, sa.transpose(-1, -2)).transpose(-1, -2)   # (K, d, m)
        resid = y - self.means @ mat.T                                      # (K, m)
        mean = self.means + torch.einsum("kim,km->ki", gain, resid)
        cov = self.covs - gain @ sa.transpose(-1, -2)
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        log_ev = -0.5 * (torch.einsum("km,km->k", resid, torch.linalg.solve(innov, resid[..., None])[..., 0])
                         + torch.logdet(innov) + m * math.log(2 * math.pi))
        return GaussianMixture(mean, cov, torch.softmax(self.log_weights + log_ev, 0),
                               labels=None if self.labels is None else self.labels.tolist())

    def class_posterior(self, x: torch.Tensor, process: Process, t) -> torch.Tensor:
        """Exact noisy classifier ``p(c | x_t)``, shape ``(batch, n_classes)``."""
        if self.labels is None:
            raise ValueError("GaussianMixture: class_posterior needs labelled components")
        xf = self._flat(x)
        a, s = self._alpha_sigma(process, t)
        log_lik, _ = self._posterior(xf, a, s)
        resp = torch.softmax(self.log_weights + log_lik, dim=-1)
        onehot = torch.nn.functional.one_hot(self.labels, self.n_classes).to(torch.float64)
        return resp @ onehot

    def noisy_classifier(self, process: Process):
        """``classifier(x, time) -> log p(c | x_t)`` (``(batch, n_classes)``), ``time`` the process time.

        The exact noise-conditioned classifier, differentiable in ``x``: the one
        classifier guidance at scale 1 turns the unconditional model into the
        class-conditional one.
        """
        def log_posterior(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
            t = time.to(torch.float64).cpu()
            t = float(t[0]) if bool((t == t[0]).all()) else t
            return self.class_posterior(x, process, t).clamp_min(1e-300).log()

        return log_posterior

    # -- models and samples -------------------------------------------------
    def denoiser(self, process: Process, prediction: str = "eps") -> Denoiser:
        """A :class:`Denoiser` whose network is this mixture's exact prediction of type ``prediction``.

        The network takes process time as its time input and accepts ``label=``
        (one class or one per sample) for the class-conditional model.
        """
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

        def exact(x, time, label=None):
            t = time.to(torch.float64).cpu()
            if bool((t == t[0]).all()):
                t = float(t[0])
            x0 = self.x0(x, process, t, label)
            a, s = self._alpha_sigma(process, t)
            x64 = x.to(torch.float64).cpu()
            if isinstance(a, torch.Tensor):
                a, s = a.reshape(-1, *[1] * (x.ndim - 1)), s.reshape(-1, *[1] * (x.ndim - 1))
            eps = (x64 - a * x0) / s
            out = Prediction(x0, eps).as_(prediction, process, t)
            return out.to(dtype=x.dtype, device=x.device)

        def null(cond: dict) -> dict:
            label = cond.get("label")
            if label is None:
                return dict(cond)
            return {**cond, "label": torch.full_like(torch.as_tensor(label), self.NULL_LABEL)}

        exact.__name__ = f"gmm_exact_{prediction}"
        return Denoiser(exact, process, prediction, time_input=lambda t: t,
                        null=null if self.labels is not None else None)

    def sample(self, n: int, generator: torch.Generator | None = None, label=None):
        """Exact samples of the data: ``(x0 (n, d) float64, component index (n,))``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"sample: n must be a positive integer, got {n!r}")
        probs = self._log_prior(1, label)[0].exp()
        comp = torch.multinomial(probs, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + torch.einsum("nij,nj->ni", self._cov_sqrt[comp], z)
        return x, comp

    def sample_marginal(self, process: Process, t, n: int, generator: torch.Generator | None = None,
                        label=None) -> torch.Tensor:
        """Exact samples of the noisy marginal at ``t``: ``alpha(t) x0 + sigma(t) eps`` with exact ``x0``.

        Start distribution tests here rather than at the process's prior: at ``t_max``
        the two differ whenever the schedule's terminal signal ``alpha(t_max)`` is not 0
        (Stable Diffusion's ``scaled_linear`` keeps ``alpha = 0.068``).
        """
        x0, _ = self.sample(n, generator, label)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        return float(process.alpha(t)) * x0 + abs(float(process.sigma(t))) * eps

    # -- reference solutions ------------------------------------------------
    def ode_reference(self, process: Process, x: torch.Tensor, t_from, t_to, *, label=None,
                      rtol: float = 1e-11, atol: float = 1e-11) -> torch.Tensor:
        """The probability-flow ODE from ``t_from`` to ``t_to`` solved to about 1e-9 relative.

        Integrates ``dy/du = y - x0_hat`` with ``y = x / ode_scale(t)`` and
        ``u = log ode_sigma(t)`` (log noise-to-signal time for VP and EDM, log t for
        flows) with scipy's DOP853. A target ``t_to = 0`` is reached by integrating
        to a noise level 1e-8 of the grid's smallest and stopping there: the
        remaining change, ``s * eps_hat``, is below 1e-8 of the data scale.
        """
        t_from, t_to = float(t_from), float(t_to)
        if not t_to < t_from:
            raise ValueError(f"ode_reference: need t_to < t_from, got {t_from} -> {t_to}")
        u0 = math.log(float(process.ode_sigma(t_from)))
        if t_to == 0.0:
            u1 = math.log(float(process.ode_sigma(process.t_min)) * 1e-8)
        else:
            u1 = math.log(float(process.ode_sigma(t_to)))
        shape, dtype = x.shape, x.dtype
        y0 = (x.to(torch.float64).cpu() / float(process.ode_scale(t_from))).reshape(-1).numpy()

        def rhs(u, y):
            t = float(process.t_of_ode_sigma(math.exp(u)))
            yt = torch.from_numpy(y).reshape(shape)
            x0 = self.x0(yt * float(process.ode_scale(t)), process, t, label)
            return (yt - x0).reshape(-1).numpy()

        sol = solve_ivp(rhs, (u0, u1), y0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"ode_reference: the reference integration failed: {sol.message}")
        y1 = torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)
        scale_to = float(process.ode_scale(t_to)) if t_to > 0 else float(process.ode_scale(0.0))
        return (y1 * scale_to).to(dtype)


class Gaussian(GaussianMixture):
    """A single Gaussian ``N(mean, cov)``, whose probability-flow map is closed form."""

    def __init__(self, mean, cov):
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        cov = torch.as_tensor(cov, dtype=torch.float64)
        super().__init__(mean[None], cov[None] if cov.ndim else cov.reshape(1))

    def flow_map(self, process: Process, x: torch.Tensor, t_from, t_to) -> torch.Tensor:
        """Exact probability-flow ODE solution from ``t_from`` to ``t_to``.

        Along each eigenvector ``u_k`` of the covariance (eigenvalue ``l_k``) the
        flow rescales ``x - alpha mu`` by the ratio of marginal standard deviations,
        ``sqrt(sigma^2 + alpha^2 l_k)``, between the two times.
        """
        xf = self._flat(x)
        a0, s0 = float(process.alpha(t_from)), abs(float(process.sigma(t_from)))
        a1, s1 = float(process.alpha(t_to)), abs(float(process.sigma(t_to)))
        evals, evecs = self._cov_evals[0], self._cov_evecs[0]
        ratio = torch.sqrt(s1 ** 2 + a1 ** 2 * evals) / torch.sqrt(s0 ** 2 + a0 ** 2 * evals)
        centred = (xf - a0 * self.means[0]) @ evecs
        out = a1 * self.means[0] + (centred * ratio) @ evecs.T
        return out.reshape(x.shape).to(x.dtype)


def ring8(radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """Eight equal Gaussians on a circle in 2-D, labelled 0..7."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([angles.cos(), angles.sin()], 1)
    return GaussianMixture(means, torch.full((8,), std ** 2, dtype=torch.float64), labels=list(range(8)))


def random_mixture(dim: int, components: int = 4, seed: int = 0, spread: float = 1.0) -> GaussianMixture:
    """A reproducible random mixture: means of scale ``spread``, random SPD covariances, random weights."""
    g = np.random.default_rng(seed)
    means = g.normal(size=(components, dim)) * spread / math.sqrt(max(dim, 1)) * 2
    covs = []
    for _ in range(components):
        q, _ = np.linalg.qr(g.normal(size=(dim, dim)))
        covs.append(q @ np.diag(g.uniform(0.05, 0.5, size=dim)) @ q.T)
    covs = np.stack(covs)
    covs = 0.5 * (covs + covs.transpose(0, 2, 1))
    weights = g.uniform(0.5, 1.5, size=components)
    return GaussianMixture(means, covs, weights, labels=list(range(components)))
