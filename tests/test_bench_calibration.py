"""`diffsampler bench --section calibration` at a tiny size: it runs alone, gives a calibrated and an
uncalibrated FD per budget, the plans it samples cost at most their budget, its goal line reads its own rows,
and the other sections survive. (Whether the goal is met is the full bench's finding, not a test's.)"""

import math

import pytest
import torch

from conftest import run_bench_section_alone

pytest.importorskip("diffusers")

TINY = dict(models=("digits",), nfes=(5, 8), points=8, samples=20, retime_nfe=None)



@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """One tiny run shared by the tests (the bench runs one thread, as ``one_thread`` would; restored after)."""
    from diffsampler.bench import calibration as bc
    from diffsampler.bench import rewrite

    threads = torch.get_num_threads()
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("bench")
    try:
        text, data = run_bench_section_alone(root, monkeypatch, bc, TINY, "calibration")
        # the rows read back from results.json give the same report (the row type round-trips)
        assert rewrite(root, log=lambda s: None).read_text() == text
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    return text, data["calibration"]


def test_every_budget_has_a_calibrated_and_an_uncalibrated_fd(section):
    from diffsampler.bench.calibration import CALIBRATION_SEED, JUDGE_SEED

    _, rows = section
    judged = [r for r in rows if r["seed"] == JUDGE_SEED]
    assert JUDGE_SEED != CALIBRATION_SEED
    assert sorted((r["target_nfe"], r["kind"]) for r in judged) == \
        [(n, k) for n in TINY["nfes"] for k in ("calibrated", "uncalibrated")]
    for r in rows:
        assert r["model"] == "digits" and r["samples"] == TINY["samples"], r
        assert math.isfinite(r["frechet_distance"]) and r["frechet_distance"] >= 0, r
        assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["selection_error"]), r
    calibrated = [r for r in judged if r["kind"] == "calibrated"]
    assert all(math.isfinite(r["calibration_seconds"]) and r["calibration_seconds"] > 0 for r in calibrated)


def test_the_sampled_plans_cost_at_most_their_budget(section):
    from diffsampler import models, sample
    from diffsampler.calibrate import load_plan
    from diffsampler.guidance import cfg

    _, rows = section
    for r in rows:
        assert r["nfe"] <= r["target_nfe"], r
    # the calibrated rows sampled the shipped plan: counted again here with the model's own counter
    denoiser = models.load("digits")
    guided = cfg(denoiser, 2.0)
    for nfe in TINY["nfes"]:
        plan = load_plan(model="digits", nfe=nfe)
        x = denoiser.process.prior((10, 1, 8, 8), generator=torch.Generator().manual_seed(3))
        before = guided.nfe
        with torch.no_grad():
            sample(guided, x, plan.grid, plan.solver, label=torch.arange(10))
        used = guided.nfe - before
        assert used <= nfe
        assert {r["nfe"] for r in rows if r["kind"] == "calibrated" and r["target_nfe"] == nfe} == {used}


def test_the_table_and_goal_line_read_the_rows(section):
    from diffsampler.bench.calibration import GOAL_NFE, JUDGE_SEED, REPEAT_SEED

    text, rows = section
    assert "## Calibrated plans on the digits models" in text
    fd = {(r["kind"], r["target_nfe"]): r["frechet_distance"] for r in rows if r["seed"] == JUDGE_SEED}
    for nfe in TINY["nfes"]:
        cal, unc = fd[("calibrated", nfe)], fd[("uncalibrated", nfe)]
        assert f"| digits | {nfe} |" in text and f" | {cal:.2f} | " in text and f" | {cal / unc:.2f} | " in text
    cal, unc = fd[("calibrated", GOAL_NFE[0])], fd[("uncalibrated", GOAL_NFE[1])]
    verdict = "yes" if cal < unc else "no"
    assert f"digits: {verdict} ({cal:.2f} against {unc:.2f}); overall: {verdict}." in text
    # the goal's two configurations are drawn again from a second seed: the FD's sampling error
    assert {(r["kind"], r["target_nfe"]) for r in rows if r["seed"] == REPEAT_SEED} == \
        {("calibrated", GOAL_NFE[0]), ("uncalibrated", GOAL_NFE[1])}
    assert "Sampling error of the FD" in text


def test_the_other_sections_survive(section):
    text, _ = section
    for heading in ("## Accuracy per NFE", "## Posterior sampling", "## Generation throughput"):
        assert heading in text
    assert text.index("## Generation throughput") < text.index("## Calibrated plans on the digits models")


def test_the_goal_says_no_and_reports_a_re_timed_search():
    from diffsampler.bench.calibration import CalibrationResult, calibration_section

    def row(nfe, kind, fd, seed=1, **extra):
        return CalibrationResult("digits", nfe, kind, f"{kind} config", nfe, seed, 10, fd, 1.0, 0.1, 0.5, **extra)

    rows = [row(5, "calibrated", 20.0, calibration_seconds=30.0, retimed_seconds=40.0,
                retimed_configuration="other"),
            row(5, "uncalibrated", 30.0), row(8, "calibrated", 12.0, calibration_seconds=35.0),
            row(8, "uncalibrated", 15.0)]
    text = "\n".join(calibration_section(rows))
    assert "digits: no (20.00 against 15.00); overall: no." in text
    assert "digits NFE 5 in 40.0 s (the plan recorded 30.0 s; chose other)" in text
    assert "Sampling error" not in text  # no second seed drawn
