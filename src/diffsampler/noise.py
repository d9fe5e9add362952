"""Noise for stochastic solvers, keyed per sample so a sample never depends on its batch.

``StepNoise`` takes one 64-bit key per sample from the caller's generator (see
:func:`sample_keys`) and then produces the standard normal noise of
step ``i`` as a pure function of ``(key, i, stream, element index)``: a
counter-based generator (SplitMix64 finaliser, Steele et al. 2014, as the
mixing function; Box-Muller for the Gaussian). Consequences:

* sample ``k`` of a batch of 3 and of a batch of 300 see the same noise, given
  the same generator state (torch's own ``randn`` cannot promise that: its
  vectorised kernel produces different numbers for different tensor sizes);
* the numbers are the same on every device, since they are computed with
  integer arithmetic that is identical on CPU and GPU;
* no generator state is carried between steps, so a step can be replayed.

``GeneratorNoise`` is the other choice (``sample(..., noise="diffusers")``): each draw is the
next ``randn`` of the caller's generator(s), exactly as diffusers' schedulers and pipelines draw
(:func:`diffusers_randn`), so a seed reproduces a diffusers image. It gives up the properties
above: a sample then depends on its batch and on every earlier draw.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["StepNoise", "BrownianNoise", "GeneratorNoise", "NOISE_KINDS", "sample_keys", "keys_for", "standard_normal",
           "copy_numbers", "diffusers_randn"]

#: The noise a sampling run can draw: keyed per sample (the default) or diffusers' generator draws.
NOISE_KINDS = ("keyed", "diffusers")

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
    """One key per sample.

    From a single generator: one draw (whatever the batch size), and sample
    ``k`` gets a key mixed from that draw and ``k``, so the generator advances by
    the same amount for every batch size and sample ``k`` is the same in every
    batch. From a list of generators (one per sample, as in diffusers): one
    draw from each.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"generator: a list needs one generator per sample ({batch}), got {len(generator)}")
        draws = [_draw(g) for g in generator]
        return _mix(torch.tensor(draws, dtype=torch.int64))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, a list of them, or None; "
                        f"got {type(generator).__name__}")
    base = _draw(generator)
    return _mix(base + torch.arange(batch, dtype=torch.int64) * _GOLDEN)


def keys_for(seed: int, indices, draw: int = 0) -> torch.Tensor:
    """The keys of samples ``indices`` from ``seed`` alone, without drawing every sample before them.

    Equal to ``sample_keys(n, g)[indices]`` for ``g = torch.Generator().manual_seed(seed)`` after
    ``draw`` earlier draws from ``g``: ``draw=0`` are the keys ``process.prior(shape, generator=g)``
    uses, ``draw=1`` those a stochastic solver then takes from the same ``g``. So a sample is a
    function of ``(seed, index)`` only, whichever batch or worker makes it.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"keys_for: seed must be an integer, got {type(seed).__name__}")
    g = torch.Generator().manual_seed(seed)
    for _ in range(int(draw)):
        _draw(g)
    base = _draw(g)
    return _mix(base + torch.as_tensor(indices, dtype=torch.int64).cpu() * _GOLDEN)


def _draw(generator: torch.Generator | None) -> int:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, _KEY_LIMIT, (1,), generator=generator, device=device))


def copy_numbers(indices: torch.Tensor) -> torch.Tensor:
    """For each entry of ``indices``, how many earlier entries hold the same value (0 for a first copy)."""
    order = torch.argsort(indices, stable=True)
    ordered = indices[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    position = torch.arange(len(indices))
    run_start = torch.cummax(torch.where(first, position, torch.zeros_like(position)), 0).values
    copy = torch.empty_like(position)
    copy[order] = position - run_start
    return copy


def standard_normal(shape: Sequence[int], generator=None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """``randn`` whose sample ``k`` does not depend on the batch size and is the same on every device."""
    if device is None:
        device = generator.device if isinstance(generator, torch.Generator) else "cpu"
    return StepNoise(sample_keys(shape[0], generator), shape, dtype, device).draw(0)


class StepNoise:
    """Standard normal noise shaped like the samples, one independent draw per ``(step, stream)``.

    ``draw(step, stream=0)`` returns a tensor of ``shape`` in ``dtype`` on
    ``device``; solvers that need several draws in one step use different
    streams.
    """

    def __init__(self, keys: torch.Tensor, shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device | str):
        self.shape = tuple(shape)
        self.keys = keys
        self.dtype, self.device = dtype, torch.device(device)
        self.per_sample = math.prod(self.shape[1:])
        pairs = (self.per_sample + 1) // 2
        # Per-sample base counters and per-element offsets, computed once.
        self._keys = _mix(keys.to(self.device).reshape(-1, 1))
        self._offsets = torch.arange(pairs, dtype=torch.int64, device=self.device).reshape(1, -1) * _wrap(2 * _GOLDEN)
        self.spawns = torch.zeros(len(keys), dtype=torch.int64)  # copies each key has had made (see take)

    @classmethod
    def from_generator(cls, generator, shape, dtype, device) -> "StepNoise":
        return cls(sample_keys(shape[0], generator), shape, dtype, device)

    def draw(self, step: int, stream: int = 0) -> torch.Tensor:
        return self._normal(step * 1_000_003 + stream + 1)

    def with_keys(self, keys: torch.Tensor, spawns: torch.Tensor | None = None) -> "StepNoise":
        """The same noise for the samples of ``keys`` (one per sample; the batch may change size)."""
        other = StepNoise(keys, (len(keys),) + self.shape[1:], self.dtype, self.device)
        if spawns is not None:
            other.spawns = spawns
        return other

    def take(self, indices: torch.Tensor) -> "StepNoise":
        """The noise of a reindexed batch (particle ``k`` becomes a copy of ``indices[k]``).

        The first copy of a particle keeps its key, so a reindexing that copies every particle
        once changes no draw; each further copy gets a key derived from its parent's key, its
        copy number and how many times that key has had copies made before (``spawns``, carried
        with the particle), so the copies made at different reindexings of one parent differ
        too, and a particle's keys depend only on its own lineage, never on how often the other
        particles were reindexed (populations resampled on their own ESS). Copies then draw
        independent noise from here on, which steering needs: copies that drew the same noise
        would stay identical (the failure FK steering's authors report for deterministic
        samplers, their issue #7).
        """
        indices = indices.to(torch.int64).cpu()
        parents = self.keys.cpu()[indices]
        spawns = self.spawns[indices]
        copy = copy_numbers(indices)
        derived = _mix(_mix(parents + spawns * _wrap(_M2)) + copy * _GOLDEN)
        # a parent copied more than once has spawned: its first copy counts it, the new keys start at 0
        spawned = torch.zeros(len(self.keys), dtype=torch.int64).index_add_(0, indices, torch.ones_like(indices)) > 1
        first = copy == 0
        new_spawns = torch.where(first, spawns + spawned[indices].to(torch.int64), torch.zeros_like(spawns))
        return self.with_keys(torch.where(first, parents, derived), new_spawns)

    def _normal(self, counter_id: int) -> torch.Tensor:
        """The standard normal tensor of one counter value (steps use ids below 2^40)."""
        counter = _mix(self._keys + _wrap(counter_id * _GOLDEN))
        base = counter + self._offsets
        u1 = _uniform(_mix(base))
        u2 = _uniform(_mix(base + _GOLDEN))
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u2
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, : self.per_sample]
        return z.reshape(self.shape).to(self.dtype)


class BrownianNoise(StepNoise):
    """Noise from one Brownian path per sample, so a path does not change with the step count.

    ``between(a, b)`` is ``(W(b) - W(a)) / sqrt(|b - a|)`` for a Brownian motion ``W``
    on the time interval ``[lo, hi]``: a standard normal, and increments over
    adjacent intervals add up as the path's do. ``draw(i)`` is the increment over
    knot interval ``i`` of the times given at construction. Each sample's path is a
    pure function of its key: ``W`` is built by dyadic Brownian-bridge bisection
    (Levy's construction), node by node from the keyed generator, to ``depth``
    levels and linearly inside the last one (an error of standard deviation
    ``2^(-depth/2) / 2`` of the path's scale). The nodes of the last two paths are
    kept, so memory stays at ``2 depth`` samples' worth however long the run.
    """

    def __init__(self, keys: torch.Tensor, shape, dtype, device, times, lo: float, hi: float, depth: int = 24):
        super().__init__(keys, shape, dtype, device)
        if not hi > lo:
            raise ValueError(f"BrownianNoise: need lo < hi, got {lo}, {hi}")
        self.times = [float(t) for t in times]
        self.lo, self.hi, self.depth = float(lo), float(hi), int(depth)
        # Nodes of the last two root-to-leaf paths: consecutive queries (the two ends of a
        # step, then the next step) share most of their path, and memory stays at 2 paths.
        self._current: dict[tuple[int, int], torch.Tensor] = {}
        self._previous: dict[tuple[int, int], torch.Tensor] = {}

    def with_keys(self, keys: torch.Tensor, spawns: torch.Tensor | None = None) -> "BrownianNoise":
        # The caches hold values of the old keys' paths: the new object starts without them.
        other = BrownianNoise(keys, (len(keys),) + self.shape[1:], self.dtype, self.device, self.times,
                              self.lo, self.hi, self.depth)
        if spawns is not None:
            other.spawns = spawns
        return other

    def _z(self, level: int, index: int) -> torch.Tensor:
        key = (level, index)
        z = self._current.get(key)
        if z is None:
            z = self._previous.get(key)
            if z is None:
                # step noise uses counter ids below 2^40; the tree's nodes live above
                z = self._normal(((level + 1) << 40) | index).to(torch.float64)
            self._current[key] = z
        return z

    def _w(self, tau: float) -> torch.Tensor:
        """W at ``tau``, in units where ``W(hi) - W(lo)`` has variance 1 (scaled by the caller)."""
        u = min(max((tau - self.lo) / (self.hi - self.lo), 0.0), 1.0)
        self._previous, self._current = self._current, {}
        a, b, wa, wb, index = 0.0, 1.0, torch.zeros((), dtype=torch.float64), self._z(0, 0), 0
        for level in range(1, self.depth + 1):
            m = 0.5 * (a + b)
            wm = 0.5 * (wa + wb) + math.sqrt(0.25 * (b - a)) * self._z(level, index)
            if u < m:
                b, wb, index = m, wm, 2 * index
            else:
                a, wa, index = m, wm, 2 * index + 1
        return wa + (wb - wa) * ((u - a) / (b - a))

    def between(self, a: float, b: float) -> torch.Tensor:
        if a == b:
            raise ValueError("BrownianNoise.between: the interval is empty")
        inc = (self._w(b) - self._w(a)) / math.sqrt(abs(b - a) / (self.hi - self.lo))
        return inc.to(self.dtype)

    def draw(self, step: int, stream: int = 0) -> torch.Tensor:
        return self.between(self.times[step], self.times[step + 1])


def diffusers_randn(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' ``randn_tensor`` draws it, for reproducing its images.

    One ``torch.randn`` of the whole shape from ``generator``, or, for a list of generators (one per
    sample, as diffusers pipelines accept), one row from each. The draw happens on the generator's
    device and the result moves to ``device`` (a CPU generator seeds the same image on every device).
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: a list needs one generator per sample ({shape[0]}), got {len(generator)}")
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator: a list must hold torch.Generator objects only")
        rows = [torch.randn((1,) + shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
        out = torch.cat(rows, 0)
    else:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, a list of them, or None; "
                            f"got {type(generator).__name__}")
        here = generator.device if generator is not None else (device if device is not None else "cpu")
        out = torch.randn(shape, generator=generator, device=here, dtype=dtype)
    return out if device is None else out.to(device)


class GeneratorNoise:
    """Noise drawn from the caller's generator(s) in call order, as diffusers' schedulers draw it.

    ``draw(step, stream)`` ignores its arguments and returns the next :func:`diffusers_randn`: the
    solvers whose diffusers counterpart draws once per step (DDIM with ``eta``, Euler ancestral,
    DPM-Solver++ SDE) then see diffusers' very numbers. A step cannot be replayed, particles cannot
    be copied (their copies would need noise of their own), and a Brownian path is not available.
    """

    def __init__(self, generator, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str):
        self.generator, self.shape = generator, tuple(shape)
        self.dtype, self.device = dtype, torch.device(device)

    def draw(self, step: int, stream: int = 0) -> torch.Tensor:
        return diffusers_randn(self.shape, self.generator, self.dtype, self.device)

    def take(self, indices: torch.Tensor) -> "GeneratorNoise":
        raise ValueError("noise='diffusers' draws in call order from the caller's generator and cannot follow "
                         "reindexed particles; steering and other particle methods need noise='keyed'")
