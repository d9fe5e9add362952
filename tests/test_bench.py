"""`diffsampler bench --quick` runs end to end and writes what it promises."""

import json

import pytest
import torch

import diffsampler as ds

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


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The whole quick bench; the second layer's sections at the tiny sizes of their own tests
    (tests/test_bench_steering.py and the others check those sections' rows: here, the report)."""
    from test_bench_generate import TINY as GENERATE
    from test_bench_inversion import TINY as INVERSION
    from test_bench_steering import TINY as STEERING

    from diffsampler.bench import generate, inversion, posterior, run, steering
    root = tmp_path_factory.mktemp("bench")
    tiny_posterior = dict(posterior.QUICK, steps=(25,), digits_images=1, digits_particles=2, digits_steps=5)
    with pytest.MonkeyPatch.context() as mp:
        for module, size in ((steering, STEERING), (inversion, INVERSION), (posterior, tiny_posterior),
                             (generate, GENERATE)):
            mp.setattr(module, "QUICK", size)
        return root, run(quick=True, root=root, log=lambda s: None).read_text()


def test_quick_bench_writes_the_report(quick_run):
    from diffsampler.bench.report import best_per_nfe

    tmp_path, text = quick_run
    assert text.startswith("# Benchmarks") and "diffsampler bench --quick" in text
    data = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    families = {r["family"] for r in data["accuracy"]}
    assert families == {"diffsampler", "diffusers", "k-diffusion"}
    # NFE is what the Denoiser counted, never more than the budget.
    assert all(r["nfe"] <= r["target_nfe"] for r in data["accuracy"])
    for row in data["best_per_nfe"]:
        assert row["ours_rmse"] > 0 and "ratio" in row
    assert {r["library"] for r in data["overhead"]} == {"diffsampler", "diffusers", "k-diffusion", "plain loop"}
    assert {d["family"] for d in data["distribution"]} == {"diffsampler", "k-diffusion"}
    assert "## Stochastic samplers against the exact target" in text
    # per problem: the readable figure (envelopes and a few named solvers), then every solver's
    for name in ("overhead.png", "accuracy_ring8_vp_scaled_linear.png", "accuracy_ring8_vp_scaled_linear_all.png",
                 "accuracy_ring8_flow.png", "accuracy_ring8_flow_all.png"):
        assert (tmp_path / "benchmarks" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"benchmarks/{name}" in text or name == "overhead.png"
    # one calibrated diffsampler row per problem and budget (within the budget by the Denoiser's count: above)
    calibrated = [r for r in data["accuracy"] if r["config"].startswith("calibrated: ")]
    assert sorted((r["process"], r["target_nfe"]) for r in calibrated) == sorted(
        {(r["process"], r["target_nfe"]) for r in data["accuracy"]})
    assert all(r["family"] == "diffsampler" and r["calibration_s"] > 0 and r["rmse"] > 0 for r in calibrated)
    assert all(" grid" in r["config"] for r in calibrated)
    # the summary's ratios: best uncalibrated ours / best peer and calibrated / best peer, and the goal's verdict
    for row in data["best_per_nfe"]:
        assert not row["ours"].startswith("calibrated") and "calibrated_ratio" in row
        assert row["calibrated_ratio"] == pytest.approx(row["calibrated_rmse"] / row["peer_rmse"])
    assert "| ours / peer | calibrated / peer |" in text and "### Against the calibration goal" in text
    assert "of 2 cases measured" in text  # ring8 under SD's VP schedule at NFE 5 and 10
    # two problems (ring8 under VP and flow) at three NFE budgets, summarised from the raw results
    assert data["best_per_nfe"] == json.loads(json.dumps(best_per_nfe(_results(data))))
    # the shipped digits models: every solver run at its NFE budget, judged by the evaluator
    assert "## Shipped digits models" in text and "## Guidance on the digits model" in text
    assert data["models"] and all(r["nfe"] == r["target_nfe"] for r in data["models"])
    assert all(0 <= r["accuracy"] <= 1 for r in data["models"])
    methods = {r["method"] for r in data["guidance"]}
    assert methods == {"none", "cfg", "classifier", "autoguidance", "pag", "gfcg"}
    auto = [r for r in data["guidance"] if r["method"] == "autoguidance"]
    assert all(r["nfe"] == 2 * r["nfe_steps"] for r in auto)  # two networks per evaluation
    # dpm_adaptive: what it spent, the budget that covers it, its error; and its table
    assert data["adaptive"] and all(r["config"].startswith("dpm_adaptive") for r in data["adaptive"])
    assert all(0 < r["rmse"] < 1 and r["nfe"] > 0 for r in data["adaptive"])
    assert all(r["nfe"] <= r["target_nfe"] or r["target_nfe"] == 50 for r in data["adaptive"])
    assert "### Adaptive step size" in text


def test_rewrite_reproduces_the_report_from_the_raw_numbers(quick_run):
    from diffsampler.bench import rewrite

    root, first = quick_run
    assert rewrite(root, log=lambda s: None).read_text() == first


def test_one_section_reruns_alone_and_keeps_the_others(quick_run, tmp_path):
    import shutil

    from diffsampler.bench import SECTIONS, run
    root, _ = quick_run
    shutil.copytree(root / "benchmarks", tmp_path / "benchmarks")
    before = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    run(quick=True, root=tmp_path, log=lambda s: None, sections=("overhead",))
    after = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    assert after["accuracy"] == before["accuracy"] and after["models"] == before["models"]
    assert after["overhead"] != before["overhead"]  # re-measured
    # each section names the command that last produced it, and the report says so
    assert set(before["provenance"].values()) == {"diffsampler bench --quick"}
    assert after["provenance"] == {**before["provenance"], "overhead": "diffsampler bench --quick --section overhead"}
    kept = ", ".join(s for s in SECTIONS if s != "overhead")
    assert (f"Generated by `diffsampler bench --quick` ({kept}), `diffsampler bench --quick --section overhead` "
            "(overhead);") in (tmp_path / "BENCHMARKS.md").read_text()
    with pytest.raises(ValueError, match="sections must be a non-empty subset"):
        run(quick=True, root=tmp_path, sections=("speed",))


def test_calibration_points_are_never_the_bench_start_points(monkeypatch):
    from diffsampler.bench import accuracy
    problem = accuracy.problems(quick=True, n=16)[0]
    x = accuracy.calibration_points(problem, 16)
    assert x.shape == problem.x_T.shape and not torch.equal(x, problem.x_T)
    monkeypatch.setattr(accuracy, "CALIBRATION_SEED", accuracy.BENCH_SEED)
    with pytest.raises(RuntimeError, match="calibration seed must differ"):
        accuracy.calibration_points(problem, 16)


def test_the_goal_statement_reads_the_ratios_against_each_budget_s_goal():
    """Below 1x at NFE 3 and 4 (strictly), at most 0.5x at NFE 5 and 10, only under SD's VP schedule and EDM."""
    from diffsampler.bench.report import _goal_section, goal_cases

    def row(process, nfe, calibrated_ratio):
        return {"testbed": "ring8", "process": process, "nfe": nfe, "ours_rmse": 2.0, "calibrated_rmse": 1.0,
                "calibrated_ratio": calibrated_ratio}

    best = [row("edm", 3, 1.0), row("edm", 4, 0.99), row("vp_scaled_linear", 5, 0.5), row("edm", 10, 0.51),
            row("vp_cosine", 5, 0.1), row("edm", 6, 0.1), {"testbed": "ring8", "process": "edm", "nfe": 5}]
    assert [(c["nfe"], c["met"]) for c in goal_cases(best)] == [(3, False), (4, True), (5, True), (10, False),
                                                                (5, None)]
    text = "\n".join(_goal_section(best))
    assert "Met in 2 of 4 cases measured" in text
    assert "ring8 / edm NFE 10: 0.51x against 0.5x (1.02 times the goal)" in text
    assert "1 case(s) of the goal have no calibrated row or no peer" in text


def test_budget_steps_spend_the_budget_and_no_more():
    """Steps within an NFE budget on a grid into t = 0, for every solver: the counted NFE never exceeds it."""
    import torch

    import diffsampler as ds
    from diffsampler.bench.accuracy import budget_steps

    p = ds.VP.scaled_linear()
    gmm = ds.testbeds.ring8()
    x = p.prior((2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in ds.solvers.names():
        cls = ds.solvers.REGISTRY[name]
        if cls.adaptive:
            continue
        for budget in (5, 10):
            model = gmm.denoiser(p, "eps")
            ds.sample(model, x, ds.grids.karras(p, budget_steps(cls, budget)), name,
                      generator=torch.Generator().manual_seed(1))
            steps = budget_steps(cls, budget)
            assert model.nfe == cls.run_nfe(steps, into_zero=True) <= budget < cls.run_nfe(steps + 1, True), \
                (name, budget, model.nfe)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_the_plain_loops_of_the_overhead_table_are_our_solvers(solver):
    """The floor the overhead table shows is the same computation: a hand-written loop gives our sample."""
    import diffusers

    from diffsampler.bench import overhead, peers

    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    process = peers.vp_process_of(sched)
    sigma = torch.sqrt(1 - sched.alphas_cumprod.to(torch.float64))
    eps_net = lambda x, timestep: x * sigma[int(timestep[0].round())]  # noqa: E731
    grid = ds.grids.get("uniform", process, 20)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = overhead._plain_loop(solver, eps_net, process, grid, x)()
    ours = ds.sample(ds.Denoiser(eps_net, process, "eps"), x, grid, solver)
    torch.testing.assert_close(plain, ours, rtol=1e-10, atol=1e-10)
