"""Noise for stochastic solvers, keyed per sample so a sample never depends on its batch.

``StepNoise`` takes one 63-bit key per sample from the caller's generator (one
draw per sample, in batch order) and then produces the standard normal noise of
step ``i`` as a pure function of ``(key, i, stream, element index)``: a
counter-based generator (SplitMix64 finaliser, Steele et al. 2014, as the
mixing function; Box-Muller for the Gaussian). Consequences:

* sample ``k`` of a batch of 3 and of a batch of 300 see the same noise, given
  the same generator state (torch's own ``randn`` cannot promise that: its
  vectorised kernel produces different numbers for different tensor sizes);
* the numbers are the same on every device, since they are computed with
  integer arithmetic that is identical on CPU and GPU;
* no generator state is carried between steps, so a step can be replayed.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["StepNoise", "sample_keys"]

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # SplitMix64 multipliers as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_KEY_LIMIT = 1 << 62


def _wrap(v: int) -> int:
    """A Python integer reduced modulo 2^64 into the signed int64 range."""
    return ((v + (1 << 63)) % (1 << 64)) - (1 << 63)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _M1  # int64 products wrap modulo 2^64, as SplitMix64 needs
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """53 high bits -> float64 uniform in the open interval (0, 1)."""
    return (_shr(bits, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def sample_keys(batch: int, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """One key per sample: the k-th draw from ``generator``, or a draw from the k-th generator of a list."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"generator: a list needs one generator per sample ({batch}), got {len(generator)}")
        gens = list(generator)
    else:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, a list of them, or None; "
                            f"got {type(generator).__name__}")
        gens = [generator] * batch
    keys = [int(torch.randint(0, _KEY_LIMIT, (1,), generator=g, device=g.device if g is not None else "cpu"))
            for g in gens]
    return torch.tensor(keys, dtype=torch.int64)


class StepNoise:
    """Standard normal noise shaped like the samples, one independent draw per ``(step, stream)``.

    ``draw(step, stream=0)`` returns a tensor of ``shape`` in ``dtype`` on
    ``device``; solvers that need several draws in one step use different
    streams.
    """

    def __init__(self, keys: torch.Tensor, shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device | str):
        self.shape = tuple(shape)
        self.dtype, self.device = dtype, torch.device(device)
        self.per_sample = math.prod(self.shape[1:])
        pairs = (self.per_sample + 1) // 2
        # Per-sample base counters and per-element offsets, computed once.
        self._keys = _mix(keys.to(self.device).reshape(-1, 1))
        self._offsets = torch.arange(pairs, dtype=torch.int64, device=self.device).reshape(1, -1) * _wrap(2 * _GOLDEN)

    @classmethod
    def from_generator(cls, generator, shape, dtype, device) -> "StepNoise":
        return cls(sample_keys(shape[0], generator), shape, dtype, device)

    def draw(self, step: int, stream: int = 0) -> torch.Tensor:
        counter = _mix(self._keys + _wrap((step * 1_000_003 + stream + 1) * _GOLDEN))
        base = counter + self._offsets
        u1 = _uniform(_mix(base))
        u2 = _uniform(_mix(base + _GOLDEN))
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u2
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, : self.per_sample]
        return z.reshape(self.shape).to(self.dtype)
