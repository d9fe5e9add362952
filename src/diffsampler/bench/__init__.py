"""diffsampler bench: accuracy per NFE against exact references and the sampler's own cost per
step, side by side with diffusers and k-diffusion, written to BENCHMARKS.md."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable

__all__ = ["run", "rewrite"]


def run(quick: bool = False, root: Path | str = ".", threads: int = 1,
        log: Callable[[str], None] = print) -> Path:
    """Run the benchmark and write ``BENCHMARKS.md``, ``benchmarks/*.png`` and ``benchmarks/results.json``."""
    import torch
    from diffusers.utils import logging as dlogging

    from .accuracy import run_accuracy
    from .distribution import run_distribution
    from .overhead import run_overhead
    from .report import write_report

    dlogging.set_verbosity_error()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    results, failures = run_accuracy(quick=quick, n=64 if quick else 128, log=log)
    dist = run_distribution(quick=quick, n=500 if quick else 2000, log=log)
    timings = run_overhead(quick=quick, log=log)
    command = "diffsampler bench" + (" --quick" if quick else "")
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, {_cores()} cores, no GPU"
    path = write_report(results, failures, dist, timings, Path(root), command, machine)
    log(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    return path


def _cores() -> int:
    import os
    return os.cpu_count() or 1


def rewrite(root: Path | str = ".", log: Callable[[str], None] = print) -> Path:
    """Regenerate BENCHMARKS.md and the plots from ``benchmarks/results.json`` without re-running."""
    import json

    from .accuracy import Failure, Result
    from .distribution import DistResult
    from .overhead import Timing
    from .report import write_report

    root = Path(root)
    data = json.loads((root / "benchmarks" / "results.json").read_text())
    timings = [Timing(**{**t, "shape": tuple(t["shape"])}) for t in data["overhead"]]
    path = write_report([Result(**r) for r in data["accuracy"]],
                        [Failure(**f) for f in data.get("peer_failures", [])],
                        [DistResult(**d) for d in data.get("distribution", [])], timings, root,
                        data["command"], data["machine"])
    log(f"rewrote {path} from benchmarks/results.json")
    return path
