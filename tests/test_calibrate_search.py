"""ds.calibrate.search, the analytical first step and `diffsampler calibrate`: budgets, exactness, generalisation."""

import argparse
import json
import math

import pytest
import torch

import diffsampler as ds
from diffsampler.calibrate import cli as calibrate_cli
from diffsampler.calibrate.first_step import AnalyticalFirstStep, GaussianStats
from diffsampler.calibrate.search import (Calibration, Plan, SearchSpace, endpoint_error, load_plan, search,
                                         shipped_plans)

torch.set_num_threads(1)

# a small space: enough to exercise every stage (hand-made grids, a calibrated method, the first step)
SMALL = SearchSpace(solvers=("ddim", "dpmpp_2m", "heun", ("unipc", {"solver_order": 3})), grids=("logsnr", "karras"),
                    methods=(ds.calibrate.GITS(teacher_steps=10, substeps=2),), calibrated_for=1,
                    first_step=(4.0, 2.0), reference_steps=24, substeps=2)


@pytest.fixture(scope="module")
def mixture():
    mix = ds.testbeds.random_mixture(2, components=4, seed=3)
    proc = ds.VP.linear()
    return mix, proc, mix.denoiser(proc)


def _points(mix, proc, n, seed):
    return mix.sample_marginal(proc, proc.t_max, n, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def calibration(mixture):
    mix, proc, model = mixture
    return Calibration(model, _points(mix, proc, 256, 0), SMALL)


# -- the analytical first step ---------------------------------------------------------------------------
@pytest.mark.parametrize("proc", [ds.VP.linear(), ds.EDM(), ds.Flow()], ids=["vp", "edm", "flow"])
def test_first_step_is_exact_for_gaussian_data(proc):
    gauss = ds.testbeds.Gaussian([0.4, -0.3, 1.0], [[0.5, 0.1, 0.0], [0.1, 0.3, 0.05], [0.0, 0.05, 0.2]])
    model = gauss.denoiser(proc)
    x = gauss.sample_marginal(proc, proc.t_max, 32, torch.Generator().manual_seed(1))
    stats = GaussianStats.of_testbed(gauss)
    t_skip = float(proc.t_of_lambda(torch.tensor(0.5, dtype=torch.float64)))
    # the jump alone against the numerical ODE (scipy DOP853), an independent computation
    jumped = stats.flow(x, float(proc.alpha(proc.t_max)), float(proc.sigma(proc.t_max)), float(proc.alpha(t_skip)),
                        float(proc.sigma(t_skip)))
    truth = gauss.ode_reference(proc, x, proc.t_max, t_skip)
    assert (jumped - truth).abs().max() < 1e-7
    # jump + solver equals the solver started from the exact state at t_skip: the error is the segment's
    rest = ds.grids.logsnr(proc, 4, t_max=t_skip) if not isinstance(proc, ds.Flow) else ds.grids.uniform(proc, 4,
                                                                                                         t_max=t_skip)
    grid = torch.cat([torch.tensor([proc.t_max], dtype=torch.float64), rest])
    model.nfe = 0
    out = ds.sample(model, x, grid, AnalyticalFirstStep(ds.solvers.get("dpmpp_2m"), stats))
    assert model.nfe == 4
    segment = ds.sample(model, truth, rest, "dpmpp_2m")
    assert (out - segment).abs().max() < 1e-6


def test_gaussian_estimate_recovers_the_moments():
    gauss = ds.testbeds.Gaussian([1.0, -2.0, 0.5, 0.0], torch.diag(torch.tensor([2.0, 0.5, 0.3, 0.1])))
    x0, _ = gauss.sample(200000, torch.Generator().manual_seed(0))
    full = GaussianStats.from_samples(x0)
    cov = full.basis @ torch.diag(full.variances) @ full.basis.T
    assert torch.allclose(full.mean, gauss.means[0], atol=0.02) and torch.allclose(cov, gauss.covs[0], atol=0.03)
    # rank 1 + isotropic residual: the residual is the mean of the other variances (probabilistic PCA)
    low = GaussianStats.from_samples(x0, rank=1)
    assert low.variances[0] == pytest.approx(2.0, rel=0.02) and low.residual == pytest.approx(0.3, rel=0.03)


def test_first_step_saves_evaluations_on_a_mixture(mixture, calibration):
    """At one budget, the best configuration with the jump against the best without it, judged the same way."""
    found = calibration.candidates(5)
    with_jump = min(c.error for c in found if c.first_step is not None)
    without = min(c.error for c in found if c.first_step is None)
    print(f"NFE 5: best with the analytical first step {with_jump:.4f}, without {without:.4f}")
    assert with_jump <= without
    assert all(c.nfe <= 5 for c in found)


# -- the search ------------------------------------------------------------------------------------------
def test_plan_never_exceeds_the_budget(mixture, calibration):
    mix, proc, model = mixture
    x = _points(mix, proc, 16, 5)
    for nfe in range(3, 11):
        plan = calibration.plan(nfe)
        assert plan.grid.dtype == torch.float64 and plan.nfe <= nfe
        model.nfe = 0
        ds.sample(model, x, plan.grid, plan.solver)
        assert model.nfe <= nfe, (nfe, plan.info["configuration"])


def test_plan_is_the_best_it_judged_and_generalises(mixture, calibration):
    mix, proc, model = mixture
    found = calibration.candidates(5)
    plan = calibration.plan(5)
    judged = endpoint_error(ds.sample(model, calibration.x_judge, plan.grid, plan.solver), calibration.reference_judge)
    assert judged == pytest.approx(plan.info["judged_error"], rel=1e-9)
    assert all(judged <= c.error for c in found)
    x_new = _points(mix, proc, 256, 1)
    held_out = endpoint_error(ds.sample(model, x_new, plan.grid, plan.solver), mix.ode_reference(proc, x_new,
                                                                                                  proc.t_max, 0.0))
    print(f"plan {plan.info['configuration']}: judged {judged:.4f}, held out {held_out:.4f}")
    assert held_out <= 1.5 * judged


def test_search_entry_point_and_round_trip(mixture, tmp_path):
    mix, proc, model = mixture
    x = _points(mix, proc, 64, 0)
    plan = search(model, x, 4, space=SMALL)
    assert isinstance(plan, Plan) and isinstance(plan.solver, ds.solvers.Solver)
    x_new = _points(mix, proc, 8, 2)
    before = ds.sample(model, x_new, plan.grid, plan.solver)
    for loaded in (Plan.from_dict(json.loads(json.dumps(plan.to_dict()))), load_plan(plan.save(tmp_path / "p.json"))):
        assert torch.equal(loaded.grid, plan.grid) and type(loaded.solver) is type(plan.solver)
        assert torch.equal(ds.sample(model, x_new, loaded.grid, loaded.solver), before)


def test_plan_with_first_step_round_trips_through_its_statistics_file(mixture, tmp_path):
    mix, proc, model = mixture
    stats = GaussianStats.of_testbed(mix)
    grid = torch.cat([torch.tensor([proc.t_max], dtype=torch.float64), ds.grids.logsnr(proc, 3, t_max=0.6)])
    plan = Plan(AnalyticalFirstStep(ds.solvers.get("unipc", solver_order=2), stats), grid, 3)
    path = plan.save(tmp_path / "jump.json")
    data = json.loads(path.read_text())
    assert data["first_step"]["stats"]["file"].startswith("gaussian-")
    x = _points(mix, proc, 8, 4)
    assert torch.equal(ds.sample(model, x, grid, load_plan(path).solver), ds.sample(model, x, grid, plan.solver))
    (tmp_path / data["first_step"]["stats"]["file"]).unlink()
    with pytest.raises(FileNotFoundError, match="no statistics file"):
        load_plan(path)


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(mixture, calibration):
    mix, proc, model = mixture
    x = _points(mix, proc, 16, 0)
    with pytest.raises(ValueError, match=r"nfe must be a positive integer, got 0"):
        calibration.plan(0)
    plms_only = SearchSpace(solvers=("plms",), grids=("logsnr",), methods=(), first_step=(), reference_steps=4)
    with pytest.raises(ValueError, match=r"nfe = 1 is below what every searched solver needs; allowed: nfe >= 2"):
        search(model, x, 1, space=plms_only)
    with pytest.raises(ValueError, match=r"'euler_ancestral' is stochastic.*allowed: a deterministic"):
        search(model, x, 5, space=SearchSpace(solvers=("euler_ancestral",)))
    with pytest.raises(ValueError, match=r"base\).*solver .ddpm. is stochastic"):
        AnalyticalFirstStep(ds.solvers.get("ddpm"), GaussianStats.of_testbed(mix))
    with pytest.raises(ValueError, match=r"grids = \('nope',\) is invalid"):
        SearchSpace(grids=("nope",))
    with pytest.raises(ValueError, match=r"at least 4 points"):
        search(model, x[:3], 5, space=SMALL)
    # the analytical step needs the data's statistics: a network carries none, and wrong-sized ones are refused
    with pytest.raises(ValueError, match=r"carries no data statistics"):
        GaussianStats.of_testbed(model)
    wrong = GaussianStats.of_testbed(ds.testbeds.random_mixture(3, seed=0))
    grid = torch.cat([torch.tensor([proc.t_max], dtype=torch.float64), ds.grids.logsnr(proc, 3, t_max=0.6)])
    with pytest.raises(ValueError, match=r"describe samples of 3 values.*shape \(16, 2\)"):
        ds.sample(model, x, grid, AnalyticalFirstStep(ds.solvers.get("ddim"), wrong))
    with pytest.raises(ValueError, match=r"grid has 1 steps, but skip = 1"):
        ds.sample(model, x, [proc.t_max, 0.0], AnalyticalFirstStep(ds.solvers.get("ddim"), wrong))
    with pytest.raises(ValueError, match=r"no shipped plan for model = 'nope'"):
        load_plan(model="nope", nfe=5)


# -- the command ---------------------------------------------------------------------------------------
def test_calibrate_command_writes_a_plan_and_reports_it(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    calibrate_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["calibrate", "--model", "toy2d-ring8", "--nfe", "4", "--out", str(tmp_path),
                              "--seed", "3", "--points", "64"])
    assert calibrate_cli.run(args, space=SMALL) == 0
    printed = capsys.readouterr().out
    assert all(len(line) <= 80 for line in printed.splitlines()), printed
    plan = load_plan(tmp_path / "toy2d-ring8-nfe4.json")
    assert plan.nfe <= 4 and plan.info["calibration"]["seed"] == 3 and plan.info["held_out"]["seed"] == 4
    assert f"error {plan.info['held_out']['error']:.4g} against" in printed
    model = ds.models.load("toy2d-ring8")
    model.nfe = 0
    ds.sample(model, model.process.prior((8, 2), generator=torch.Generator().manual_seed(0)), plan.grid, plan.solver)
    assert model.nfe <= 4


def test_shipped_plans_load_and_keep_their_budget():
    shipped = shipped_plans()
    if not shipped:
        pytest.skip("no calibrated plans are shipped in this checkout")
    for name, nfe in shipped:
        plan = load_plan(model=name, nfe=nfe)
        assert plan.nfe <= nfe and plan.info["calibration"]["seed"] == 0
        assert math.isfinite(plan.info["held_out"]["error"])


def test_review_cases_get_clear_errors():
    # a shipped plan's grid only for the process it was made for
    from diffsampler.calibrate.search import calibrated_grid
    with pytest.raises(ValueError, match="plans of 'digits' are for"):
        calibrated_grid(ds.Flow(), 5, model="digits")
    assert len(calibrated_grid(ds.models.load("digits").process, 5, model="digits")) >= 6
    # the command reports a bad model in one message
    from typer.testing import CliRunner
    from diffsampler.cli import app
    result = CliRunner().invoke(app, ["calibrate", "--model", "nope", "--nfe", "5"])
    assert result.exit_code == 2 and "is not a shipped model" in result.output and "Traceback" not in result.output


def test_the_readmes_calibration_example_runs():
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Calibration: few-step sampling fitted to your model", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict = {}
    exec(compile(block, "README.md (Calibration)", "exec"), namespace)  # noqa: S102
    assert namespace["samples"].shape == (16, 2) and bool(torch.isfinite(namespace["samples"]).all())
    assert namespace["plan"].nfe <= 5 and len(namespace["grid"]) >= 3
