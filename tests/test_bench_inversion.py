"""`diffsampler bench --section inversion` at a tiny size: it runs, writes its section through the bench's
writer, and the report reproduces from the raw numbers."""

import pytest

from conftest import run_bench_section_alone

pytest.importorskip("diffusers")

TINY = {"mixture": dict(samples=4, steps=(3,)),
        "digits": dict(samples=1, steps={"float32": (3,), "float64": (3,)}),
        "edit": dict(samples=2, steps=3, mixture_samples=4)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: conftest's one-thread fixture


def test_the_inversion_section_runs_alone_and_rewrites_identically(tmp_path, monkeypatch):
    from diffsampler.bench import inversion as bi
    from diffsampler.bench import rewrite

    text, data = run_bench_section_alone(tmp_path, monkeypatch, bi, TINY, "inversion")
    rows = data["inversion"]
    recon = [r for r in rows if r["kind"] == "reconstruction"]
    edits = [r for r in rows if r["kind"] == "edit"]
    assert {r["problem"] for r in recon} == set(bi.PROBLEMS)
    for problem in bi.PROBLEMS:
        methods = {r["method"] for r in recon if r["problem"] == problem}
        assert methods == set(bi.METHODS) - ({"polaris"} if problem == "mixture" else set()), problem
        assert {r["dtype"] for r in recon if r["problem"] == problem} == {"float32", "float64"}
    # NFE per sample, inversion + regeneration: the step out of t = 0 costs DDIM-style inversion and POLARIS
    # two fixed-point evaluations, BDIA's pair state saves a step, EDICT evaluates twice a step each way
    per_step = {"ddim": (2, 1), "dpmpp_2m": (2, 1), "polaris": (2, 1), "bdia": (2, 0), "edit_friendly": (2, 0),
                "edict": (4, 0)}
    for r in rows:
        a, b = per_step[r["method"]]
        assert r["nfe"] == a * r["steps"] + b, r
    # the exact methods reconstruct to rounding in float64 on every problem (the digits networks in float32)
    for r in recon:
        assert r["error"] is not None and 0 <= r["error"] <= r["error_max"] and r["edit_success"] is None
        if r["method"] in ("bdia", "edict", "edit_friendly") and r["dtype"] == "float64":
            assert r["error_max"] < 1e-12, r
    assert {r["problem"] for r in edits} == {"mixture-cfg", "digits", "digits-flow"}
    assert {r["method"] for r in edits} == set(bi.METHODS)
    assert all(0 <= r["edit_success"] <= 1 and r["edit_distance"] > 0 and r["error"] is None for r in edits)
    assert all(r["steps"] == 2 and r["dtype"] == "float64" for r in edits)  # int(3 * 0.8) of the grid's steps
    assert "## Inversion and editing" in text and "### digits-flow, CFG 3" in text and "### Edits" in text
    assert "| edict | float64 | 12 / " in text and "As measured:" in text
    assert "* POLARIS against plain DDIM inversion" in text
    assert "## Accuracy per NFE" in text and "## Steering toward a reward" in text  # the others are still there
    assert (tmp_path / "benchmarks" / "inversion.png").read_bytes()[:4] == b"\x89PNG"
    assert rewrite(tmp_path, log=lambda s: None).read_text() == text


def test_the_findings_read_the_rows():
    from diffsampler.bench.inversion import InversionResult, findings

    def row(method, dtype, steps, error, nfe=None, problem="digits"):
        return InversionResult(problem, "reconstruction", method, dtype, steps, 8, 3.0,
                               nfe or 2 * steps + 1, error, error, None, None, 0.0)

    rows = [row("ddim", "float64", 5, 0.4), row("ddim", "float64", 20, 0.1), row("polaris", "float64", 5, 0.2),
            row("polaris", "float64", 20, 0.15), row("bdia", "float64", 5, 1e-16, 10),
            row("bdia", "float32", 5, 3e-5, 10)]
    rows.append(InversionResult("digits", "edit", "bdia", "float64", 40, 16, 3.0, 80, None, None, 0.75, 0.6, 0.0))
    text = "\n".join(findings(rows))
    assert "* bdia, float32: median reconstruction error at most 3e-05 (digits) over the step counts; the worst " \
           "sample 3e-05." in text and "* bdia, float64: median reconstruction error at most 1e-16 (digits)" in text
    assert "ddim (DDIM-style, float64): digits 4.0e-01 at 5 steps to 1.0e-01 at 20" in text
    assert "same grid and NFE (dtype and step count pairs): digits: lower in 1 of 2 (error ratio 0.50 to 1.50)" in text
    assert "digits bdia (75%, RMS 0.60)" in text
