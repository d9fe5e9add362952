"""Noise processes: the forward noising ``x_t = alpha(t) x0 + sigma(t) eps``.

Every process answers the same questions in float64: ``alpha``, ``sigma`` and
their time derivatives, the log signal-to-noise ratio ``lambda_`` and its
inverse ``t_of_lambda``, the time range ``[t_min, t_max]``, the prior at
``t_max``, and what the wrapped network expects as its time input.

Each method accepts a Python number (returns a float; this is the fast path the
solvers use once per grid) or a tensor (returns a float64 tensor).

Besides ``(alpha, sigma)``, a process names the coordinates in which the
k-diffusion family of solvers (Euler, Heun, ...) integrates: ``y = x /
ode_scale(t)`` against the noise level ``s = ode_sigma(t)``. In these
coordinates the probability-flow ODE reads ``dy/ds = (y - x0_hat) / s`` for
every built-in process. For VP and EDM they are the EDM variables
``(x / alpha, sigma / alpha)`` (Karras et al. 2022, section 4); for Flow they are
the process's own ``(x, t)``, which stay finite at ``t = 1`` where ``alpha = 0``
(this is also what ComfyUI does for rectified-flow models).
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence, Union

import torch

Time = Union[float, torch.Tensor]

__all__ = ["Process", "VP", "VPDiscrete", "VPLinear", "VPCosine", "EDM", "Flow"]


class _FloatMath:
    exp = staticmethod(math.exp)
    expm1 = staticmethod(math.expm1)
    log = staticmethod(lambda v: math.log(v) if v > 0 else -math.inf)
    log1p = staticmethod(math.log1p)
    sqrt = staticmethod(math.sqrt)
    cos = staticmethod(math.cos)
    sin = staticmethod(math.sin)
    acos = staticmethod(math.acos)

    @staticmethod
    def softplus(v):
        return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


class _TensorMath:
    exp = staticmethod(torch.exp)
    expm1 = staticmethod(torch.expm1)
    log = staticmethod(torch.log)
    log1p = staticmethod(torch.log1p)
    sqrt = staticmethod(torch.sqrt)
    cos = staticmethod(torch.cos)
    sin = staticmethod(torch.sin)
    acos = staticmethod(torch.acos)
    softplus = staticmethod(torch.nn.functional.softplus)


def _prepare(t: Time):
    """Return ``(t, math namespace)``: floats stay floats, tensors become float64."""
    if isinstance(t, torch.Tensor):
        return t.to(torch.float64), _TensorMath
    return float(t), _FloatMath


class Process:
    """Base class of the forward processes ``x_t = alpha(t) x0 + sigma(t) eps``.

    Subclasses implement ``alpha``, ``sigma``, ``d_alpha``, ``d_sigma`` and
    ``t_of_lambda`` and set ``t_min``/``t_max``. ``reaches_data`` says whether a
    grid may end at ``t = 0``, where ``sigma = 0`` and the sample is data.
    """

    name: str = "process"
    t_min: float
    t_max: float
    reaches_data: bool = True

    # -- the process itself -------------------------------------------------
    def alpha(self, t: Time) -> Time:
        raise NotImplementedError

    def sigma(self, t: Time) -> Time:
        raise NotImplementedError

    def d_alpha(self, t: Time) -> Time:
        """Time derivative of ``alpha``."""
        raise NotImplementedError

    def d_sigma(self, t: Time) -> Time:
        """Time derivative of ``sigma``."""
        raise NotImplementedError

    def lambda_(self, t: Time) -> Time:
        """Log signal-to-noise ratio ``log(alpha / sigma)``; decreasing in ``t``."""
        t, m = _prepare(t)
        return m.log(self.alpha(t)) - m.log(self.sigma(t))

    def t_of_lambda(self, lam: Time) -> Time:
        """Inverse of ``lambda_``."""
        raise NotImplementedError

    # -- coordinates of the k-diffusion solver family ---------------------
    def ode_scale(self, t: Time) -> Time:
        return self.alpha(t)

    def ode_sigma(self, t: Time) -> Time:
        """Noise level of the k-diffusion coordinates: ``sigma / alpha`` unless overridden."""
        t, m = _prepare(t)
        return m.exp(-self.lambda_(t))

    def t_of_ode_sigma(self, s: Time) -> Time:
        s, m = _prepare(s)
        return self.t_of_lambda(-m.log(s))

    # -- boundaries ---------------------------------------------------------
    @property
    def prior_std(self) -> float:
        """Standard deviation of the prior the sampler starts from at ``t_max``."""
        return float(self.sigma(self.t_max))

    def prior(self, shape: Sequence[int], generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """Draw ``x_{t_max}`` from the prior ``N(0, prior_std^2 I)``.

        ``generator`` is a ``torch.Generator`` (advanced by one draw, whatever the
        batch size) or one generator per sample. Sample ``k`` is the same in every
        batch size and on every device (see :mod:`diffsampler.noise`).
        """
        from .noise import standard_normal

        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or any(s < 1 for s in shape):
            raise ValueError(f"prior: shape must be a non-empty tuple of positive sizes, got {shape}")
        return standard_normal(shape, generator, torch.float64, device).mul_(self.prior_std).to(dtype)

    # -- the network boundary ----------------------------------------------
    def time_input(self, t: Time) -> Time:
        """The time value a network trained on this process expects (default: ``t``)."""
        return t

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


# ---------------------------------------------------------------------------
# Variance preserving
# ---------------------------------------------------------------------------

class VP(Process):
    """Variance-preserving processes, ``alpha^2 + sigma^2 = 1``.

    Construct them through the class methods: ``VP.linear_discrete()`` (DDPM),
    ``VP.scaled_linear()`` (Stable Diffusion), ``VP.squaredcos_cap_v2()``,
    ``VP.discrete(betas=... | alphas_cumprod=...)``, and the continuous-time
    ``VP.linear()`` (beta from 0.1 to 20) and ``VP.cosine()``.
    """

    @property
    def prior_std(self) -> float:
        # The data are assumed to have unit variance, so the marginal at t_max has
        # variance alpha^2 + sigma^2 = 1 (diffusers' init_noise_sigma = 1).
        return 1.0

    def sigma(self, t: Time) -> Time:
        t, m = _prepare(t)
        # sqrt(1 - alpha^2) without cancellation when alpha is close to one.
        return m.sqrt(-m.expm1(2.0 * self._log_alpha(t)))

    def alpha(self, t: Time) -> Time:
        t, m = _prepare(t)
        return m.exp(self._log_alpha(t))

    def d_alpha(self, t: Time) -> Time:
        t, m = _prepare(t)
        return self.alpha(t) * self._d_log_alpha(t)

    def d_sigma(self, t: Time) -> Time:
        a = self.alpha(t)
        return -a * self.d_alpha(t) / self.sigma(t)

    def lambda_(self, t: Time) -> Time:
        t, m = _prepare(t)
        la = self._log_alpha(t)
        return la - 0.5 * m.log(-m.expm1(2.0 * la))

    @staticmethod
    def _log_alpha_of_lambda(lam: Time) -> Time:
        _, m = _prepare(lam)
        # alpha^2 = 1 / (1 + exp(-2 lambda))
        return -0.5 * m.softplus(-2.0 * lam)

    def _log_alpha(self, t: Time) -> Time:
        raise NotImplementedError

    def _d_log_alpha(self, t: Time) -> Time:
        raise NotImplementedError

    # factories ------------------------------------------------------------
    @classmethod
    def discrete(cls, betas=None, alphas_cumprod=None, name: str = "discrete") -> "VPDiscrete":
        return VPDiscrete(betas=betas, alphas_cumprod=alphas_cumprod, name=name)

    @classmethod
    def linear_discrete(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                        beta_end: float = 0.02) -> "VPDiscrete":
        """DDPM's linear beta schedule (Ho et al. 2020)."""
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return VPDiscrete(betas=betas, name="linear_discrete")

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> "VPDiscrete":
        """Stable Diffusion's schedule: betas linear in sqrt(beta)."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                               dtype=torch.float64) ** 2
        return VPDiscrete(betas=betas, name="scaled_linear")

    @classmethod
    def squaredcos_cap_v2(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999) -> "VPDiscrete":
        """The cosine schedule of Nichol & Dhariwal (2021), discretised with betas capped at ``max_beta``."""
        def alpha_bar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        n = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
        return VPDiscrete(betas=torch.tensor(betas, dtype=torch.float64), name="squaredcos_cap_v2")

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> "VPLinear":
        """Continuous VP with linear beta(t) (Song et al. 2021)."""
        return VPLinear(beta_min, beta_max, t_min)

    @classmethod
    def cosine(cls, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946) -> "VPCosine":
        """Continuous cosine schedule (Nichol & Dhariwal 2021)."""
        return VPCosine(s, t_min, t_max)


def _interp(x: Time, xp: Sequence[float], fp: Sequence[float], xp_t: torch.Tensor,
            fp_t: torch.Tensor) -> Time:
    """Piecewise-linear interpolation with increasing ``xp``, extrapolating the end segments."""
    n = len(xp)
    if isinstance(x, torch.Tensor):
        idx = torch.searchsorted(xp_t, x.contiguous(), right=True).clamp(1, n - 1)
        x0, x1 = xp_t[idx - 1], xp_t[idx]
        f0, f1 = fp_t[idx - 1], fp_t[idx]
        return f0 + (f1 - f0) * (x - x0) / (x1 - x0)
    i = min(max(bisect.bisect_right(xp, x), 1), n - 1)
    return fp[i - 1] + (fp[i] - fp[i - 1]) * (x - xp[i - 1]) / (xp[i] - xp[i - 1])


def _slope(x: Time, xp: Sequence[float], slopes: Sequence[float], xp_t: torch.Tensor,
           slopes_t: torch.Tensor) -> Time:
    n = len(xp)
    if isinstance(x, torch.Tensor):
        idx = torch.searchsorted(xp_t, x.contiguous(), right=True).clamp(1, n - 1)
        return slopes_t[idx - 1]
    return slopes[min(max(bisect.bisect_right(xp, x), 1), n - 1) - 1]


class VPDiscrete(VP):
    """A VP process defined by the betas (or cumulative alphas) of a discrete-time model.

    Continuous-time convention (the one of DPM-Solver): the network's integer
    timestep ``i`` (0-based, ``alphas_cumprod[i]``) sits at ``t = (i + 1) / N``,
    ``t = 0`` is clean data, and ``log alpha`` is piecewise linear in ``t``
    between these nodes. So ``t_min = 1 / N``, ``t_max = 1``, and the network
    receives ``time_input(t) = N t - 1``, which is the integer timestep on the
    nodes and interpolates between them.
    """

    def __init__(self, betas=None, alphas_cumprod=None, name: str = "discrete"):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("VP.discrete: give exactly one of betas= or alphas_cumprod=")
        if betas is not None:
            betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
            if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError("VP.discrete: betas must hold at least 2 values, each in (0, 1)")
            ac = torch.cumprod(1.0 - betas, 0)
        else:
            ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
            if ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
                raise ValueError("VP.discrete: alphas_cumprod must be strictly decreasing values in (0, 1)")
        n = ac.numel()
        self.name = name
        self.num_train_timesteps = n
        self.alphas_cumprod = ac
        self.t_min = 1.0 / n
        self.t_max = 1.0
        self._t_nodes = [0.0] + [(i + 1) / n for i in range(n)]
        self._la_nodes = [0.0] + (0.5 * torch.log(ac)).tolist()
        self._t_nodes_t = torch.tensor(self._t_nodes, dtype=torch.float64)
        self._la_nodes_t = torch.tensor(self._la_nodes, dtype=torch.float64)
        slopes = [(self._la_nodes[i + 1] - self._la_nodes[i]) * n for i in range(n)]
        self._slopes = slopes
        self._slopes_t = torch.tensor(slopes, dtype=torch.float64)
        # log alpha decreases with t: interpolate t against -log alpha (increasing).
        self._neg_la = [-v for v in self._la_nodes]
        self._neg_la_t = -self._la_nodes_t

    def _log_alpha(self, t):
        return _interp(t, self._t_nodes, self._la_nodes, self._t_nodes_t, self._la_nodes_t)

    def _d_log_alpha(self, t):
        return _slope(t, self._t_nodes, self._slopes, self._t_nodes_t, self._slopes_t)

    def t_of_lambda(self, lam):
        lam, _ = _prepare(lam)
        return _interp(-self._log_alpha_of_lambda(lam), self._neg_la, self._t_nodes,
                       self._neg_la_t, self._t_nodes_t)

    def time_input(self, t):
        return self.num_train_timesteps * t - 1.0

    def t_of_timestep(self, timestep):
        """Process time of a network timestep (inverse of ``time_input``)."""
        return (timestep + 1.0) / self.num_train_timesteps


class VPLinear(VP):
    """Continuous VP with ``beta(t) = beta_min + t (beta_max - beta_min)`` on ``[t_min, 1]``."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"VP.linear: need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        if not 0 < t_min < 1:
            raise ValueError(f"VP.linear: t_min must be in (0, 1), got {t_min}")
        self.name = "linear"
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max = float(t_min), 1.0

    def _log_alpha(self, t):
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _d_log_alpha(self, t):
        return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min

    def t_of_lambda(self, lam):
        lam, m = _prepare(lam)
        # Solve the quadratic -log alpha = (b1 - b0) t^2 / 4 + b0 t / 2 for t >= 0,
        # in the cancellation-free form used by DPM-Solver.
        db = self.beta_max - self.beta_min
        tmp = 2.0 * db * m.softplus(-2.0 * lam)
        return tmp / (m.sqrt(self.beta_min ** 2 + tmp) + self.beta_min) / db


class VPCosine(VP):
    """Continuous cosine schedule, ``alpha(t) = cos((t + s) / (1 + s) pi / 2) / cos(s / (1 + s) pi / 2)``.

    ``t_max`` defaults to 0.9946 (as in DPM-Solver) because alpha reaches 0 at 1.
    """

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"VP.cosine: need 0 < t_min < t_max < 1, got {t_min}, {t_max}")
        self.name = "cosine"
        self.s = float(s)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self._log_alpha0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))

    def _log_alpha(self, t):
        _, m = _prepare(t)
        la = m.log(m.cos((t + self.s) / (1 + self.s) * math.pi / 2)) - self._log_alpha0
        # log alpha <= 0; at t = 0 a vectorised log may differ from math.log by an ulp, and a positive
        # log alpha there would make sigma and lambda NaN instead of 0 and inf
        return la.clamp(max=0.0) if isinstance(la, torch.Tensor) else min(la, 0.0)

    def _d_log_alpha(self, t):
        _, m = _prepare(t)
        u = (t + self.s) / (1 + self.s) * math.pi / 2
        return -m.sin(u) / m.cos(u) * math.pi / (2 * (1 + self.s))

    def t_of_lambda(self, lam):
        lam, m = _prepare(lam)
        la = self._log_alpha_of_lambda(lam)
        return 2 * (1 + self.s) / math.pi * m.acos(m.exp(la + self._log_alpha0)) - self.s


# ---------------------------------------------------------------------------
# Variance exploding (EDM) and flow matching
# ---------------------------------------------------------------------------

class EDM(Process):
    """Variance exploding in EDM form: ``alpha = 1``, ``sigma = t`` (Karras et al. 2022).

    Networks receive ``sigma`` itself as their time input.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.name = "edm"
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def alpha(self, t):
        t, _ = _prepare(t)
        return t * 0.0 + 1.0

    def sigma(self, t):
        t, _ = _prepare(t)
        return t

    def d_alpha(self, t):
        t, _ = _prepare(t)
        return t * 0.0

    def d_sigma(self, t):
        t, _ = _prepare(t)
        return t * 0.0 + 1.0

    def lambda_(self, t):
        t, m = _prepare(t)
        return -m.log(t)

    def t_of_lambda(self, lam):
        lam, m = _prepare(lam)
        return m.exp(-lam)

    def ode_sigma(self, t):
        t, _ = _prepare(t)
        return t

    def t_of_ode_sigma(self, s):
        s, _ = _prepare(s)
        return s


class Flow(Process):
    """Rectified flow / flow matching: ``alpha = 1 - t``, ``sigma = t``, noise at ``t = 1``.

    ``velocity`` predictions are ``d x_t / d t = eps - x0``. The k-diffusion
    solver family integrates in ``(x, t)`` here, which is finite at ``t = 1``.
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0):
        if not 0 < t_min < t_max <= 1:
            raise ValueError(f"Flow: need 0 < t_min < t_max <= 1, got {t_min}, {t_max}")
        self.name = "flow"
        self.t_min, self.t_max = float(t_min), float(t_max)

    @property
    def prior_std(self) -> float:
        return 1.0

    def alpha(self, t):
        t, _ = _prepare(t)
        return 1.0 - t

    def sigma(self, t):
        t, _ = _prepare(t)
        return t

    def d_alpha(self, t):
        t, _ = _prepare(t)
        return t * 0.0 - 1.0

    def d_sigma(self, t):
        t, _ = _prepare(t)
        return t * 0.0 + 1.0

    def t_of_lambda(self, lam):
        lam, m = _prepare(lam)
        # t = sigmoid(-lambda), written to stay finite for large |lambda|.
        return m.exp(-m.softplus(lam))

    def ode_scale(self, t):
        t, _ = _prepare(t)
        return t * 0.0 + 1.0

    def ode_sigma(self, t):
        t, _ = _prepare(t)
        return t

    def t_of_ode_sigma(self, s):
        s, _ = _prepare(s)
        return s
