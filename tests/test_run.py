"""The step-by-step run: ``sample()`` is a loop over it, and reindexing particles is exact for every solver."""

import pytest
import torch

import diffsampler as ds
from conftest import SOLVER_CONFIGS, config_id
from diffsampler.noise import copy_numbers

GMM = ds.testbeds.random_mixture(2, 3, seed=3)
STEPS, AT = 8, 4  # reindex after step AT - 1 of STEPS


def _setup(cfg, batch=4):
    p = ds.VP.scaled_linear()
    model = GMM.denoiser(p, "eps")
    x_T = p.prior((batch, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, x_T, ds.grids.karras(p, STEPS), ds.solvers.get(cfg[0], **cfg[1])


def _run(cfg, reindex=None, batch=4, seed=5, evaluate=False):
    model, x_T, grid, solver = _setup(cfg, batch)
    run = ds.Run(model, x_T, grid, solver, generator=torch.Generator().manual_seed(seed))
    if evaluate:
        run.watch()
    while not run.done:
        if run.i == AT and reindex is not None:
            run.take(reindex)
        if evaluate:
            run.evaluate()
        run.step()
    return run


@pytest.mark.parametrize("cfg", SOLVER_CONFIGS, ids=config_id)
def test_sample_is_a_loop_over_the_run(cfg):
    model, x_T, grid, solver = _setup(cfg)
    plain = ds.sample(model, x_T, grid, solver, generator=torch.Generator().manual_seed(5))
    assert torch.equal(_run(cfg).x, plain)
    # a driver that reads the data estimate between steps changes nothing and, without churn, spends nothing
    watched = _run(cfg, evaluate=True)
    assert torch.equal(watched.x, plain)


@pytest.mark.parametrize("cfg", SOLVER_CONFIGS, ids=config_id)
def test_the_identity_reindexing_changes_nothing_bitwise(cfg):
    assert torch.equal(_run(cfg, reindex=torch.arange(4)).x, _run(cfg).x)


@pytest.mark.parametrize("cfg", SOLVER_CONFIGS, ids=config_id)
def test_a_permutation_moves_every_particle_with_its_state(cfg):
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(_run(cfg, reindex=perm).x, _run(cfg).x[perm], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", SOLVER_CONFIGS, ids=config_id)
def test_copies_of_one_particle_follow_it_then_part_ways(cfg):
    """Every particle sent to particle k: up to the reindexing all are particle k; the first copy then
    continues as particle k's own run, and under a stochastic solver the copies differ from each other."""
    k = 2
    model, x_T, grid, solver = _setup(cfg)
    run = ds.Run(model, x_T, grid, solver, generator=torch.Generator().manual_seed(5))
    for _ in range(AT):
        run.step()
    before = run.x[k].clone()
    run.take(torch.full((4,), k))
    assert torch.equal(run.x, before.expand(4, -1))
    while not run.done:
        run.step()
    own = _run(cfg).x[k]
    torch.testing.assert_close(run.x[0], own, rtol=1e-12, atol=1e-12)
    if solver.stochastic:
        distinct = {tuple(row.tolist()) for row in run.x}
        assert len(distinct) == 4, "copies of a particle must draw their own noise"
    else:
        torch.testing.assert_close(run.x, own.expand(4, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", [c for c in SOLVER_CONFIGS if ds.solvers.get(c[0], **c[1]).stochastic][:6],
                         ids=config_id)
def test_a_run_can_grow_and_shrink_its_population(cfg):
    """Taking more indices than particles (SVDD's candidates) and back: the batch changes size."""
    model, x_T, grid, solver = _setup(cfg, batch=2)
    run = ds.Run(model, x_T, grid, solver, generator=torch.Generator().manual_seed(5))
    run.step()
    run.take(torch.tensor([0, 0, 0, 1, 1, 1]))
    run.step()
    assert run.x.shape == (6, 2)
    run.take(torch.tensor([1, 4]))
    while not run.done:
        run.step()
    assert run.x.shape == (2, 2) and bool(torch.isfinite(run.x).all())


def test_evaluate_is_reused_by_the_next_step():
    model, x_T, grid, solver = _setup(("ddpm", {}))
    run = ds.Run(model, x_T, grid, solver, generator=torch.Generator().manual_seed(5)).watch()
    pred = run.evaluate()
    run.step()
    assert model.nfe == 1 and run.sample_evaluations == 4
    torch.testing.assert_close(run.prediction.x0, pred.x0, rtol=0, atol=0)
    run.evaluate()
    run.x = run.x.clone()  # a replaced sample drops the kept answer: the step evaluates afresh
    run.step()
    assert model.nfe == 3 and run.sample_evaluations == 12


def test_copy_numbers_count_earlier_copies():
    assert copy_numbers(torch.tensor([3, 1, 3, 3, 0, 1])).tolist() == [0, 0, 1, 2, 0, 1]


def test_bad_indices_are_refused():
    model, x_T, grid, solver = _setup(("ddpm", {}))
    run = ds.Run(model, x_T, grid, solver, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        run.take(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="1-D integer"):
        run.take(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="keep the batch's shape"):
        run.x = torch.zeros(3, 2, dtype=torch.float64)
    for _ in range(STEPS):
        run.step()
    with pytest.raises(RuntimeError, match="all 8 steps"):
        run.step()


def test_the_callback_sees_the_data_estimate_and_may_replace_the_sample():
    model, x_T, grid, _ = _setup(("ddim", {}))
    seen = []

    def callback(info):
        seen.append(info["denoised"])
        if info["i"] == 3:
            return torch.zeros_like(info["x"])
        return None

    xs = []
    out = ds.sample(model, x_T, grid, "ddim", callback=lambda info: (xs.append(info["x"]), callback(info))[1])
    torch.testing.assert_close(seen[0], model(x_T, float(grid[0])).x0, rtol=0, atol=0)
    for i in (1, 2):  # each step's own estimate, at the sample the previous step returned
        torch.testing.assert_close(seen[i], model(xs[i - 1], float(grid[i])).x0, rtol=0, atol=0)
    torch.testing.assert_close(out, ds.sample(model, torch.zeros_like(x_T), grid[4:], "ddim"), rtol=1e-13, atol=1e-13)


def test_solver_options_given_to_sample_are_refused_not_sent_to_the_network():
    model, x_T, grid, _ = _setup(("ddim", {}))
    with pytest.raises(ValueError, match=r"eta is an option of solver 'ddim'.*ds.solvers.get\('ddim', eta=1.0\)"):
        ds.sample(model, x_T, grid, "ddim", eta=1.0)


def test_sample_keeps_no_graph_unless_asked():
    """A network with trainable parameters: no graph by default (memory would grow with the steps);
    grad=True differentiates through the run (checked against a central difference)."""
    p = ds.VP.scaled_linear()
    net = torch.nn.Linear(2, 2).double()
    model = ds.Denoiser(lambda x, t: net(x), p, "eps")
    grid = ds.grids.karras(p, 5, end="min")
    x_T = p.prior((3, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert not ds.sample(model, x_T, grid, "ddim").requires_grad
    x = x_T.clone().requires_grad_()
    (g,) = torch.autograd.grad(ds.sample(model, x, grid, "ddim", grad=True).sum(), x)
    e = torch.zeros_like(x_T)
    e[1, 0] = 1e-6
    with torch.no_grad():
        fd = (ds.sample(model, x_T + e, grid, "ddim").sum() - ds.sample(model, x_T - e, grid, "ddim").sum()) / 2e-6
    torch.testing.assert_close(g[1, 0], fd, rtol=1e-6, atol=1e-8)
    with pytest.raises(TypeError, match="grad must be True or False"):
        ds.sample(model, x_T, grid, "ddim", grad=1)
