"""Throughput of sharded generation: ``diffsampler generate`` on the shipped ``digits`` model with 1 and 2
torchrun workers (gloo, one thread each), measured in turn in the same bench run.

Each run is ``python -m torch.distributed.run --standalone --nproc-per-node P -m diffsampler generate ...``
into a fresh temporary directory. Its samples per second are those of the manifest's ``last_run``: from the
first shard to the last, so interpreter start, rendezvous and model loading are left out (the whole
command's wall time is kept beside them). Samples per CPU-second divide by the workers' own CPU time
(``time.process_time``), which other load on the machine changes little: the same for 1 and 2 workers means
the workers share nothing but the cores. The runs alternate (1, 2, then 2, 1, ...) so that a change in the
machine's load falls on both worker counts, and the best run of each is compared (other load only slows a
run). The machine's 1-minute load average is recorded before and after every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["GenerateResult", "run_generate", "speedups", "generate_section", "FULL", "QUICK", "TARGET"]

# Full size: eight shards of 500 (four each for two workers), about 30 s of generation for one worker on an
# idle core (long beside the few seconds of start-up); two repeats keep the section near two minutes on 2 cores.
FULL = dict(num_samples=4000, batch=250, shard_size=500, steps=20, repeats=2)
QUICK = dict(num_samples=40, batch=20, shard_size=20, steps=4, repeats=1)
WORKERS = (1, 2)
TARGET = 1.7  # issue 18: two workers reach at least 1.7 times the samples per second of one


@dataclass
class GenerateResult:
    repeat: int
    workers: int
    samples: int
    batch: int
    shard_size: int
    steps: int
    seconds: float              # generation, first shard to last (the manifest's last_run)
    samples_per_second: float   # samples / seconds
    cpu_seconds: float          # the workers' CPU time during generation, all of them together
    command_seconds: float      # the whole command: interpreter start, rendezvous, model loading, writing
    load_before: float          # the machine's 1-minute load average before the run
    load_after: float           # and after it
    cores: int                  # the machine's CPU cores


def _options(size: dict, out: Path) -> list[str]:
    """The ``diffsampler generate`` options of one run (the command line the section quotes)."""
    return ["--model", "digits", "--num-samples", str(size["num_samples"]), "--batch", str(size["batch"]),
            "--shard-size", str(size["shard_size"]), "--solver", "dpmpp_2m", "--grid", "logsnr",
            "--steps", str(size["steps"]), "--seed", "0", "--out", str(out)]


def _run_once(workers: int, size: dict, repeat: int) -> GenerateResult:
    with tempfile.TemporaryDirectory(prefix=f"diffsampler-bench-generate-p{workers}-") as scratch:
        out = Path(scratch) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers),
               "-m", "diffsampler", "generate", *_options(size, out), "--threads", "1", "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        command_seconds = time.perf_counter() - start
        load_after = os.getloadavg()[0]
        if done.returncode != 0:
            raise RuntimeError(f"bench generate: {' '.join(cmd)} exited with {done.returncode}:\n"
                               f"{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
        last = json.loads((out / "manifest.json").read_text())["last_run"]
    if last["workers"] != workers or last["samples"] != size["num_samples"]:
        raise RuntimeError(f"bench generate: asked for {size['num_samples']} samples by {workers} worker(s), the "
                           f"manifest records {last['samples']} by {last['workers']}")
    return GenerateResult(repeat, workers, last["samples"], size["batch"], size["shard_size"], size["steps"],
                          last["seconds"], last["samples"] / last["seconds"], last["cpu_seconds"],
                          round(command_seconds, 3), round(load_before, 2), round(load_after, 2), os.cpu_count() or 1)


def run_generate(quick: bool = False, log: Callable[[str], None] = print,
                 sizes: dict | None = None) -> list[GenerateResult]:
    """Each worker count once per repeat, alternating which goes first."""
    size = sizes or (QUICK if quick else FULL)
    rows = []
    for repeat in range(size["repeats"]):
        for workers in (WORKERS if repeat % 2 == 0 else WORKERS[::-1]):
            r = _run_once(workers, size, repeat)
            log(f"generate: {workers} worker(s): {r.samples_per_second:.1f} samples/s, "
                f"{r.samples / r.cpu_seconds:.1f} per CPU-second, load {r.load_before:.1f} / {r.load_after:.1f}")
            rows.append(r)
    return rows


def speedups(rows: list[GenerateResult]) -> dict:
    """Two workers against one: the best run of each (``"best"``), each repeat's pair (``"pairs"``), and the
    ratio of samples per CPU-second of the best runs (``"per_cpu_second"``)."""
    best = {w: max((r for r in rows if r.workers == w), key=lambda r: r.samples_per_second) for w in WORKERS}
    pairs = []
    for repeat in sorted({r.repeat for r in rows}):
        rate = {r.workers: r.samples_per_second for r in rows if r.repeat == repeat}
        pairs.append(rate[2] / rate[1])
    one, two = best[1], best[2]
    return {"best": two.samples_per_second / one.samples_per_second, "pairs": pairs,
            "per_cpu_second": (two.samples / two.cpu_seconds) / (one.samples / one.cpu_seconds),
            "best_rates": (one.samples_per_second, two.samples_per_second)}


def generate_section(rows: list[GenerateResult]) -> list[str]:
    """The lines of BENCHMARKS.md's generation-throughput section."""
    first = rows[0]
    size = dict(num_samples=first.samples, batch=first.batch, shard_size=first.shard_size, steps=first.steps)
    command = "diffsampler generate " + " ".join(_options(size, Path("DIR")))
    ratio = speedups(rows)
    loads = [v for r in rows for v in (r.load_before, r.load_after)]
    verdict = "met" if ratio["best"] >= TARGET else "not met"
    lines = ["## Generation throughput: 1 and 2 workers", "",
             f"`{command}` as `torchrun --standalone --nproc-per-node P -m diffsampler generate ...` (gloo), "
             "P = 1 and 2 in turn in the same run (alternating which goes first), one thread per worker "
             "(`OMP_NUM_THREADS=1`, `--threads 1`), each into a fresh directory. Samples per second: the "
             "manifest's `last_run`, from the first shard to the last (interpreter start, rendezvous and model "
             "loading left out; the whole command's wall time beside it). Samples per CPU-second: over the "
             "workers' own CPU time (`time.process_time`), which other load changes little. Load: the "
             "machine's 1-minute load average before and after each run; on a shared machine the wall-clock "
             "rates depend on what else runs.", "",
             "| repeat | workers | samples/s | seconds | command (s) | samples per CPU-second | load before / after |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.repeat + 1} | {r.workers} | {r.samples_per_second:.1f} | {r.seconds:.2f} | "
                     f"{r.command_seconds:.1f} | {r.samples / r.cpu_seconds:.1f} | "
                     f"{r.load_before:.1f} / {r.load_after:.1f} |")
    one, two = ratio["best_rates"]
    lines += ["",
              f"Two workers / one, best run of each: {two:.1f} / {one:.1f} samples/s = **{ratio['best']:.2f}x** "
              f"(target {TARGET:g}x: {verdict}); per repeat: "
              + ", ".join(f"{p:.2f}x" for p in ratio["pairs"])
              + f". Samples per CPU-second, two workers / one: {ratio['per_cpu_second']:.2f} (1.00: running "
              f"side by side costs no extra work per sample). Load average during the runs: "
              f"{min(loads):.1f} to {max(loads):.1f} on {first.cores} cores.", ""]
    return lines
