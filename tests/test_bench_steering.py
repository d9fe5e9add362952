"""`diffsampler bench --section steering` at a tiny size: it runs, writes its section through the bench's
writer, and the report reproduces from the raw numbers."""

import pytest

from conftest import run_bench_section_alone

pytest.importorskip("diffusers")

TINY = {"digits": dict(groups=2, steps=3, n=(1, 2, 4), particles=(2, 4), potentials=("diff",), candidates=(2,),
                       budgets=(4,), claim_groups=2),
        "gmm": dict(groups=20, steps=4, n=(1, 2, 4), particles=(2, 4), potentials=("diff", "max"), candidates=(2,),
                    budgets=(4,))}


def test_the_steering_section_runs_alone_and_rewrites_identically(tmp_path, monkeypatch):
    from diffsampler.bench import rewrite
    from diffsampler.bench import steering as st

    text, data = run_bench_section_alone(tmp_path, monkeypatch, st, TINY, "steering")
    rows = data["steering"]
    methods = {r["method"] for r in rows if r["problem"] == "digits"}
    assert {"best_of_n", "fk", "svdd"} <= methods
    assert {r["problem"] for r in rows} == {"digits", "gmm", "digits_claim"}
    # NFE per population: best-of-N and FK spend N and particles unsteered runs' worth, SVDD 1 + M (steps - 1)
    for r in rows:
        if r["method"] in ("best_of_n", "fk"):
            assert r["nfe"] == r["size"] * r["steps"], r
        if r["method"] == "svdd":
            assert r["nfe"] == 1 + r["size"] * (r["steps"] - 1), r
    digits = [r for r in rows if r["problem"] == "digits"]
    assert all(0 <= r["accuracy"] <= 1 and r["reward"] <= 0 for r in digits)  # log-probabilities
    gmm = [r for r in rows if r["problem"] == "gmm"]
    assert all(0 <= r["mode_error"] <= 1 and r["mean_error"] >= 0 for r in gmm)
    assert "## Steering toward a reward" in text and "The issue's claims, as measured:" in text
    assert "FK with 4 particles reaches a higher evaluator accuracy than best-of-4" in text
    assert "at no more than 1/3 of its NFE\" (digits)" in text and "(gmm)" in text
    assert "## Accuracy per NFE" in text  # the other sections are still there
    assert (tmp_path / "benchmarks" / "steering.png").read_bytes()[:4] == b"\x89PNG"
    assert rewrite(tmp_path, log=lambda s: None).read_text() == text


def _row(problem, method, size, nfe, reward, accuracy=None, groups=40, setting=""):
    from diffsampler.bench.steering import SteerResult
    return SteerResult(problem, method, setting or f"{method} {size}", size, groups, 10, nfe, reward, accuracy,
                       None, None, None, 0.0)


def test_claims_read_the_rows():
    from diffsampler.bench.steering import claims

    rows = [_row("digits", "best_of_n", n, 10 * n, r, a) for n, r, a in ((1, -9, .1), (4, -5, .3), (16, -1, .8))]
    rows += [_row("digits", "fk", 4, 40, -4, .5, setting="diff, 4 particles"),
             _row("digits", "svdd", 2, 19, -4.5, .4), _row("digits", "svdd", 8, 73, -0.9, .9)]
    c = claims(rows)
    f = c["fk4_vs_best_of_4"]
    assert f["holds"] and f["fk_accuracy"] == .5 and f["best_of_4_accuracy"] == .3 and f["populations"] == 40
    t = c["third_of_nfe_digits"]
    # N=1: svdd M=2 (19 of 10); N=4: svdd M=2 reaches -5 at 19 of 40; N=16: svdd M=8 at 73 of 160
    assert [p["cheapest_nfe"] for p in t["per_n"]] == [19, 19, 73]
    assert t["best_n"] == 16 and t["best_ratio"] == pytest.approx(73 / 160) and not t["holds"]
    rows.append(_row("digits", "svdd", 4, 37, -0.5, .9))
    t = claims(rows)["third_of_nfe_digits"]
    assert t["holds"] and t["best_ratio"] == pytest.approx(37 / 160)
    # the claim's own populations take precedence over the table's
    rows += [_row("digits_claim", "best_of_n", 4, 40, -5, .6, groups=200),
             _row("digits_claim", "fk", 4, 40, -4, .55, groups=200, setting="diff, 4 particles")]
    f = claims(rows)["fk4_vs_best_of_4"]
    assert not f["holds"] and f["populations"] == 200
