"""Command line: ``diffsampler solvers|sample|bench|train|models|demo`` (thin over the Python API)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from . import grids as _grids
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
    """List every registered solver with its order, NFE per step and paper."""
    table = Table(title="diffsampler solvers")
    # the name is what users type: never cut, whatever the terminal's width (the other columns wrap)
    table.add_column("name", no_wrap=True, min_width=max(map(len, _solvers.names())))
    for col in ("order", "NFE/step", "stochastic", "options", "paper"):
        table.add_column(col)
    for name in _solvers.names():
        cls = _solvers.REGISTRY[name]
        s = cls()
        order = f"{s.order}" + (f" (global {s.global_order})" if s.global_order != s.order else "")
        nfe = str(cls.nfe_per_step) + (f" (+{cls.extra_nfe} once)" if cls.extra_nfe else "") + \
            (" per attempt (adaptive)" if cls.adaptive else "")
        table.add_row(name, order, nfe,
                      "yes" if s.stochastic else "optional" if _stochastic_option(cls) else "no",
                      ", ".join(cls.options()) or "-", cls.paper)
    console.print(table)


def _stochastic_option(cls) -> bool:
    return any(o in ("eta", "s_churn", "s_noise") for o in cls.options())


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
) -> None:
    """Sample a testbed with a solver, write a scatter over the exact density, report the error."""
    _choice("testbed", testbed, _testbeds.TESTBEDS)
    _choice("process", process, PROCESSES)
    _choice("solver", solver, _solvers.REGISTRY)
    _choice("grid", grid, _grids.GRIDS)
    gmm = _testbeds.get(testbed)
    proc = PROCESSES[process]()
    model = gmm.denoiser(proc, "velocity" if isinstance(proc, Flow) else "eps")
    solver_obj = _solvers.get(solver)
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
    out: Path = typer.Option(Path("."), help="Where BENCHMARKS.md and benchmarks/ are written."),
    rewrite: bool = typer.Option(False, "--rewrite", help="Only regenerate the report from benchmarks/results.json."),
    section: list[str] = typer.Option(None, "--section", help="Re-run only these sections (accuracy, adaptive, "
                                      "distribution, overhead, models); the others are read from "
                                      "benchmarks/results.json."),
) -> None:
    """Accuracy per NFE and overhead per step against diffusers and k-diffusion; writes BENCHMARKS.md."""
    from . import bench as _bench
    for name in section or ():
        _choice("section", name, _bench.SECTIONS)
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
    for column in ("name", "kind", "process", "prediction", "parameters", "train s", "description"):
        table.add_column(column)
    for name in _models.names():
        try:
            meta = _models.info(name)
        except FileNotFoundError:
            table.add_row(name, "-", "-", "-", "-", "-", "(not trained: diffsampler train " + name + ")")
            continue
        table.add_row(name, meta["kind"], str(meta["process"]), str(meta["prediction"]), str(meta["parameters"]),
                      str(meta["train_seconds"]), meta["description"])
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
