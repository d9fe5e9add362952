"""Every fixed-grid diffsampler solver as a diffusers scheduler, inside unchanged pipelines.

::

    pipe.scheduler = DiffsamplerScheduler.from_config(pipe.scheduler.config, solver="unipc", grid="karras")

A diffusers pipeline owns the loop: it evaluates the network at ``scheduler.timesteps[k]`` on the
sample the scheduler last returned, and hands the output to ``scheduler.step``. A diffsampler
solver owns its step instead and calls the network as often as its method needs (Heun twice,
DPM-Solver-3 three times, PNDM's warm-up four). The adapter turns the step inside out: the solver's
run (one :class:`~diffsampler.Run`, the loop ``sample()`` drives) lives on a worker thread as a
coroutine, and each network evaluation it asks for is handed to the pipeline as the sample to
evaluate next; the pipeline's output resumes it. So ``timesteps`` lists every evaluation, as diffusers'
own Heun and KDPM2 schedulers do, ``order`` is the solver's evaluations per step, and the run is
exactly ``ds.sample(from_diffusers(pipe), latents, scheduler.grid, solver)``: the same kernels on the
same tensors. The evaluation times are known before the first step because a fixed-grid solver's
evaluation times depend only on its grid: a dry run on a one-element batch records them.

A pipeline may change the sample between steps (inpainting blends the known region back in,
``callback_on_step_end`` may replace the latents): at a step's start the sample handed to ``step``
becomes the run's sample, as ``sample()``'s callback replaces it. Inside a multi-evaluation step the
solver needs its answer at the point it asked for; an output the pipeline computed at a changed
point enters through its data estimate (the same ``x0``, re-expressed at the asked point).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import queue
import threading
import warnings
import weakref
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .. import grids as _grids
from .. import solvers as _solvers
from ..denoiser import Denoiser, _coefficients, convert_prediction, prediction_maps
from ..loop import Run
from ..noise import NOISE_KINDS
from ..process import Flow
from .diffusers_models import PREDICTION_TYPES, DiffusersDenoiser, diffusers_denoiser

__all__ = ["DiffsamplerScheduler", "DiffsamplerSchedulerOutput"]

_FLOW_BASES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


@dataclasses.dataclass
class DiffsamplerSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample the pipeline evaluates next (a step's result, or the point inside a
    multi-evaluation step the solver asks about); ``pred_original_sample``: the data estimate of the
    output just given."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class _Cancelled(BaseException):
    """Ends a worker whose run the pipeline abandoned (a new ``set_timesteps``, an interrupted loop)."""


class _Recorder:
    """A stand-in model for the dry run: records each evaluation's time and whether it is the step's start."""

    def __init__(self, process):
        self.process = process
        self._inner = Denoiser(lambda x, time: torch.zeros_like(x), process, "x0", name="dry run")
        self.start: torch.Tensor | None = None
        self.calls: list[tuple[float, bool]] = []

    def __call__(self, x, t, **cond):
        if isinstance(t, torch.Tensor):
            raise ValueError("the diffusers adapter needs one time per evaluation for the whole batch")
        self.calls.append((float(t), x is self.start))
        return self._inner(x, t)


def evaluation_plan(solver, process, grid: torch.Tensor) -> list[list[float]]:
    """The times at which ``solver`` evaluates the network in each step of ``grid``.

    A fixed-grid solver's evaluation times depend on its grid only, so a dry run on a one-element
    batch with a stand-in network finds them. Refused: solvers whose step does not start with an
    evaluation at the step's own sample (the pipeline has evaluated there already).
    """
    recorder = _Recorder(process)
    g = torch.Generator().manual_seed(0)
    run = Run(recorder, process.prior((1, 1), generator=g, dtype=torch.float64), grid, solver, generator=g)
    plan = []
    while not run.done:
        recorder.start, recorder.calls = run.x, []
        run.step()
        if not recorder.calls or not recorder.calls[0][1]:
            raise ValueError(f"DiffsamplerScheduler: solver {solver.name!r} does not begin step {len(plan)} with an "
                             f"evaluation at the step's sample (stochastic churn re-noises first, e.g. s_churn > 0); "
                             f"a pipeline evaluates there, so this configuration cannot run as a diffusers scheduler")
        plan.append([t for t, _ in recorder.calls])
    return plan


class _SolverThread:
    """One sampling run on a worker thread, resumed with one network output per ``scheduler.step`` call.

    Messages to the worker: ``("start", output, sample)`` at a step's start, ``("answer", output,
    sample)`` inside a step, ``("cancel",)``. From it: ``("query", x)`` (evaluate at ``x`` next),
    ``("stepped", x)`` (a step is done), ``("error", exception)``.
    """

    def __init__(self, scheduler: "DiffsamplerScheduler", x: torch.Tensor, grid: torch.Tensor, generator,
                 times: list[float]):
        # A weak reference: a run the pipeline abandoned (an exception, an interrupt, a replaced scheduler)
        # must not keep its scheduler alive; when the scheduler goes, the worker is cancelled.
        self._scheduler, self._times = weakref.proxy(scheduler), times
        self._to_worker: queue.SimpleQueue = queue.SimpleQueue()
        self._to_main: queue.SimpleQueue = queue.SimpleQueue()
        self._supplied: tuple | None = None   # the start's output, answered without a round trip
        self._index = 0                       # evaluations answered so far
        self._thread = threading.Thread(target=self._body, args=(x, grid, generator), daemon=True,
                                        name="diffsampler-scheduler")
        self._thread.start()
        weakref.finalize(scheduler, self.cancel)

    # -- the pipeline's side ---------------------------------------------------------------------
    def start(self, sample: torch.Tensor, output: torch.Tensor):
        self._to_worker.put(("start", output, sample))
        return self._reply()

    def answer(self, output: torch.Tensor, sample: torch.Tensor):
        self._to_worker.put(("answer", output, sample))
        return self._reply()

    def cancel(self) -> None:
        if self._thread.is_alive():
            self._to_worker.put(("cancel",))
            self._thread.join(timeout=10)

    def _reply(self):
        message = self._to_main.get()
        if message[0] == "error":
            raise message[1]
        return message

    # -- the worker's side -----------------------------------------------------------------------
    def _receive(self):
        message = self._to_worker.get()
        if message[0] == "cancel":
            raise _Cancelled
        return message

    def _network(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        supplied, self._supplied = self._supplied, None
        t = self._times[self._index]
        self._index += 1
        if supplied is not None and supplied[0] is x:
            return supplied[1]
        self._to_main.put(("query", x))
        kind, output, sample = self._receive()
        if kind != "answer":
            raise RuntimeError(f"DiffsamplerScheduler: the pipeline started a new step while the solver waited "
                               f"for an evaluation inside step at t = {t:.6g}")
        if sample is not x and not torch.equal(sample, x):
            output = self._scheduler._reexpress(output, sample, x, t)
        return output

    def _body(self, x, grid, generator) -> None:
        try:
            with torch.no_grad():
                sched = self._scheduler
                model = diffusers_denoiser(self._network, sched.base_scheduler_config(), name="diffusers pipeline",
                                           corrections=sched._reading.corrections)
                run = Run(model, x, grid, sched.solver, generator=generator, noise=sched.config.noise)
                while not run.done:
                    kind, output, sample = self._receive()
                    if kind != "start":
                        raise RuntimeError("DiffsamplerScheduler: the pipeline answered inside a step the solver "
                                           "has not begun")
                    if sample is not run.x:
                        run.x = sample
                    self._supplied = (sample, output)
                    run.step()
                    self._to_main.put(("stepped", run.x))
        except _Cancelled:
            return
        except BaseException as error:  # handed to the pipeline's thread, raised there from step()
            self._to_main.put(("error", error))


# Where several diffusers classes take the same arguments, the one a config most likely came from
# (their grids agree: KDPM2's step knots are LMS's sigmas, the Parallel variants are their originals).
_PREFERRED = ("DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
              "LCMScheduler", "CogVideoXDDIMScheduler")


def _infer_class(config: dict) -> str:
    """The diffusers scheduler class a config without ``_class_name`` came from.

    A scheduler built in code (``PNDMScheduler(...)``, or ``from_config`` of a dict without a class name)
    registers every argument of its ``__init__`` and no class name, and ``from_config`` adds the keys it
    did not take: the class is one whose arguments are all among the config's keys, and which has every
    argument the config lists as defaulted (``_use_default_values``); of those, the one with the most.
    """
    import diffusers
    keys = {k for k in config if not k.startswith("_")}
    defaulted = set(config.get("_use_default_values") or ())
    matches, size = [], 0
    for name in dir(diffusers):
        cls = getattr(diffusers, name, None)
        if isinstance(cls, type) and issubclass(cls, SchedulerMixin) and cls is not SchedulerMixin:
            try:
                params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
            except (TypeError, ValueError):
                continue
            if params <= keys and defaulted <= params and len(params) >= size:
                matches, size = ([] if len(params) > size else matches) + [name], len(params)
    if not matches:
        raise ValueError("DiffsamplerScheduler.from_config: the config names no scheduler class (_class_name) and "
                         "matches none by its keys; pass base_scheduler='<diffusers scheduler class name>'")
    preferred = [name for name in _PREFERRED if name in matches]
    return preferred[0] if preferred else sorted(matches)[0]


def _base_class(name: str):
    import diffusers
    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, SchedulerMixin):
        raise ValueError(f"DiffsamplerScheduler: base_scheduler {name!r} is not a diffusers scheduler class")
    return cls


class DiffsamplerScheduler(SchedulerMixin, ConfigMixin):
    """A diffsampler solver as a diffusers scheduler: set it as ``pipe.scheduler``.

    Build it from the pipeline's own scheduler config, which keeps the model's process (betas,
    ``prediction_type``, flow ``shift`` and dynamic shifting) and, by default, the grid that
    scheduler would step through::

        pipe.scheduler = DiffsamplerScheduler.from_config(pipe.scheduler.config, solver="unipc",
                                                          grid="karras", order=3)

    Parameters (besides the model's scheduler config)
    ----------
    solver:
        A registered solver name (``ds.solvers.names()``, aliases too) or a solver object; every solver
        with a fixed grid works, stochastic ones too. Adaptive solvers pick their steps while they run,
        which a pipeline's precomputed ``timesteps`` cannot follow: refused.
    solver_options:
        The solver's options (also accepted as keywords of ``from_config``: ``eta=``, ``order=``...).
    grid:
        ``None`` (the default): the grid of the scheduler the config came from
        (:func:`~diffsampler.integrations.grid_from_scheduler`, every spacing and sigma option, and the
        ``sigmas`` / ``mu`` a Flux or SD3 pipeline passes); a grid name (``ds.grids.names()``), shifted
        by the config's flow shift (or ``exp(mu)`` with dynamic shifting) for flow models; or a list
        of process times (then ``num_inference_steps`` must be its number of steps).
    grid_options:
        Options of a named grid (``{"rho": 7}``).
    noise:
        ``"keyed"``: a stochastic solver's noise keyed per sample from the pipeline's generator (as
        ``ds.sample(..., generator=g)``); ``"diffusers"``: each step's noise is the next ``randn`` of the
        pipeline's generator, so with DDIM (``eta``), Euler ancestral or DPM-Solver++ SDE a seed gives the
        image diffusers' own scheduler gives.

    After ``set_timesteps``: ``grid`` (the process times, float64), ``timesteps`` (the network's
    timestep at every evaluation), ``order`` (evaluations per step), ``sigmas``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + list(_FLOW_BASES)
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str | None = None,
                 rescale_betas_zero_snr: bool = False, solver: str = "dpmpp_2m", solver_options: dict | None = None,
                 grid=None, grid_options: dict | None = None, noise: str = "keyed",
                 base_scheduler: str = "DDIMScheduler"):
        base = _base_class(base_scheduler)
        if isinstance(solver, _solvers.Solver):
            # the config is saved as JSON: keep the object's name and options there
            solver_options = {**_options_of(solver), **(solver_options or {})}
            solver = solver.name
            self.register_to_config(solver=solver, solver_options=solver_options)
        self.solver = _solvers.get(solver, **(solver_options or {}))
        if self.solver.adaptive:
            raise ValueError(f"DiffsamplerScheduler: solver {solver!r} is adaptive (it picks its own steps while it "
                             f"runs), and a pipeline steps through timesteps fixed in advance; allowed: a fixed-grid "
                             f"solver, e.g. 'dpmpp_2m', 'unipc', 'heun', 'euler_ancestral'")
        if noise not in NOISE_KINDS:
            raise ValueError(f"DiffsamplerScheduler: noise must be one of {NOISE_KINDS}, got {noise!r}")
        if grid is not None and not isinstance(grid, (str, list, tuple)):
            raise TypeError(f"DiffsamplerScheduler: grid must be None, a grid name or a list of times, got "
                            f"{type(grid).__name__}")
        if isinstance(grid, str) and grid not in _grids.names():
            raise ValueError(f"DiffsamplerScheduler: unknown grid {grid!r}; valid grids: {', '.join(_grids.names())}")
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"DiffsamplerScheduler: prediction_type {prediction_type!r} is not one of "
                             f"{sorted(PREDICTION_TYPES)}")
        self._base = base
        self._reading_cache: DiffusersDenoiser | None = None
        self.init_noise_sigma = 1.0
        self.grid: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._times: list[float] = []
        self._starts: dict[int, int] = {}   # evaluation index -> the step it starts
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._run: _SolverThread | None = None

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """From a scheduler's config, with ``solver=``, ``grid=``, ``noise=`` and the solver's options.

        Keywords that are neither ours nor the solver's options nor keys of the source scheduler's
        config are refused (diffusers would drop them silently); keys of the source scheduler's config
        (``timestep_spacing="trailing"``) override the config.
        """
        if isinstance(config, str) or config is None:
            return super().from_config(config, return_unused_kwargs, **kwargs)
        if isinstance(config, SchedulerMixin):  # the scheduler itself: its class is known
            config = {**config.config, "_class_name": type(config).__name__}
        config = dict(config)
        source = config.get("_class_name") or (cls.__name__ if "base_scheduler" in config else _infer_class(config))
        if source != cls.__name__:
            kwargs.setdefault("base_scheduler", source)
            _base_class(source)
        solver = kwargs.get("solver", config.get("solver", "dpmpp_2m"))
        # a config's own solver options go with its own solver only: a new solver starts from its defaults
        inherited = config.get("solver_options") if "solver" not in kwargs else None
        options = dict(kwargs.pop("solver_options", None) or inherited or {})
        if isinstance(solver, _solvers.Solver):
            options = {**options, **_options_of(solver)}  # the object's options win
            kwargs["solver"] = solver = solver.name
        own = set(inspect.signature(cls.__init__).parameters) - {"self"}
        base_keys = set(inspect.signature(_base_class(kwargs.get("base_scheduler", config.get(
            "base_scheduler", "DDIMScheduler"))).__init__).parameters)
        solver_cls = _solvers.REGISTRY.get(_solvers.canonical(solver)[0]) if isinstance(solver, str) else None
        solver_keys = set(solver_cls.options()) if solver_cls is not None else set()
        for key in list(kwargs):
            if key in own:
                continue
            if key in solver_keys:
                options[key] = kwargs.pop(key)
            elif key in base_keys or key in config:
                config[key] = kwargs.pop(key)
            else:
                raise ValueError(f"DiffsamplerScheduler.from_config: unknown keyword {key!r}; allowed: our options "
                                 f"{sorted(own - {'num_train_timesteps'})}, the options of solver {solver!r} "
                                 f"({', '.join(sorted(solver_keys)) or 'none'}), or keys of the scheduler config")
        kwargs["solver_options"] = options or None
        out = super().from_config(config, return_unused_kwargs, **kwargs)
        (out[0] if return_unused_kwargs else out)._reading  # read the model now, with every key of the config
        return out

    @property
    def _reading(self) -> DiffusersDenoiser:
        """The model's reading of the source scheduler: process, prediction type, time input and its
        data-estimate corrections (clip_sample, thresholding, ...), as from_diffusers reads them. Read on
        first use: from_config registers the source's other keys after __init__."""
        if self._reading_cache is None:
            self._reading_cache = diffusers_denoiser(_pipeline_network, self.base_scheduler_config(),
                                                     name="diffusers pipeline")
            # resolved in the config too, so that from_diffusers(unet, this config) reads the same model
            self.register_to_config(prediction_type={v: k for k, v in PREDICTION_TYPES.items()}[
                self._reading_cache.prediction])
        return self._reading_cache

    @property
    def process(self):
        return self._reading.process

    @property
    def prediction(self) -> str:
        return self._reading.prediction

    @property
    def time_input(self):
        return self._reading.time_input

    def base_scheduler_config(self) -> dict:
        """The config of the scheduler this one was built from (its class as ``_class_name``): what
        ``from_diffusers`` and ``grid_from_scheduler`` read when handed this scheduler."""
        own = set(inspect.signature(type(self).__init__).parameters) - set(
            inspect.signature(self._base.__init__).parameters)
        config = {k: v for k, v in self.config.items() if k not in own and not k.startswith("_")}
        if config.get("prediction_type") is None:
            config.pop("prediction_type", None)
        return {**config, "_class_name": self._base.__name__}

    def _base_scheduler(self):
        return self._base.from_config(self.base_scheduler_config())

    # -- the grid and its evaluations --------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas=None, timesteps=None, mu: float | None = None) -> None:
        """Choose the grid and list every evaluation of the solver on it (``timesteps``)."""
        self.cancel()
        grid = self._make_grid(num_inference_steps, sigmas, timesteps, mu)
        plan = evaluation_plan(self.solver, self.process, grid)
        self.grid = grid
        self._times = [t for step in plan for t in step]
        self._starts, k = {}, 0
        for i, step in enumerate(plan):
            self._starts[k] = i
            k += len(step)
        self.num_inference_steps = len(plan)
        self.order = self.solver.nfe_per_step
        self.init_noise_sigma = self._start_scale(num_inference_steps, sigmas, timesteps, mu)
        times = torch.tensor(self._times, dtype=torch.float64)
        self.timesteps = torch.as_tensor(self.time_input(times), dtype=torch.float32).to(device)
        self.sigmas = torch.cat([self.process.ode_sigma(times), self.process.ode_sigma(grid[-1:])]).to(
            device=device, dtype=torch.float32)
        self._step_index = self._begin_index = None

    def _start_scale(self, steps, sigmas, timesteps, mu) -> float:
        """The standard deviation of the start latent the pipeline draws (``randn * init_noise_sigma``).

        1 in the model's coordinates, the prior's. With ``noise="diffusers"`` the source scheduler's own
        start instead, seen in the model's coordinates (its ``init_noise_sigma`` times the factor its
        ``scale_model_input`` applies, the EDM scale's ``1 / sqrt(sigma^2 + 1)``), so that a seed draws
        diffusers' start, quirks included: its Euler family with "linspace" or "trailing" spacing starts
        at ``sigma_max`` instead of ``sqrt(sigma_max^2 + 1)``, 0.2% small on SD's schedule.
        """
        if self.config.noise != "diffusers":
            return 1.0
        base = self._base_scheduler()
        accepted = inspect.signature(base.set_timesteps).parameters
        options = {k: v for k, v in (("sigmas", sigmas), ("timesteps", timesteps), ("mu", mu))
                   if v is not None and k in accepted}
        base.set_timesteps(steps, **options) if steps is not None or not options else base.set_timesteps(**options)
        first = base.timesteps[0]
        factor = float(base.scale_model_input(torch.ones(1), first)) if hasattr(base, "scale_model_input") else 1.0
        return float(base.init_noise_sigma) * factor

    def _make_grid(self, steps, sigmas, timesteps, mu) -> torch.Tensor:
        grid = self.config.grid
        if grid is None:
            from .diffusers_grids import grid_from_scheduler
            return grid_from_scheduler(self._base_scheduler(), steps, sigmas=sigmas, timesteps=timesteps, mu=mu,
                                       process=self.process)
        if timesteps is not None:
            raise ValueError(f"DiffsamplerScheduler: custom timesteps were passed, but grid={grid!r} was chosen; "
                             f"build it with grid=None to step through the pipeline's timesteps")
        if steps is None:
            steps = len(sigmas) if sigmas is not None else None
        if isinstance(grid, str):
            if steps is None:
                raise ValueError("DiffsamplerScheduler.set_timesteps: num_inference_steps is required")
            out = _grids.get(grid, self.process, steps, **(self.config.grid_options or {}))
        else:
            out = _grids.validate(self.process, torch.tensor(grid, dtype=torch.float64))
            if steps is not None and steps != len(out) - 1:
                raise ValueError(f"DiffsamplerScheduler: the explicit grid has {len(out) - 1} steps, but the pipeline "
                                 f"asked for num_inference_steps={steps}")
        if sigmas is not None and not _is_flux_default(sigmas):
            warnings.warn(f"DiffsamplerScheduler: the sigmas the pipeline passed are ignored: grid={grid!r} was "
                          f"chosen (build the scheduler with grid=None to step through them)", UserWarning,
                          stacklevel=3)
        if isinstance(self.process, Flow):
            factor = self._flow_shift(mu)
            if factor != 1.0:
                out = _grids.shift(self.process, out, factor)
        return out

    def _flow_shift(self, mu) -> float:
        """The time shift a flow scheduler's config applies: ``shift``, or ``exp(mu)`` with dynamic shifting."""
        if self.config.get("use_dynamic_shifting"):
            if mu is None:
                raise ValueError("DiffsamplerScheduler: the config has use_dynamic_shifting, so set_timesteps needs mu "
                                 "(the pipeline passes it)")
            if self.config.get("time_shift_type", "exponential") != "exponential":
                raise ValueError(f"DiffsamplerScheduler: time_shift_type {self.config.time_shift_type!r} with a named "
                                 f"grid is not supported; allowed: 'exponential', or grid=None")
            return math.exp(mu)
        return float(self.config.get("shift", 1.0))

    # -- the pipeline's calls ----------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        """The index in ``timesteps`` of the next evaluation's output ``step`` expects."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where in ``timesteps`` the pipeline starts (image-to-image with ``strength`` < 1)."""
        self._begin_index = int(begin_index)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network's input is the sample itself: the adapter works in the model's own coordinates."""
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """Hand the network's output at ``sample`` to the solver; return the sample to evaluate next.

        ``generator`` (passed by pipelines) seeds a stochastic solver's noise when the run starts.
        """
        if self.timesteps is None:
            raise RuntimeError("DiffsamplerScheduler.step: call set_timesteps first")
        if self._step_index is None:
            self._step_index = self._first_index(timestep)
        k = self._step_index
        if k >= len(self._times):
            raise RuntimeError(f"DiffsamplerScheduler.step: all {len(self._times)} evaluations of the run are done; "
                               f"call set_timesteps to start another")
        expected = float(self.timesteps[k])
        given = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if not math.isclose(given, expected, rel_tol=1e-5, abs_tol=1e-4):
            raise ValueError(f"DiffsamplerScheduler.step: expected the output at timestep {expected:.6g} (evaluation "
                             f"{k} of {len(self._times)}), got timestep {given:.6g}")
        if model_output.ndim > 1 and sample.ndim > 1 and model_output.shape[1] == 2 * sample.shape[1]:
            # a learned variance (variance_type="learned*"): the prediction, then the variance channels
            model_output = model_output[:, : sample.shape[1]]
        if k not in self._starts and self._run is None:
            raise RuntimeError(f"DiffsamplerScheduler.step: evaluation {k} lies inside a step; a run must begin "
                               f"at a step's first evaluation")
        try:
            if k in self._starts:
                if self._run is None:
                    self._start_run(sample, k, generator)
                kind, x = self._run.start(sample, model_output)
            else:
                kind, x = self._run.answer(model_output, sample)
        except BaseException:
            self.cancel()  # the worker has ended (or is abandoned): the next run starts afresh
            raise
        self._step_index = k + 1
        if k + 1 == len(self._times):
            self._run = None  # finished: its thread has ended
        elif kind == "query" and (k + 1) in self._starts or kind == "stepped" and (k + 1) not in self._starts:
            raise RuntimeError("DiffsamplerScheduler: the solver's evaluations differ from its dry run "
                               f"at evaluation {k + 1}")
        denoised = self._denoised(model_output, sample, self._times[k])
        if not return_dict:
            return (x, denoised)
        return DiffsamplerSchedulerOutput(prev_sample=x, pred_original_sample=denoised)

    def _first_index(self, timestep) -> int:
        if self._begin_index is not None:
            return self._begin_index
        given = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        for k in sorted(self._starts):
            if math.isclose(float(self.timesteps[k]), given, rel_tol=1e-5, abs_tol=1e-4):
                return k
        raise ValueError(f"DiffsamplerScheduler.step: timestep {given:.6g} is not the start of any step of the grid "
                         f"(steps start at {[round(float(self.timesteps[k]), 4) for k in sorted(self._starts)]})")

    def _start_run(self, sample: torch.Tensor, k: int, generator) -> None:
        first = self._starts[k]
        grid = self.grid[first:]
        if first > 0:  # image-to-image: the run starts mid-grid, as ds.sample(model, x, grid[first:], solver)
            plan = evaluation_plan(self.solver, self.process, grid)
            mid = [t for step in plan for t in step]
            if len(mid) != len(self._times) - k or any(not math.isclose(a, b, rel_tol=1e-12)
                                                       for a, b in zip(mid, self._times[k:])):
                raise ValueError(f"DiffsamplerScheduler: solver {self.solver.name!r} evaluates differently when it "
                                 f"starts at step {first} (its warm-up), so it cannot start mid-grid as "
                                 f"image-to-image asks; use a solver without warm-up evaluations")
        self._run = _SolverThread(self, sample, grid, generator, self._times[k:])

    def _denoised(self, output: torch.Tensor, sample: torch.Tensor, t: float) -> torch.Tensor:
        """The data estimate of the network's ``output`` at ``sample``, corrected as the run corrects it."""
        pred = convert_prediction(output.to(sample.dtype), sample, self.prediction, self.process, t)
        for correct in self._reading.corrections:
            pred = correct(pred, sample, t)
        return pred.x0

    def _reexpress(self, output: torch.Tensor, seen: torch.Tensor, asked: torch.Tensor, t: float) -> torch.Tensor:
        """The output at ``seen`` re-expressed at ``asked`` with the same data estimate.

        ``x0 = p x + q out`` (the prediction's map at ``t``), so ``out' = out + (p / q) (seen - asked)``.
        """
        (p, q), _ = prediction_maps(self.prediction, *(None if c is None else float(c)
                                                      for c in _coefficients(self.process, t, self.prediction)))
        return output + (p / q) * (seen.to(output.dtype) - asked.to(output.dtype))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``alpha(t) x0 + sigma(t) noise`` at the process time of each timestep (image-to-image's start)."""
        t = self._times_of(timesteps, original_samples)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = self.process.alpha(t).reshape(shape).to(original_samples.dtype)
        sigma = self.process.sigma(t).reshape(shape).to(original_samples.dtype)
        return alpha * original_samples + sigma * noise.to(original_samples.device, original_samples.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow pipelines' name for :meth:`add_noise` (``(1 - t) x0 + t noise``)."""
        if noise is None:
            raise ValueError("DiffsamplerScheduler.scale_noise: noise is required")
        return self.add_noise(sample, noise, timestep)

    def _times_of(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        if self.timesteps is None:
            raise RuntimeError("DiffsamplerScheduler: call set_timesteps first")
        values = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
        if values.numel() == 1:
            values = values.expand(like.shape[0])
        known = self.timesteps.double().cpu()
        out = []
        for v in values.tolist():
            hits = torch.nonzero(torch.isclose(known, torch.tensor(v, dtype=torch.float64), rtol=1e-6, atol=1e-4))
            if len(hits) == 0:
                raise ValueError(f"DiffsamplerScheduler.add_noise: timestep {v:.6g} is not one of the grid's "
                                 f"evaluations ({[round(float(s), 4) for s in self.timesteps[:8]]}...)")
            out.append(self._times[int(hits[0])])
        return torch.tensor(out, dtype=torch.float64, device=like.device)

    def cancel(self) -> None:
        """End a run the pipeline left unfinished (its worker thread and the tensors it holds)."""
        if self._run is not None:
            self._run.cancel()
            self._run = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _is_flux_default(sigmas) -> bool:
    """Whether ``sigmas`` is the ``linspace(1, 1/n, n)`` Flux's pipeline passes when the user gave none."""
    values = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    n = len(values)
    return n > 0 and torch.allclose(values, torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64), atol=1e-6)


def _options_of(solver) -> dict:
    """A solver object's options, to rebuild it with ``ds.solvers.get(solver.name, **options)``."""
    return {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)}


def _pipeline_network(x, timestep, **cond):
    raise RuntimeError("the scheduler's reading of the model is not called: a run's network is the pipeline")
