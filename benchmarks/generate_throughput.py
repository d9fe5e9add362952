"""Throughput of ``diffsampler generate`` with 1 and 2 workers (one thread each) on the digits model.

    python benchmarks/generate_throughput.py [--num-samples 2000] [--repeats 2]

Each run writes into a fresh temporary directory; the figure is the manifest's ``last_run``
samples per second (generation only: from the first shard to the last, interpreter start and model
loading excluded). The best of ``--repeats`` runs is kept (other load on the machine only slows a run).
Beside it, samples per CPU-second of the workers (``time.process_time``), which other load does not
change much: equal for 1 and 2 workers means the workers share nothing but the cores.
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def run(workers: int, args) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"generate_p{workers}_"))
    options = ["generate", "--model", "digits", "--num-samples", str(args.num_samples), "--batch", str(args.batch),
               "--shard-size", str(args.shard_size), "--solver", "dpmpp_2m", "--grid", "logsnr", "--steps",
               str(args.steps), "--seed", "0", "--out", str(out), "--no-progress"]
    if workers == 1:
        cmd = [sys.executable, "-m", "diffsampler", *options]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers),
               "-m", "diffsampler", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    load = os.getloadavg()[0]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    record = json.loads((out / "manifest.json").read_text())["last_run"]
    record["load"] = round(0.5 * (load + os.getloadavg()[0]), 1)  # the machine's 1-minute load, before and after
    record["per_cpu_second"] = record["samples"] / record["cpu_seconds"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    best = {}
    for _ in range(args.repeats):
        for workers in (1, 2):
            r = run(workers, args)
            print(f"{workers} worker(s): {r['samples_per_second']:.1f} samples/s ({r['seconds']:.1f} s), "
                  f"{r['per_cpu_second']:.1f} samples per CPU-second, load {r['load']}", flush=True)
            if workers not in best or r["samples_per_second"] > best[workers]["samples_per_second"]:
                best[workers] = r
    import torch
    one, two = best[1]["samples_per_second"], best[2]["samples_per_second"]
    print()
    print(f"`diffsampler generate --model digits --num-samples {args.num_samples} --batch {args.batch} "
          f"--shard-size {args.shard_size} --solver dpmpp_2m --grid logsnr --steps {args.steps}`, "
          f"OMP_NUM_THREADS=1 per worker, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"Python {platform.python_version()}; best of {args.repeats}:")
    print()
    print("| workers | samples/s | seconds | speed-up | samples per CPU-second | machine load |")
    print("|---|---|---|---|---|---|")
    for workers in (1, 2):
        r = best[workers]
        print(f"| {workers} | {r['samples_per_second']:.1f} | {r['seconds']:.1f} | "
              f"{r['samples_per_second'] / one:.2f}x | {r['per_cpu_second']:.1f} | {r['load']} |")
    print()
    print(f"two workers / one: {two / one:.2f}x wall clock; per CPU-second "
          f"{best[2]['per_cpu_second'] / best[1]['per_cpu_second']:.2f}x (1.00 is perfect scaling)")


if __name__ == "__main__":
    main()
