"""diffsampler bench: accuracy per NFE against exact references and the sampler's own cost per
step, side by side with diffusers and k-diffusion, written to BENCHMARKS.md."""

from __future__ import annotations

import platform
import time
import warnings
from pathlib import Path
from typing import Callable

__all__ = ["run", "rewrite", "SECTIONS"]

# The second layer's sections, each a module of this package with its row dataclass, its runner
# ``run(quick, log) -> rows``, its BENCHMARKS.md lines ``section(rows)`` and its plot ``plot(rows, out)``
# (or None), in the report's order.
LAYER_SECTIONS = {
    "steering": ("steering", "SteerResult", "run_steering", "steering_section", "plot_steering"),
    "inversion": ("inversion", "InversionResult", "run_inversion", "inversion_section", "plot_inversion"),
    "posterior": ("posterior", "PosteriorResult", "run_posterior", "posterior_section", None),
    "generate": ("generate", "GenerateResult", "run_generate", "generate_section", None),
    "calibration": ("calibration", "CalibrationResult", "run_calibration", "calibration_section", None),
}
SECTIONS = ("accuracy", "adaptive", "distribution", "overhead", "models") + tuple(LAYER_SECTIONS)


def layer_section(name: str, part: str):
    """The row type (``"row"``), runner, section writer or plotter of a second-layer section, or None."""
    import importlib
    module, row, runner, section, plot = LAYER_SECTIONS[name]
    attr = {"row": row, "run": runner, "section": section, "plot": plot}[part]
    return None if attr is None else getattr(importlib.import_module(f"{__name__}.{module}"), attr)


def run(quick: bool = False, root: Path | str = ".", threads: int = 1,
        log: Callable[[str], None] = print, sections: tuple[str, ...] = SECTIONS) -> Path:
    """Run the benchmark and write ``BENCHMARKS.md``, ``benchmarks/*.png`` and ``benchmarks/results.json``.

    ``sections`` re-runs only some parts; the others are read back from the
    existing ``benchmarks/results.json``.
    """
    with warnings.catch_warnings():
        # The peers' DDIM/PNDM "trailing" configurations step to timesteps their own lists lack; the
        # accuracy tables judge them as they run (tests/test_parity.py names the quirk): no warning per config.
        warnings.filterwarnings("ignore", message="grid_from_scheduler: .* no grid reproduces that",
                                category=UserWarning)
        return _run(quick, root, threads, log, sections)


def _run(quick: bool, root: Path | str, threads: int, log: Callable[[str], None], sections: tuple[str, ...]) -> Path:
    import torch
    from diffusers.utils import logging as dlogging

    from .accuracy import run_accuracy, run_adaptive
    from .distribution import run_distribution
    from .models import run_guidance, run_models
    from .overhead import run_overhead
    from .report import write_report

    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"bench: sections must be a non-empty subset of {SECTIONS}, got {sections!r}")
    dlogging.set_verbosity_error()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    partial = set(sections) != set(SECTIONS)
    old = _load(Path(root)) if partial else {}
    if "accuracy" in sections:
        old["accuracy"] = run_accuracy(quick=quick, n=64 if quick else 128, log=log)
    if "adaptive" in sections:
        old["adaptive"] = run_adaptive(quick=quick, n=64 if quick else 128, log=log)
    if "distribution" in sections:
        old["distribution"] = run_distribution(quick=quick, n=500 if quick else 2000, log=log)
    if "overhead" in sections:
        old["overhead"] = run_overhead(quick=quick, log=log)
    if "models" in sections:
        old["models"] = run_models(quick=quick, log=log)
        old["guidance"] = run_guidance(quick=quick, log=log)
    for name in LAYER_SECTIONS:
        if name in sections:
            old[name] = layer_section(name, "run")(quick=quick, log=log)
    command = "diffsampler bench" + (" --quick" if quick else "")
    if partial:  # each section keeps the command that last produced it
        command += " --section " + " --section ".join(sections)
    provenance = {**old.get("provenance", {}), **{s: command for s in sections}}
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, {_cores()} cores, no GPU"
    (results, failures), dist, timings = old["accuracy"], old["distribution"], old["overhead"]
    path = write_report(results, failures, dist, timings, Path(root), provenance, machine, old.get("models", []),
                        old.get("guidance", []), adaptive_results=old.get("adaptive", []),
                        layers={name: old.get(name, []) for name in LAYER_SECTIONS})
    log(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    return path


def _cores() -> int:
    import os
    return os.cpu_count() or 1


def _load(root: Path) -> dict:
    """The sections of an earlier run, read back from ``benchmarks/results.json``."""
    import json

    from .accuracy import Failure, Result
    from .distribution import DistResult
    from .models import GuidanceResult, ModelResult
    from .overhead import Timing

    path = root / "benchmarks" / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"bench: {path} is missing; run every section first (diffsampler bench)")
    data = json.loads(path.read_text())
    return {
        # which command produced each section (older files name one command for all)
        "provenance": data.get("provenance") or {s: data["command"] for s in SECTIONS},
        "accuracy": ([Result(**r) for r in data["accuracy"]],
                     [Failure(**f) for f in data.get("peer_failures", [])]),
        "distribution": [DistResult(**d) for d in data.get("distribution", [])],
        "overhead": [Timing(**{**t, "shape": tuple(t["shape"])}) for t in data["overhead"]],
        "models": [ModelResult(**m) for m in data.get("models", [])],
        "guidance": [GuidanceResult(**m) for m in data.get("guidance", [])],
        "adaptive": [Result(**r) for r in data.get("adaptive", [])],
        **{name: [layer_section(name, "row")(**r) for r in data.get(name, [])] for name in LAYER_SECTIONS},
        "machine": data["machine"],
        "versions": data.get("versions"),
    }


def rewrite(root: Path | str = ".", log: Callable[[str], None] = print) -> Path:
    """Regenerate BENCHMARKS.md and the plots from ``benchmarks/results.json`` without re-running."""
    from .report import write_report

    root = Path(root)
    old = _load(root)
    (results, failures), dist, timings = old["accuracy"], old["distribution"], old["overhead"]
    path = write_report(results, failures, dist, timings, root, old["provenance"], old["machine"], old["models"],
                        old["guidance"], old["versions"], adaptive_results=old["adaptive"],
                        layers={name: old[name] for name in LAYER_SECTIONS})
    log(f"rewrote {path} from benchmarks/results.json")
    return path
