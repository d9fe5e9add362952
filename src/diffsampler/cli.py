"""Command line: ``diffsampler solvers`` and ``diffsampler sample`` (thin over the Python API)."""

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
    for col in ("name", "order", "NFE/step", "stochastic", "options", "paper"):
        table.add_column(col)
    for name in _solvers.names():
        cls = _solvers.REGISTRY[name]
        s = cls()
        order = f"{s.order}" + (f" (global {s.global_order})" if s.global_order != s.order else "")
        table.add_row(name, order, str(cls.nfe_per_step),
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
) -> None:
    """Accuracy per NFE and overhead per step against diffusers and k-diffusion; writes BENCHMARKS.md."""
    from . import bench as _bench
    if rewrite:
        _bench.rewrite(out, log=console.print)
    else:
        _bench.run(quick=quick, root=out, log=console.print)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
