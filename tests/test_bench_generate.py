"""`diffsampler bench --section generate` at a tiny size: it launches 1 and 2 torchrun workers, writes its
table through the bench's writer with numbers that agree with each other, and the report reproduces from the
raw numbers. (The 1.7x claim is the full bench's, not a test's: it is a timing.)"""

import re

import pytest

from conftest import run_bench_section_alone

pytest.importorskip("diffusers")

TINY = dict(num_samples=8, batch=4, shard_size=4, steps=2, repeats=1)

pytestmark = pytest.mark.usefixtures("one_thread")  # the workers run one thread each; the report in this one


def test_the_generate_section_runs_alone_and_rewrites_identically(tmp_path, monkeypatch):
    from diffsampler.bench import generate as bg
    from diffsampler.bench import rewrite

    text, data = run_bench_section_alone(tmp_path, monkeypatch, bg, TINY, "generate")
    rows = data["generate"]
    assert [r["workers"] for r in rows] == [1, 2]  # repeat 0: one worker first
    for r in rows:
        assert r["samples"] == 8 and (r["batch"], r["shard_size"], r["steps"]) == (4, 4, 2), r
        assert r["seconds"] > 0 and r["cpu_seconds"] > 0 and r["load_before"] >= 0 and r["load_after"] >= 0, r
        assert r["samples_per_second"] == r["samples"] / r["seconds"], r
        assert r["command_seconds"] > r["seconds"], r  # the command also starts interpreters and loads the model
    assert "## Generation throughput: 1 and 2 workers" in text
    assert "`diffsampler generate --model digits --num-samples 8 --batch 4 --shard-size 4" in text
    section = text.split("## Generation throughput")[1]
    table = [line for line in section.splitlines() if re.match(r"\| 1 \| [12] \|", line)]
    assert [line.split(" | ")[1] for line in table] == ["1", "2"]
    for line, r in zip(table, rows):
        assert line.split(" | ")[2] == f"{r['samples_per_second']:.1f}"
    ratio = rows[1]["samples_per_second"] / rows[0]["samples_per_second"]
    assert f"= **{ratio:.2f}x** (target 1.7x: " in text
    assert "## Accuracy per NFE" in text and "## Posterior sampling" in text  # the other sections are still there
    assert text.index("## Posterior sampling") < text.index("## Generation throughput")
    assert rewrite(tmp_path, log=lambda s: None).read_text() == text


def test_speedups_read_the_rows():
    from diffsampler.bench.generate import GenerateResult, speedups

    def row(repeat, workers, seconds, cpu):
        return GenerateResult(repeat, workers, 100, 50, 50, 20, seconds, 100 / seconds, cpu, seconds + 5, 1.0, 1.0, 2)

    rows = [row(0, 1, 4.0, 4.0), row(0, 2, 2.5, 4.4), row(1, 2, 2.0, 4.0), row(1, 1, 5.0, 4.0)]
    ratio = speedups(rows)
    assert ratio["best_rates"] == (25.0, 50.0) and ratio["best"] == 2.0
    assert ratio["pairs"] == [4.0 / 2.5, 5.0 / 2.0]
    assert ratio["per_cpu_second"] == 1.0  # best runs: 100 samples in 4 CPU-seconds each
