"""Command line: ``diffsampler solvers|sample|bench|train|models|demo|steer|posterior|edit|generate|evaluate``
(thin over the Python API)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from . import grids as _grids
from .calibrate import cli as _calibrate_cli
from . import solvers as _solvers
from . import testbeds as _testbeds
from .loop import sample as _sample
from .process import EDM, VP, Flow

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Training-free samplers for diffusion and flow models.")
console = Console()

PROCESSES = {
    "vp": VP.scaled_linear,
    "vp-linear": VP.linear,
    "vp-cosine": VP.cosine,
    "edm": EDM,
    "flow": Flow,
}


def _choice(kind: str, value: str, valid) -> None:
    if value not in valid:
        raise typer.BadParameter(f"unknown {kind} {value!r}; valid: {', '.join(sorted(valid))}")


@app.command()
def solvers() -> None:
    """List every registered solver with its order, NFE per step and paper, then the aliases."""
    table = Table(title="diffsampler solvers")
    # the name is what users type: never cut, whatever the terminal's width (the other columns wrap)
    table.add_column("name", no_wrap=True, min_width=max(map(len, _solvers.names())))
    for col in ("order", "NFE/step", "stochastic", "options", "paper"):
        table.add_column(col)
    for name in _solvers.names():
        cells = solver_cells(name)
        table.add_row(name, cells["order"], cells["nfe"], cells["stochastic"],
                      ", ".join(_solvers.REGISTRY[name].options()) or "-", _solvers.REGISTRY[name].paper)
    console.print(table)
    aliases = Table(title="aliases (ComfyUI's and k-diffusion's names)")
    aliases.add_column("name", no_wrap=True, min_width=max(map(len, _solvers.ALIASES)))
    aliases.add_column("is")
    for name, text in alias_cells().items():
        aliases.add_row(name, text)
    console.print(aliases)


def solver_cells(name: str) -> dict:
    """The ``order``, ``nfe`` and ``stochastic`` cells of ``diffsampler solvers`` (and of the README's table)."""
    cls = _solvers.REGISTRY[name]
    s = cls()
    order = "-" if not s.order else f"{s.order}" + (f" (global {s.global_order})" if s.global_order != s.order else "")
    if s.stochastic and "eta" in cls.options():
        calm = cls(eta=0.0)
        if calm.order != s.order:
            order += f" ({calm.order} with `eta = 0`)"
    nfe = str(cls.nfe_per_step) + (f" (+{cls.extra_nfe} once)" if cls.extra_nfe else "") + \
        (" per attempt (adaptive)" if cls.adaptive else "")
    if s.stochastic:
        stochastic = "yes"
    else:
        knobs = [o for o in ("eta", "s_churn") if o in cls.options() and cls(**{o: 1.0}).stochastic]
        stochastic = " or ".join(f"with `{o} > 0`" for o in knobs) or "no"
    return {"order": order, "nfe": nfe, "stochastic": stochastic}


def alias_cells() -> dict:
    """For each alias, what it is: the registered solver, its options and (for ``dpm_fast``) its grid."""
    out = {}
    for name, (target, options) in sorted(_solvers.ALIASES.items()):
        text = target + (f"({', '.join(f'{k}={v!r}' for k, v in options.items())})" if options else "")
        if name in _solvers.ALIAS_GRIDS:
            text += f" on grids.{_solvers.ALIAS_GRIDS[name]}"
        out[name] = text
    return out


@app.command()
def sample(
    testbed: str = typer.Option("ring8", help="Exact testbed: " + ", ".join(sorted(_testbeds.TESTBEDS))),
    process: str = typer.Option("vp", help="Noise process: " + ", ".join(PROCESSES)),
    solver: str = typer.Option("dpmpp_2m", help="Solver name (see `diffsampler solvers`)."),
    steps: int = typer.Option(10, min=1, help="Number of steps."),
    grid: str = typer.Option("karras", help="Time grid: " + ", ".join(_grids.names())),
    n: int = typer.Option(2000, min=1, help="Number of samples."),
    seed: int = typer.Option(0, help="Seed of the generator for the prior and the solver's noise."),
    out: Path = typer.Option(Path("out"), help="Directory for the picture."),
    option: list[str] = typer.Option(None, "--option", help="A solver option NAME=VALUE, repeatable "
                                                           "(e.g. --option eta=1 --option solver_type=heun)."),
) -> None:
    """Sample a testbed with a solver, write a scatter over the exact density, report the error."""
    _choice("testbed", testbed, _testbeds.TESTBEDS)
    _choice("process", process, PROCESSES)
    _choice("solver", solver, {**_solvers.REGISTRY, **_solvers.ALIASES})
    _choice("grid", grid, _grids.GRIDS)
    gmm = _testbeds.get(testbed)
    proc = PROCESSES[process]()
    model = gmm.denoiser(proc, "velocity" if isinstance(proc, Flow) else "eps")
    try:
        solver_obj = _solvers.get(solver, **parse_options(option))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    g = torch.Generator().manual_seed(seed)
    t_grid = _grids.get(grid, proc, steps)
    x_T = proc.prior((n, gmm.dim), generator=g, dtype=torch.float64)

    start = time.perf_counter()
    x = _sample(model, x_T, t_grid, solver_obj, generator=g, progress=True)
    elapsed = time.perf_counter() - start
    nfe = model.nfe

    ref = gmm.ode_reference(proc, x_T, t_grid[0], t_grid[-1])
    rmse = (x - ref).pow(2).mean().sqrt().item()
    nll = -gmm.log_prob(x).mean().item()
    exact, _ = gmm.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    nll_exact = -gmm.log_prob(exact).mean().item()

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{testbed}_{process}_{solver}_{grid}{steps}.png"
    if gmm.dim == 2:
        _scatter(gmm, x, path, f"{solver} on {testbed} ({process}, {grid} grid, {steps} steps, NFE {nfe})")
    console.print(f"[bold]{solver}[/] on {testbed} / {proc!r} / {grid} grid, {steps} steps")
    label = "endpoint RMSE vs exact ODE" if not solver_obj.stochastic else "RMSE vs exact ODE (stochastic)"
    rows = [("NFE", f"{nfe}"), ("time", f"{elapsed * 1e3:.1f} ms"), (label, f"{rmse:.3e}"),
            ("mean NLL", f"{nll:.4f} (exact samples: {nll_exact:.4f})")]
    if gmm.dim == 2:
        rows.append(("picture", str(path)))
    for name, value in rows:
        console.print(f"  {name:<31} {value}")


def parse_options(items) -> dict:
    """``["eta=1", "solver_type=heun"]`` -> ``{"eta": 1, "solver_type": "heun"}``: values are Python literals
    (numbers, booleans, tuples) where they parse as one, else strings."""
    import ast
    options = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise typer.BadParameter(f"--option expects NAME=VALUE (e.g. eta=1), got {item!r}")
        try:
            options[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[name.strip()] = value.strip()
    return options


def _scatter(gmm, x: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = x.detach().to(torch.float64).cpu()
    lim = float(pts.abs().max().clamp(max=10.0)) * 1.1 + 0.5
    axis = torch.linspace(-lim, lim, 300, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    dens = gmm.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().reshape(gx.shape)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    ax.contourf(gx.numpy(), gy.numpy(), dens.numpy(), levels=30, cmap="Blues")
    ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=3, c="crimson", alpha=0.6, label="samples")
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="A reduced run (under 2 minutes)."),
    out: Path = typer.Option(None, help="Where BENCHMARKS.md and benchmarks/ are written (default: the current "
                                        "directory; a new scratch folder with --quick)."),
    rewrite: bool = typer.Option(False, "--rewrite", help="Only regenerate the report from benchmarks/results.json."),
    section: list[str] = typer.Option(None, "--section", help="Re-run only these sections (accuracy, adaptive, "
                                      "distribution, overhead, models, steering, inversion, posterior, generate, "
                                      "calibration); the others are read from benchmarks/results.json."),
) -> None:
    """Accuracy per NFE and overhead per step against diffusers and k-diffusion; writes BENCHMARKS.md."""
    from . import bench as _bench
    for name in section or ():
        _choice("section", name, _bench.SECTIONS)
    if out is None:
        if quick and not rewrite:
            import tempfile
            out = Path(tempfile.mkdtemp(prefix="diffsampler-bench-quick-"))
            console.print(f"bench --quick: writing into the scratch folder {out}")
        else:
            out = Path(".")
    report = out / "BENCHMARKS.md"
    if quick and not rewrite and report.exists() and "--quick" not in report.read_text().split("\n## ")[0]:
        raise typer.BadParameter(f"{report} is a full benchmark report; --quick does not overwrite it (omit "
                                 f"--out for a scratch folder, or pass another directory)")
    if rewrite:
        _bench.rewrite(out, log=console.print)
    else:
        _bench.run(quick=quick, root=out, log=console.print, sections=tuple(section or _bench.SECTIONS))


@app.command()
def demo(
    model: str = typer.Option("digits", help="A shipped class-conditional digits model: digits, digits-flow."),
    solver: str = typer.Option("dpmpp_2m", help="Solver name (see `diffsampler solvers`)."),
    steps: int = typer.Option(15, min=1, help="Number of steps."),
    grid: str = typer.Option(None, help="Time grid: " + ", ".join(_grids.names()) + " (default: logsnr for VP "
                                         "models, uniform for flows)."),
    scale: float = typer.Option(2.0, help="Classifier-free guidance weight (1: the conditional model)."),
    per_class: int = typer.Option(10, min=1, help="Samples of every digit."),
    seed: int = typer.Option(0, help="Seed of the generator for the prior and the solver's noise."),
    out: Path = typer.Option(Path("out"), help="Directory for the picture."),
) -> None:
    """Sample every digit class with classifier-free guidance; write a labelled grid and judge it."""
    from . import models as _models
    from .models.quality import default_grid, digits_figures, digits_samples
    _choice("model", model, ("digits", "digits-flow", "digits-weak"))
    _choice("solver", solver, _solvers.REGISTRY)
    denoiser = _models.load(model)
    grid = grid or default_grid(denoiser.process)
    _choice("grid", grid, _grids.GRIDS)
    start = time.perf_counter()
    images, labels = digits_samples(denoiser, per_class=per_class, solver=solver, steps=steps, grid=grid,
                                    scale=scale, seed=seed)
    elapsed = time.perf_counter() - start
    figures = digits_figures(images, labels, _models.load("digits-evaluator"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{model}_{solver}_{grid}{steps}_cfg{scale:g}.png"
    _digit_grid(images, per_class, path, f"{model}: {solver}, {grid} grid, {steps} steps, CFG {scale:g}, "
                                         f"NFE {denoiser.nfe}")
    console.print(f"[bold]{model}[/]: {solver} on the {grid} grid, {steps} steps, classifier-free guidance {scale:g}")
    rows = [("NFE (network calls)", f"{denoiser.nfe}"), ("time", f"{elapsed:.2f} s for {len(labels)} digits"),
            ("class accuracy (evaluator)", f"{figures['accuracy']:.1%}"),
            ("Frechet distance to real", f"{figures['frechet_distance']:.2f}"), ("picture", str(path))]
    for name, value in rows:
        console.print(f"  {name:<31} {value}")


def _digit_grid(images: torch.Tensor, per_class: int, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pics = images.detach().float().clamp(-1, 1).reshape(10, per_class, 8, 8)
    fig, axes = plt.subplots(10, per_class, figsize=(per_class * 0.6 + 0.6, 6.6), dpi=100, squeeze=False)
    for row in range(10):
        for col in range(per_class):
            ax = axes[row][col]
            ax.imshow(pics[row, col].numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(str(row), rotation=0, labelpad=10, fontsize=11)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


STEER_METHODS = ("best_of_n", "fk", "svdd", "dts", "dts*")


@app.command()
def steer(
    model: str = typer.Option("digits", help="A shipped digits model, sampled without a label: digits, "
                                             "digits-flow, digits-weak."),
    method: str = typer.Option("fk", help="Steering method: " + ", ".join(STEER_METHODS) + " (dts, dts*: "
                                          "when ds.steering.tree_search is available)."),
    target: int = typer.Option(3, min=0, max=9, help="The digit to steer toward."),
    particles: int = typer.Option(4, min=1, help="Particles per population (best_of_n: N; svdd: particles "
                                                 "steered side by side; dts: the root's children)."),
    groups: int = typer.Option(2, min=1, help="Number of populations (each returns its best particle)."),
    steps: int = typer.Option(20, min=1, help="Number of steps."),
    solver: str = typer.Option("ddpm", help="A stochastic solver (its kernel moves the particles)."),
    grid: str = typer.Option(None, help="Time grid: " + ", ".join(_grids.names()) + " (default: logsnr for VP "
                                         "models, uniform for flows)."),
    lam: float = typer.Option(10.0, help="Inverse temperature of the target p(x) exp(lam r(x)) (fk, dts)."),
    potential: str = typer.Option("diff", help="FK potential: diff, max, add, immediate."),
    candidates: int = typer.Option(4, min=1, help="SVDD: candidates drawn per particle and step."),
    budget: int = typer.Option(None, min=1, help="DTS: nodes per tree (default: the method's own)."),
    seed: int = typer.Option(0, help="Seed of the generator for the prior, the noise and the resampling."),
    out: Path = typer.Option(Path("out"), help="Directory for the picture."),
) -> None:
    """Steer a digits model toward a class; judge each population's best with an independent classifier."""
    from . import models as _models
    from . import steering as _steering
    from .bench.steering import nfe_per_group, steer as _steer, tree_search_or_none
    from .models.quality import default_grid
    _choice("model", model, ("digits", "digits-flow", "digits-weak"))
    _choice("method", method, STEER_METHODS)
    _choice("solver", solver, _solvers.REGISTRY)
    _choice("potential", potential, _steering.POTENTIALS)
    if method in ("dts", "dts*") and tree_search_or_none() is None:
        raise typer.BadParameter(f"method {method!r} needs ds.steering.tree_search, which this version does not "
                                 f"have; use best_of_n, fk or svdd")
    if method != "best_of_n" and not _solvers.get(solver).stochastic:
        raise typer.BadParameter(f"solver {solver!r} draws no noise and {method} needs a stochastic one: "
                                 f"{', '.join(_steering.stochastic_solvers())}")
    denoiser = _models.load(model)
    process = denoiser.process
    grid = grid or default_grid(process)
    _choice("grid", grid, _grids.GRIDS)
    reward = _steering.digits_reward(target)
    g = torch.Generator().manual_seed(seed)
    x = process.prior((groups * particles, 1, 8, 8), generator=g)
    start = time.perf_counter()
    with torch.no_grad():
        result = _steer(method, denoiser, x, _grids.get(grid, process, steps), solver, reward, particles=particles,
                        generator=g, lam=lam, potential=potential, candidates=candidates, budget=budget)
    elapsed = time.perf_counter() - start
    evaluator = _models.load("digits-evaluator")
    best_acc = _steering.digits_accuracy(result.best, target, evaluator)
    all_acc = _steering.digits_accuracy(result.x, target, evaluator)
    nfe = nfe_per_group(result, groups)
    best_rewards = result.rewards.reshape(groups, -1).max(1).values
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"steer_{model}_{method.replace('*', 'star')}_{target}_p{particles}_g{groups}.png"
    _steer_grid(result, groups, reward, evaluator, target, path,
                f"{method} on {model} toward {target}: {solver}, {steps} steps, {particles} particles, "
                f"NFE {nfe:.0f} per population")
    setting = {"fk": f", lam {lam:g}, potential {potential}", "svdd": f", {candidates} candidates",
               "dts": f", lam {lam:g}", "dts*": f", lam {lam:g}"}.get(method, "")
    console.print(f"[bold]{method}[/] on {model} toward {target}: {solver}, {grid} grid, {steps} steps")
    console.print(f"  {groups} population(s) of {particles} particle(s){setting}")
    n_best, n_all = round(best_acc * groups), round(all_acc * result.x.shape[0])
    rows = [("reward of the best, mean", f"{best_rewards.mean().item():.4f} (log p({target}), classifier)"),
            ("evaluator accuracy, best", f"{best_acc:.1%} ({n_best} of {groups})"),
            ("evaluator accuracy, all", f"{all_acc:.1%} ({n_all} of {result.x.shape[0]} final particles)"),
            ("NFE per population", f"{nfe:.0f} ({result.nfe:g} per final particle)"),
            ("time", f"{elapsed:.2f} s"), ("picture", str(path))]
    for name, value in rows:
        console.print(f"  {name:<26} {value}")


def _steer_grid(result, groups: int, reward, evaluator, target: int, path: Path, title: str) -> None:
    """Each population in a row: its best particle first, then every final particle; each labelled with
    its reward and the evaluator's class (green: the target)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = result.x.detach().float()
    per = x.shape[0] // groups
    with torch.no_grad():
        predicted = evaluator(x).argmax(1).reshape(groups, per)
    rewards = result.rewards.reshape(groups, per)
    best = rewards.argmax(1)
    pics = x.clamp(-1, 1).reshape(groups, per, 8, 8)
    fig, axes = plt.subplots(groups, per + 1, figsize=(0.9 * (per + 1) + 0.4, 1.0 * groups + 0.7), dpi=100,
                             squeeze=False)
    for row in range(groups):
        for col in range(per + 1):
            ax = axes[row][col]
            k = int(best[row]) if col == 0 else col - 1
            ax.imshow(pics[row, k].numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            hit = int(predicted[row, k]) == target
            ax.set_title(("best: " if col == 0 else "") + f"{int(predicted[row, k])} {float(rewards[row, k]):.2f}",
                         fontsize=6, color="green" if hit else "red")
            if col == 0:
                for spine in ax.spines.values():
                    spine.set_linewidth(2.5)
                    spine.set_color("green" if hit else "red")
        axes[row][0].set_ylabel(f"population {row}", fontsize=7)
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@app.command()
def posterior(
    model: str = typer.Option("digits", help="A shipped digits model, the prior (unconditional): digits."),
    task: str = typer.Option("inpaint", help="inpaint (the bottom half hidden) or denoise (every pixel, noisy)."),
    method: str = typer.Option("afdps", help="afdps (weighted particles, exact in the particle limit) or dps."),
    images: int = typer.Option(4, min=1, help="Held-out digits to measure and reconstruct."),
    particles: int = typer.Option(None, min=1, help="AFDPS: particles per digit; DPS: samples per digit "
                                                     "(default: the method's own)."),
    steps: int = typer.Option(None, min=1, help="Steps of the log-SNR grid (default: the method's own)."),
    solver: str = typer.Option("ddpm", help="A reverse-SDE solver, or for AFDPS a deterministic one (V = 0)."),
    sigma_y: float = typer.Option(None, help="Measurement noise, in pixel units of [-1, 1] (default: the "
                                             "task's own)."),
    scale: float = typer.Option(1.0, help="DPS's step size zeta."),
    seed: int = typer.Option(0, help="Seed of the digits picked, the measurement noise and the sampling."),
    out: Path = typer.Option(Path("out"), help="Directory for the picture."),
) -> None:
    """Reconstruct held-out digits from a measurement; judge the samples with an independent classifier."""
    from .posterior.digits import format_result, posterior_digits
    _choice("model", model, ("digits",))
    _choice("task", task, ("inpaint", "denoise"))
    _choice("method", method, ("afdps", "dps"))
    _choice("solver", solver, _solvers.REGISTRY)
    options = {k: v for k, v in dict(particles=particles, steps=steps, sigma_y=sigma_y).items() if v is not None}
    try:
        r = posterior_digits(task, method, model=model, images=images, solver=solver, scale=scale, seed=seed,
                             out=out, **options)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    except FloatingPointError as err:  # AFDPS's explicit guidance diverged: say so, no traceback
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    console.print(format_result(r))


@app.command()
def edit(
    model: str = typer.Option("digits", help="A shipped class-conditional digits model: digits, digits-flow."),
    index: int = typer.Option(17, min=0, help="The held-out digit to edit (its index)."),
    to: int = typer.Option(8, min=0, max=9, help="The class to regenerate it as."),
    method: str = typer.Option("edict", help="Inversion method: edict, bdia, edit_friendly, polaris, or a "
                                             "deterministic solver (DDIM-style inversion)."),
    steps: int = typer.Option(50, min=1, help="Steps of the full grid."),
    strength: float = typer.Option(0.8, min=0.0, max=1.0, help="Share of the grid inverted (diffusers' "
                                                              "img2img strength)."),
    scale: float = typer.Option(3.0, help="Classifier-free guidance scale of inversion and regeneration."),
    seed: int = typer.Option(0, help="Seed (edit_friendly's noise)."),
    out: Path = typer.Option(Path("out"), help="Directory for the picture."),
) -> None:
    """Invert a real digit under its label and regenerate it under another (original, reconstruction, edit)."""
    from .inversion import resolve
    from .inversion.edit import edit_digit
    _choice("model", model, ("digits", "digits-flow"))
    try:
        resolve(method)
    except (ValueError, TypeError) as err:
        raise typer.BadParameter(str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"edit-{model}-{index}-to-{to}-{method}.png"
    r = edit_digit(index, to, method, model=model, steps=steps, scale=scale, strength=strength, seed=seed, out=path)
    console.print(f"digit {index} (label {r['label']}) -> {to} with {method}, {r['nfe']} evaluations")
    console.print(f"reconstruction error {r['reconstruction_error']:.2e} (relative L2)")
    console.print(f"edit read as {r['edit_label']} (confidence {r['edit_confidence']:.3f}) by the evaluator; "
                  f"distance to the original {r['distance']:.3f} RMS")
    console.print(f"wrote {r['path']}")


@app.command()
def train(
    names: list[str] = typer.Argument(..., help="Models to train, or 'all' (see `diffsampler models`)."),
    out: Path = typer.Option(None, help="Where the safetensors files go (default: the package's weights)."),
    steps: int = typer.Option(None, min=1, help="Shorten the run to this many steps (a quick check, not the "
                                                "shipped model)."),
) -> None:
    """Train shipped models from their seeds, measure their quality and write their weights."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from . import models as _models
    from .models.train import SPECS
    if names == ["all"]:
        # The evaluator first: the digits denoisers are judged by it.
        names = ["digits-evaluator"] + [n for n in SPECS if n != "digits-evaluator"]
    for name in names:
        _choice("model", name, SPECS)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    for name in names:
        columns = (TextColumn(f"[bold]{name}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(name, total=steps or SPECS[name].stop(), loss=float("nan"))
            path = _models.make(name, out, progress=lambda step, loss: bar.update(task, completed=step, loss=loss),
                                log=console.print, steps=steps)
        console.print(f"{name}: wrote {path}")
        console.print(_models.info(name, out)["quality"])


@app.command()
def models() -> None:
    """List the shipped models with their process, prediction and measured quality."""
    from . import models as _models
    table = Table(title="diffsampler models")
    # names and figures are what users read: names never cut, figures wrap between words only
    table.add_column("name", no_wrap=True, min_width=max(map(len, _models.names())))
    table.add_column("model")
    table.add_column("measured quality", ratio=1)
    for name in _models.names():
        try:
            meta = _models.info(name)
        except FileNotFoundError:
            table.add_row(name, "-", "(not trained: diffsampler train " + name + ")")
            continue
        prediction = "" if meta["prediction"] is None else f", {meta['prediction']}"
        process = "" if meta["process"] is None else f": {meta['process']}{prediction}"
        table.add_row(name, f"{meta['kind']}{process}, {meta['parameters']:,} parameters",
                      quality_text(meta.get("quality") or {}))
    console.print(table)
    console.print("Descriptions and training records: ds.models.info(name).")


def quality_text(quality: dict) -> str:
    """A model record's measured quality in a few words: accuracies in %, distances to 3 digits."""
    parts = []
    for key, value in quality.items():
        if key == "measure_seconds":
            continue
        if isinstance(value, dict):  # dpmpp_2m_20nfe_cfg2: {"accuracy", "frechet_distance"}
            head = key.replace("_20nfe_", " 20 NFE ").replace("cfg", "CFG ")
            parts.append(f"{head}: " + ", ".join(_figure(k, v) for k, v in value.items()))
        elif key not in ("n",):
            parts.append(_figure(key, value))
    return "; ".join(parts)


def _figure(key: str, value) -> str:
    names = {"accuracy": "accuracy", "frechet_distance": "FD", "swd_to_data": "SWD to data",
             "swd_data_to_data": "data to data", "held_out_accuracy": "held-out accuracy"}
    if key.startswith("held_out_accuracy_t"):
        label = f"accuracy at t = {key.rsplit('_t', 1)[1]}"
    else:
        label = names.get(key, key.replace("_", " "))
    if isinstance(value, float) and "accuracy" in key:
        return f"{label} {value:.1%}"
    if isinstance(value, float):
        return f"{label} {value:.3g}"
    return f"{label} {value}" if key != "sampler" else str(value)


@app.command()
def generate(
    model: str = typer.Option(..., help="A shipped denoiser (see `diffsampler models`)."),
    num_samples: int = typer.Option(..., min=1, help="Number of samples."),
    batch: int = typer.Option(250, min=1, help="Samples per network call (the round-off depends on it)."),
    shard_size: int = typer.Option(1000, min=1, help="Samples per shard file (the unit of work and of resume)."),
    solver: str = typer.Option("dpmpp_2m", help="Solver name (see `diffsampler solvers`)."),
    grid: str = typer.Option(None, help="Time grid: " + ", ".join(_grids.names()) + " (default: logsnr for VP "
                                         "models, uniform for flows)."),
    steps: int = typer.Option(20, min=1, help="Number of steps."),
    cfg: float = typer.Option(1.0, help="Classifier-free guidance weight (1: the conditional model)."),
    label: list[str] = typer.Option(None, help="Class of each sample, cycling (repeat the flag or use commas; "
                                               "--label 3: all threes; 10: unconditional). Default: every "
                                               "class in turn."),
    seed: int = typer.Option(0, help="Sample i's start point and noise depend on (seed, i) only."),
    out: Path = typer.Option(..., help="Output directory (an existing run there is resumed)."),
    device: str = typer.Option("cpu", help="cpu or cuda (under torchrun: gloo on CPU, NCCL on GPU)."),
    threads: int = typer.Option(None, min=1, help="Torch threads per worker (default: torch's own; "
                                                  "torchrun sets OMP_NUM_THREADS=1)."),
    progress: bool = typer.Option(True, help="Show a progress bar on worker 0."),
) -> None:
    """Generate samples into shards, resumably; the same for any number of torchrun workers."""
    import os

    from . import generation as gen
    from .models.quality import default_grid
    _choice("solver", solver, _solvers.REGISTRY)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        setup = gen.shipped(model, labels=gen.parse_labels(label), cfg=cfg, device=device, num_samples=num_samples)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    grid = grid or default_grid(setup["model"].process)
    _choice("grid", grid, _grids.GRIDS)
    try:
        gen.generate(num_samples=num_samples, batch=batch, shard_size=shard_size, grid=grid, steps=steps,
                     solver=solver, seed=seed, out=out, device=device, progress=progress, log=console.print,
                     **setup)
    except ValueError as err:  # e.g. more --label values than samples
        raise typer.BadParameter(str(err)) from None
    except gen.GenerateError as err:
        if int(os.environ.get("RANK", "0")) == 0 or isinstance(err, gen.WorkerLost):
            Console(stderr=True).print(f"[bold red]generate:[/] {err}", highlight=False)
        raise typer.Exit(2 if isinstance(err, gen.ConfigMismatch) else 1) from None
    except KeyboardInterrupt:
        Console(stderr=True).print(f"[bold red]generate:[/] interrupted; the finished shards in {out} are kept: "
                                   f"run the same command again to make the rest", highlight=False)
        raise typer.Exit(130) from None


@app.command()
def evaluate(
    directory: Path = typer.Argument(..., help="A directory written by `diffsampler generate`."),
    model: str = typer.Option(None, help="The digits model sampled (default: the manifest's)."),
) -> None:
    """Judge generated digits: the evaluator's class accuracy and the Frechet distance to real digits."""
    from . import generation as gen
    try:
        result = gen.evaluate(directory, model)
    except (FileNotFoundError, ValueError, gen.GenerateError) as err:
        raise typer.BadParameter(str(err)) from None
    console.print(f"[bold]{result['model']}[/]: {result['n']} samples in {directory}")
    acc = result["accuracy"]
    rows = [("class accuracy (evaluator)", "- (no labels)" if acc is None else f"{acc:.1%}"),
            ("Frechet distance to real", f"{result['frechet_distance']:.2f}")]
    ref = result.get("reference")
    if ref is not None:
        rows.append(("ds.models.info, this config", f"{ref['accuracy']:.1%}, Frechet distance "
                                                      f"{ref['frechet_distance']:.2f} ({ref['key']})"))
    for name, value in rows:
        console.print(f"  {name:<31} {value}")


# `diffsampler calibrate`: its options and output live with the calibration code
app.command("calibrate")(_calibrate_cli.command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
