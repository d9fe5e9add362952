"""Edit-friendly DDPM noise space: the noise maps that make a DDPM run reproduce a given image.

Huberman-Spiegelglas, Kulikov & Michaeli 2024, "An Edit Friendly DDPM Noise Space: Inversion and
Manipulations" (CVPR 2024, arXiv:2304.06140). The inversion draws ``x_{t_k} = alpha_k x0 + sigma_k eps_k``
with an independent ``eps_k`` at every grid time (not a Markov chain), then for each step from
``t_k`` to ``t_{k+1}`` extracts the noise map that takes the DDPM step from ``x_{t_k}`` exactly to
``x_{t_{k+1}}``:

    mu_k = alpha_{k+1} x0_hat(x_{t_k}) + sqrt(sigma_{k+1}^2 - eta var_k) eps_hat(x_{t_k}),
    z_k  = (x_{t_{k+1}} - mu_k) / (eta sqrt(var_k)),

where ``var_k = sigma_{k+1}^2 (1 - e^{-2h})`` is the DDPM posterior's variance (``(1 - abar_{t-1}) / (1 -
abar_t) (1 - abar_t / abar_{t-1})`` for VP). The direction term is the authors' code's
``sqrt(1 - abar_prev - eta var)`` (METHODS section 9): with it the noise has standard deviation
``eta sqrt(var)``, exact reconstruction holds for every ``eta``, but for ``eta != 1`` it is not DDIM(eta)
(``direction="ddim"`` takes DDIM's ``sqrt(sigma'^2 - eta^2 var)``). As in their code the next step
starts from ``mu_k + eta sqrt(var_k) z_k``, the point regeneration computes, so regeneration with the
same model, condition and guidance scale reproduces the image up to rounding. ``x0`` itself is a step
with no posterior noise (``var = 0`` into ``t = 0``): its residual ``x0 - mu`` is kept as the last map, so
the reconstruction is exact; ``zero_last=True`` drops it as the authors' code does (``zs[0] = 0``).

Editing: invert with the source model (``ds.guidance.cfg(model, 3.5)``, the paper's source scale) under
the source condition, regenerate with the target model (scale 15) under the target condition, from
``grid[skip]`` (``skip``, the paper's ``T - t_start``, keeps the structure of the image). The paper
reports that the maps are not standard normal: their variance is larger than one and they are correlated
across steps (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..noise import StepNoise, sample_keys
from .base import Inversion, InversionMethod, finite_number, nfe_of

__all__ = ["edit_friendly"]

DIRECTIONS = ("paper", "ddim")


@dataclass(frozen=True)
class edit_friendly(InversionMethod):  # noqa: N801 - used like a function
    """Edit-friendly DDPM inversion with ``eta`` in (0, 1], starting regeneration at ``grid[skip]``."""

    eta: float = 1.0
    skip: int = 0
    direction: str = "paper"
    zero_last: bool = False

    name = "edit_friendly"
    paper = "Huberman-Spiegelglas, Kulikov & Michaeli 2024, arXiv:2304.06140"

    def __post_init__(self):
        self._require(finite_number(self.eta) and 0 < self.eta <= 1, "eta", "a number in (0, 1]")
        self._require(isinstance(self.skip, int) and not isinstance(self.skip, bool) and self.skip >= 0,
                      "skip", "an integer >= 0, below the grid's number of steps")
        self._require(self.direction in DIRECTIONS, "direction", " or ".join(map(repr, DIRECTIONS)))
        self._require(isinstance(self.zero_last, bool), "zero_last", "True or False")

    def _plan(self, process, grid):
        """Per step ``(t_k, alpha', direction weight, noise std)``."""
        t = grid.tolist()
        if self.skip >= len(t) - 1:
            raise ValueError(f"inversion 'edit_friendly': skip = {self.skip} leaves no step of the "
                             f"{len(t) - 1}-step grid; allowed: 0 to {len(t) - 2}")
        out = []
        for k in range(len(t) - 1):
            a1, s1 = float(process.alpha(t[k + 1])), abs(float(process.sigma(t[k + 1])))
            lam0, lam1 = float(process.lambda_(t[k])), float(process.lambda_(t[k + 1]))
            var = s1 * s1 * -math.expm1(-2.0 * (lam1 - lam0)) if s1 > 0 else 0.0
            e = self.eta if self.direction == "paper" else self.eta ** 2
            out.append((t[k], a1, math.sqrt(max(0.0, s1 * s1 - e * var)), self.eta * math.sqrt(var)))
        return out

    def invert(self, model, x0, grid, *, generator=None, **cond) -> Inversion:
        process = model.process
        plan = self._plan(process, grid)
        t = grid.tolist()
        before = nfe_of(model)
        noise = StepNoise(sample_keys(x0.shape[0], generator), x0.shape, x0.dtype, x0.device)

        def noised(k):
            if t[k] == 0.0:
                return x0
            return x0 * float(process.alpha(t[k])) + noise.draw(k) * abs(float(process.sigma(t[k])))

        x_first = noised(0)
        x = x_first if self.skip == 0 else noised(self.skip)
        start, maps = x, []
        for k in range(self.skip, len(plan)):
            tk, a1, d, c = plan[k]
            pred = model(x, tk, **cond)
            mu = pred.x0 * a1 + pred.eps * d
            target = noised(k + 1)
            last = k == len(plan) - 1
            if c > 0:
                z = (target - mu) / c
                if last and self.zero_last:
                    z = torch.zeros_like(z)
                x = mu + z * c
            else:  # no posterior noise (into t = 0): keep the residual as it is
                z = target - mu if not self.zero_last else torch.zeros_like(mu)
                x = mu + z
            maps.append(z)
        return Inversion(x_first, self, grid, {"start": start, "noise": tuple(maps)}, nfe_of(model) - before)

    def regenerate(self, model, inv, grid, **cond) -> torch.Tensor:
        g = self.check(inv, grid, model.process)
        plan = self._plan(model.process, g)
        x = inv.data["start"]
        for (tk, a1, d, c), z in zip(plan[self.skip:], inv.data["noise"]):
            pred = model(x, tk, **cond)
            mu = pred.x0 * a1 + pred.eps * d
            x = mu + z * c if c > 0 else mu + z
        return x
