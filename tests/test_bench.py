"""`diffsampler bench --quick` runs end to end and writes what it promises."""

import json

import pytest

pytest.importorskip("diffusers")


def test_sliced_wasserstein_sees_a_shift():
    import torch
    from diffsampler.bench.distribution import sliced_wasserstein
    a = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    same, shifted = sliced_wasserstein(a, b), sliced_wasserstein(a, b + 0.5)
    assert same < 0.06 and 0.2 < shifted < 0.5  # a shift of 0.5 projects to 0.5 |cos|, about 0.29 on average


def _results(data):
    from diffsampler.bench.accuracy import Result
    return [Result(**r) for r in data["accuracy"]]


def test_quick_bench_writes_the_report(tmp_path):
    from diffsampler.bench import run
    from diffsampler.bench.report import best_per_nfe

    path = run(quick=True, root=tmp_path, log=lambda s: None)
    text = path.read_text()
    assert text.startswith("# Benchmarks") and "diffsampler bench --quick" in text
    data = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    families = {r["family"] for r in data["accuracy"]}
    assert families == {"diffsampler", "diffusers", "k-diffusion"}
    # NFE is what the Denoiser counted, never more than the budget.
    assert all(r["nfe"] <= r["target_nfe"] for r in data["accuracy"])
    for row in data["best_per_nfe"]:
        assert row["ours_rmse"] > 0 and "ratio" in row
    assert {r["library"] for r in data["overhead"]} == {"diffsampler", "diffusers", "k-diffusion"}
    assert {d["family"] for d in data["distribution"]} == {"diffsampler", "k-diffusion"}
    assert "## Stochastic samplers against the exact target" in text
    for name in ("overhead.png", "accuracy_ring8_vp_scaled_linear.png", "accuracy_ring8_flow.png"):
        assert (tmp_path / "benchmarks" / name).read_bytes()[:4] == b"\x89PNG"
    # two problems (ring8 under VP and flow) at three NFE budgets, summarised from the raw results
    assert data["best_per_nfe"] == json.loads(json.dumps(best_per_nfe(_results(data))))


def test_rewrite_reproduces_the_report_from_the_raw_numbers(tmp_path):
    from diffsampler.bench import rewrite, run

    first = run(quick=True, root=tmp_path, log=lambda s: None).read_text()
    assert rewrite(tmp_path, log=lambda s: None).read_text() == first
