"""``sample()``: the one loop that drives every solver over a grid."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Sequence

import torch

from . import grids as _grids
from . import solvers as _solvers
from .denoiser import Denoiser, Prediction
from .noise import NOISE_KINDS, BrownianNoise, GeneratorNoise, StepNoise, sample_keys

__all__ = ["sample", "Run", "NonFiniteError", "take"]

# Steps between looks for NaN and inf in the sample. A look is a reduction, and on accelerators a host
# sync, so there they are rare. On CPU a sync costs nothing, but the samples kept between looks (to name
# the bad step) compete for cache with the solver's own tensors: measured at (1, 4, 128, 128), keeping 8
# cost a DPM-Solver++(2M) step about as much as all its arithmetic and keeping 2 nothing (the solver holds
# the previous sample anyway). So on CPU at most CPU_WINDOW_BYTES of samples are kept, and at least 2 steps.
CHECK_EVERY = 8
CPU_WINDOW_BYTES = 512 * 1024


def _check_every(x: torch.Tensor) -> int:
    if x.device.type != "cpu":
        return CHECK_EVERY
    return max(2, min(CHECK_EVERY, CPU_WINDOW_BYTES // max(1, x.numel() * x.element_size())))


class NonFiniteError(FloatingPointError):
    """Sampling produced NaN or infinite values; the message names the step and the times."""

    def __init__(self, step: int, t: float, t_next: float, solver: str):
        self.step, self.t, self.t_next = step, t, t_next
        super().__init__(f"non-finite values (NaN or inf) in the sample after step {step} "
                         f"(t = {t:.6g} -> {t_next:.6g}) of solver {solver!r}; the model's output or "
                         f"the sample diverged there")


def _is_finite(x: torch.Tensor) -> bool:
    # NaN and inf propagate through a sum (accumulated in float32 at least, so half inputs
    # cannot overflow it): one reduction and one read, cheaper than isfinite().all().
    return math.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32).item())


def _first_non_finite(samples: list[torch.Tensor]) -> int:
    """Index of the first sample with a NaN or inf (the caller knows the last one has one)."""
    return next(k for k, x in enumerate(samples) if not _is_finite(x))


def _compute_initial_state(solver, process, grid: tuple, shape: tuple, dtype, device):
    knots = _solvers.Knots.from_grid(process, torch.tensor(grid, dtype=torch.float64))
    return knots, solver.init(knots, torch.empty(shape, dtype=dtype, device=device))


_cached_initial_state = functools.lru_cache(maxsize=64)(_compute_initial_state)


def _initial_state(solver, process, grid: tuple, shape: tuple, dtype, device):
    """Knots and the solver's initial state, computed once per (solver, process, grid, batch layout).

    Repeated calls with the same grid (generating batch after batch) then pay for
    neither. Solvers are frozen and their initial states immutable, so sharing is
    safe; a user's solver that is not hashable simply skips the cache.
    """
    try:
        return _cached_initial_state(solver, process, grid, shape, dtype, device)
    except TypeError:
        return _compute_initial_state(solver, process, grid, shape, dtype, device)


def take(obj, indices: torch.Tensor, batch: int, memo: dict | None = None):
    """``obj`` with every per-sample tensor in it reindexed along the batch: ``x[indices]``.

    ``obj`` is a sample, a solver state, a :class:`~diffsampler.Prediction` or any nesting of
    tuples (named ones too), lists and dicts of them. A tensor is per-sample when its first
    dimension is the batch (``batch``): every solver keeps its per-sample tensors batch-first
    (a contract test over the registry holds them to it); other tensors, numbers and objects are
    shared and returned as they are. ``memo`` maps each source tensor to its reindexed copy, so
    two references to one tensor (a Prediction's ``at`` and the sample it was evaluated at) stay
    one tensor after reindexing, and solvers that recognise a tensor by identity (``combine``
    folds an answer at the point being moved) take exactly the same kernels as before.
    """
    if memo is None:
        memo = {}
    if isinstance(obj, torch.Tensor):
        if obj.ndim == 0 or obj.shape[0] != batch:
            return obj
        hit = memo.get(id(obj))
        if hit is None:
            hit = memo[id(obj)] = (obj, obj.index_select(0, indices.to(obj.device)))
        return hit[1]
    if type(obj) is Prediction:
        other = Prediction.__new__(Prediction)
        for name in Prediction.__slots__:
            setattr(other, name, take(getattr(obj, name), indices, batch, memo))
        return other
    if isinstance(obj, tuple):
        items = [take(v, indices, batch, memo) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)._make(items) if hasattr(type(obj), "_make") else tuple(items)
    if isinstance(obj, list):
        return [take(v, indices, batch, memo) for v in obj]
    if isinstance(obj, dict):
        return {k: take(v, indices, batch, memo) for k, v in obj.items()}
    return obj


class Run:
    """One sampling run, advanced a step at a time: what :func:`sample` loops over, and what steering,
    inversion and the diffusers adapter drive.

    ``Run(model, x, grid, solver, generator=..., brownian=..., **cond)`` validates its inputs as
    :func:`sample` does and sets up the solver's state and noise. Then:

    * ``run.step()`` advances the sample over the next grid interval and returns it;
      ``run.i`` is the index of the next step (``len(run)`` steps in all), ``run.t`` the
      current time and ``run.x`` the current sample;
    * ``run.prediction`` is the model's answer at the start of the last step (its first
      evaluation in that step; ``None`` before the first step);
    * ``run.evaluate()`` is the model's answer at ``(run.x, run.t)``. It is kept, and the next
      step uses it in place of its own first evaluation when that is at the same point and
      time (every solver without churn), so reading a data estimate between steps costs
      no network evaluation;
    * ``run.take(indices)`` reindexes the particles: the sample, the solver's state, the kept
      answer and the noise keys move with their particle. A particle that receives several
      copies keeps its key in the first copy and gives the others keys derived from its own
      (:meth:`~diffsampler.noise.StepNoise.take`), so copies part ways under any stochastic
      solver instead of staying identical;
    * ``run.x = y`` replaces the sample (the kept answer is dropped).

    ``run.sample_evaluations`` counts network evaluations times the batch they were made on
    (a batched call on ``b`` samples counts ``b``): what a particle method spends in all.

    ``backward=True`` (the inversion path, :mod:`diffsampler.inversion`; :func:`sample` never takes
    it) runs a strictly increasing grid, from data towards noise, with a deterministic solver: the
    engines step in log-SNR and their steps are the same formulas with negative step sizes. Such
    a grid starts above ``t = 0``, where no solver can take a step (the inversion's first step
    from a data point is :func:`diffsampler.inversion.first_step`).
    """

    def __init__(self, model: Denoiser, x: torch.Tensor, grid, solver, *,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 brownian: bool = False, backward: bool = False, noise: str = "keyed", **cond):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.ndim < 1 or x.shape[0] < 1:
            raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
        if x.device.type == "meta":
            raise ValueError("x is on the 'meta' device (a shape without data); sampling needs its values: "
                             "create it on 'cpu' or an accelerator")
        process = getattr(model, "process", None)
        if process is None or not callable(model):
            raise TypeError(f"model must be a diffsampler Denoiser (callable with a .process), "
                            f"got {type(model).__name__}")
        self.model, self.cond = model, cond
        self.solver = solver = _solvers.resolve(solver)
        if backward:
            grid = _backward_grid(process, grid, solver)
        else:
            grid = _grids.validate(process, grid)
        self.knots, self.state = _initial_state(solver, process, tuple(grid.tolist()), tuple(x.shape),
                                                x.dtype, x.device)
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
        self.noise = None
        if solver.stochastic and noise == "diffusers":
            if brownian or solver.brownian:
                raise ValueError(f"noise='diffusers' draws independent normals per step; solver {solver.name!r}"
                                 f"{' needs' if solver.brownian else ' with brownian=True asks for'} a Brownian path: "
                                 f"use noise='keyed'")
            self.noise = GeneratorNoise(generator, x.shape, x.dtype, x.device)
        elif solver.stochastic:
            keys = sample_keys(x.shape[0], generator)
            if brownian or solver.brownian:
                top = float(process.ode_sigma(process.t_max))
                self.noise = BrownianNoise(keys, x.shape, x.dtype, x.device, self.knots.s, 0.0, top)
            else:
                self.noise = StepNoise(keys, x.shape, x.dtype, x.device)
        self._x = x
        self.i = 0
        self.prediction: Prediction | None = None
        self.sample_evaluations = 0
        self._kept: tuple | None = None   # run.evaluate()'s (x, t_i, answer)
        # The network as solvers call it: bare (the fast path of sample()) until a driver asks for
        # the step's answer or keeps one; then through _watched, which records and reuses answers.
        self._plain = (lambda x_, t_: model(x_, t_, **self.cond)) if cond else model
        self._fn = self._plain
        self._watching = False
        # Non-finite values are looked for once every few steps, in the newest sample: NaN and inf
        # persist through every later step, so a bad step shows there. The samples since the last
        # look are kept (solvers never write into a sample they returned) to name the first bad step.
        self._window: list[torch.Tensor] = []
        self.check_every = _check_every(x)

    def __len__(self) -> int:
        return len(self.knots)

    @property
    def done(self) -> bool:
        return self.i >= len(self.knots)

    @property
    def t(self) -> float:
        """The process time of the current sample."""
        return self.knots.t[self.i]

    @property
    def x(self) -> torch.Tensor:
        return self._x

    @x.setter
    def x(self, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor) or value.shape != self._x.shape or value.dtype != self._x.dtype:
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"run.x: the new sample must keep the batch's shape and dtype "
                             f"({tuple(self._x.shape)} {self._x.dtype}), got {got}")
        self._x, self._kept = value, None

    def watch(self) -> "Run":
        """Record each step's first answer in ``run.prediction`` and count evaluations (drivers call this)."""
        self._fn, self._watching = self._watched, True
        return self

    def _call(self, x: torch.Tensor, t) -> Prediction:
        before = self.model.nfe
        pred = self._plain(x, t)
        self.sample_evaluations += (self.model.nfe - before) * x.shape[0]
        return pred

    def _watched(self, x: torch.Tensor, t) -> Prediction:
        kept = self._kept
        if kept is not None:
            self._kept = None
            kept_x, kept_t, pred = kept
            if not (kept_x is x and type(t) is float and t == kept_t):
                pred = self._call(x, t)
        else:
            pred = self._call(x, t)
        if self.prediction is None:
            self.prediction = pred
        return pred

    def evaluate(self) -> Prediction:
        """The model's answer at the current sample and time, kept for the next step to reuse."""
        if self.done:
            raise RuntimeError("run.evaluate(): the run is finished (no time left to evaluate at)")
        if not self._watching:
            self.watch()
        if self._kept is None or self._kept[0] is not self._x:
            t = self.knots.t[self.i]
            self._kept = (self._x, t, self._call(self._x, t))
        pred = self._kept[2]
        # a copy, so that forms the caller reads are not formed in the answer the solver folds
        return pred.with_renoise(pred.renoise)

    def step(self) -> torch.Tensor:
        """Advance over grid interval ``run.i``; return the new sample."""
        i = self.i
        if i >= len(self.knots):
            raise RuntimeError(f"run.step(): all {len(self.knots)} steps of the grid are done")
        if self._watching:
            self.prediction = None
        x, self.state = self.solver.step(self._fn, self._x, i, self.state, self.noise)
        self._x, self.i = x, i + 1
        window = self._window
        window.append(x)
        if len(window) >= self.check_every or self.i == len(self.knots):
            if not _is_finite(x):
                j = i - len(window) + 1 + _first_non_finite(window)
                raise NonFiniteError(j, self.knots.t[j], self.knots.t[j + 1], self.solver.name)
            window.clear()
        return x

    def take(self, indices) -> None:
        """Reindex the particles: particle ``k`` becomes a copy of particle ``indices[k]``.

        ``indices`` is a 1-D integer tensor (or sequence) of any length ``n``; the run then holds
        ``n`` particles. Everything per particle moves with it (see the class docstring).
        """
        indices = torch.as_tensor(indices)
        batch = self._x.shape[0]
        if indices.ndim != 1 or indices.dtype not in (torch.int64, torch.int32) or len(indices) == 0:
            raise ValueError(f"run.take: indices must be a non-empty 1-D integer tensor, got "
                             f"{tuple(indices.shape)} {indices.dtype}")
        if int(indices.min()) < 0 or int(indices.max()) >= batch:
            raise ValueError(f"run.take: indices must lie in [0, {batch}), got values from "
                             f"{int(indices.min())} to {int(indices.max())}")
        indices = indices.to(torch.int64)
        self._flush_window()
        memo: dict = {}
        self._x = take(self._x, indices, batch, memo)
        self.state = take(self.state, indices, batch, memo)
        self.cond = take(self.cond, indices, batch, memo)  # per-sample conditioning follows its particle
        if self._kept is not None:
            self._kept = take(self._kept, indices, batch, memo)
        if self.prediction is not None:
            self.prediction = take(self.prediction, indices, batch, memo)
        if self.noise is not None:
            self.noise = self.noise.take(indices)

    def _flush_window(self) -> None:
        """Look for NaN/inf in the samples kept since the last look (a reindexing reshapes the batch)."""
        window = self._window
        if window and not _is_finite(window[-1]):
            j = self.i - len(window) + _first_non_finite(window)
            raise NonFiniteError(j, self.knots.t[j], self.knots.t[j + 1], self.solver.name)
        window.clear()


def _backward_grid(process, grid, solver) -> torch.Tensor:
    """The increasing grid of a backward run, checked, with a solver that can run it."""
    _solvers.base.require_grid_steps(solver, "backward run", "and cannot be run backward")
    g = _grids.validate(process, grid, increasing=True)
    if g[0] == 0.0:
        raise ValueError("a backward run cannot start at t = 0 (no solver steps from a data point); start it at the "
                         "grid's smallest positive time, as diffsampler.inversion.invert does")
    return g


def sample(model: Denoiser, x: torch.Tensor, grid, solver, *,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           callback: Callable[[dict], None] | None = None, progress: bool = False,
           brownian: bool = False, noise: str = "keyed", grad: bool = False, **cond) -> torch.Tensor:
    """Integrate from ``x`` at ``grid[0]`` to ``grid[-1]`` with ``solver``; return the final sample.

    Parameters
    ----------
    model:
        A :class:`~diffsampler.Denoiser` (or a guidance transform of one).
    x:
        The starting sample at time ``grid[0]``, shape ``(batch, ...)``, floating point.
    grid:
        Strictly decreasing process times (see :mod:`diffsampler.grids`).
    solver:
        A registered solver name (``diffsampler.solvers.names()``) or a solver object.
    generator:
        The source of every random draw of a stochastic solver: a
        ``torch.Generator`` or one per sample. One key per sample is drawn from it,
        so a sample does not depend on the batch it is drawn in. ``None`` uses
        torch's default generator.
    callback:
        Called after each step with ``{"i", "t", "t_next", "x", "denoised"}``: the step's index, its
        times, the new sample and the data estimate the step started from (the model's first
        answer in it, as k-diffusion's callbacks see it). A callback that returns a tensor replaces
        the sample with it (inpainting by blending, as diffusers' ``callback_on_step_end``); one
        that returns ``None`` changes nothing (solvers with a corrector, ``unipc`` and ``sa_solver``,
        re-derive the sample from their state at the next step, so replace it only with one-step or
        predictor-only solvers). To record a trajectory, append ``info["x"]``.
    brownian:
        Draw a stochastic solver's noise as increments of one Brownian path per
        sample (in the process's noise level ``ode_sigma``), so that runs with
        different step counts follow the same path. Solvers that need it
        (``dpmpp_sde``) always get it.
    noise:
        ``"keyed"`` (the default): a stochastic solver's noise is a function of one key per sample
        drawn from ``generator``, so a sample does not depend on its batch or device.
        ``"diffusers"``: each step's noise is the next ``randn`` of ``generator`` (one per sample for a
        list), as diffusers' schedulers draw it; with a start point drawn by
        :func:`diffusers.utils.torch_utils.randn_tensor` (or :func:`diffsampler.noise.diffusers_randn`)
        from the same generator, a seed then reproduces a diffusers image (DDIM with ``eta``, Euler
        ancestral, DPM-Solver++ SDE). Not for Brownian-path solvers or particle methods.
    progress:
        Show a progress bar.
    grad:
        Record the autograd graph through the run (to differentiate the sample with respect to
        ``x``, the conditioning or the network's parameters). Off by default: a network whose
        parameters require grad would otherwise keep every step's activations alive, so memory
        would grow with the steps, and the sample would carry a graph into the caller's code.
        Guidance transforms that need gradients (classifier guidance) take them locally either way.
    **cond:
        Conditioning keywords passed to the network at every evaluation.

    This is a loop over a :class:`Run`; drive a ``Run`` directly to act between steps.
    """
    if not isinstance(grad, bool):
        raise TypeError(f"sample(): grad must be True or False, got {grad!r}")
    if isinstance(solver, str) and cond:
        _refuse_solver_options(solver, cond)
    with torch.set_grad_enabled(grad):
        return _loop(model, x, grid, solver, generator, callback, progress, brownian, noise, cond)


def _loop(model, x, grid, solver, generator, callback, progress, brownian, noise, cond) -> torch.Tensor:
    run = Run(model, x, grid, solver, generator=generator, brownian=brownian, noise=noise, **cond)
    knots = run.knots
    if callback is not None:
        run.check_every = 1  # with a callback every step is looked at before the callback sees it
        run.watch()
    step = run.step
    with progress_bar(progress, run.solver.name, len(knots)) as advance:
        for i in range(len(knots)):
            x = step()
            if callback is not None:
                pred = run.prediction
                replaced = callback({"i": i, "t": knots.t[i], "t_next": knots.t[i + 1], "x": x,
                                     "denoised": None if pred is None else pred.x0})
                if replaced is not None:
                    run.x = replaced
            advance()
    return run.x


@contextlib.contextmanager
def progress_bar(enabled: bool, name: str, total: int):
    """A transient rich progress bar over ``total`` steps; yields the function that advances it."""
    if not enabled:
        yield _nothing
        return
    from rich.progress import Progress
    bar = Progress(transient=True)
    bar.start()
    task = bar.add_task(name, total=total)
    try:
        yield lambda: bar.advance(task)
    finally:
        bar.stop()


def _nothing() -> None:
    return None


def _refuse_solver_options(name: str, cond: dict) -> None:
    """Keywords of ``sample()`` go to the network; one that is an option of the named solver was meant for
    the solver (``sample(..., "ddim", eta=1.0)``) and would be silently ignored by both."""
    cls = _solvers.REGISTRY.get(name)
    if cls is None:
        return
    clash = sorted(set(cond) & set(cls.options()))
    if clash:
        given = ", ".join(f"{k}={cond[k]!r}" for k in clash)
        raise ValueError(f"sample(): {', '.join(clash)} is an option of solver {name!r}, but keywords of sample() "
                         f"are conditioning passed to the network; set solver options on the solver: "
                         f"sample(model, x, grid, ds.solvers.get({name!r}, {given}), ...)")
