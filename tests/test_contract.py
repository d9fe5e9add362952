"""Contract tests over the whole registry: adding a solver to the registry buys all of these."""

import pytest
import torch

import diffsampler as ds
from conftest import SOLVER_CONFIGS, config_id

GMM = ds.testbeds.random_mixture(2, 3, seed=3)


def _run(cfg, x_T, process, grid, generator_seed=5, **kw):
    name, opts = cfg
    model = GMM.denoiser(process, "eps")
    g = torch.Generator().manual_seed(generator_seed)
    return ds.sample(model, x_T, grid, ds.solvers.get(name, **opts), generator=g, **kw)


def test_every_registered_solver_is_under_test():
    assert {name for name, _ in SOLVER_CONFIGS} == set(ds.solvers.names())


@pytest.mark.parametrize("cfg", SOLVER_CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dtype_and_shape_are_kept(cfg, dtype):
    p = ds.VP.scaled_linear()
    x_T = p.prior((6, 1, 2), generator=torch.Generator().manual_seed(0), dtype=dtype)
    out = _run(cfg, x_T, p, ds.grids.karras(p, 6))
    assert out.dtype == dtype and out.shape == x_T.shape
    assert bool(torch.isfinite(out.float()).all())


@pytest.mark.parametrize("cfg", SOLVER_CONFIGS, ids=config_id)
def test_identical_output_for_a_fixed_generator(cfg):
    p = ds.EDM()
    x_T = p.prior((5, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = ds.grids.karras(p, 7)
    a, b = _run(cfg, x_T, p, grid), _run(cfg, x_T, p, grid)
    assert torch.equal(a, b)
    if ds.solvers.get(cfg[0], **cfg[1]).stochastic:
        assert not torch.equal(a, _run(cfg, x_T, p, grid, generator_seed=6))


@pytest.mark.parametrize("cfg", SOLVER_CONFIGS, ids=config_id)
def test_a_sample_does_not_depend_on_its_batch(cfg):
    """The first 3 samples of a batch of 9 equal a batch of those 3 alone (same generator seed)."""
    p = ds.Flow()
    model = GMM.denoiser(p, "velocity")
    grid = ds.grids.uniform(p, 6)
    solver = ds.solvers.get(cfg[0], **cfg[1])
    outs = []
    for n in (9, 3):
        g = torch.Generator().manual_seed(1)
        x_T = p.prior((n, 2), generator=g, dtype=torch.float64)
        outs.append(ds.sample(model, x_T, grid, solver, generator=g))
    torch.testing.assert_close(outs[0][:3], outs[1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("cfg", SOLVER_CONFIGS, ids=config_id)
def test_no_solver_writes_into_a_sample_once_returned(cfg):
    """The loop keeps the samples since its last NaN check to name a bad step, and answers keep the
    sample they were evaluated at: neither the caller's x nor any sample a step returned may change later."""
    p = ds.VP.scaled_linear()
    x_T = p.prior((5, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = x_T.clone()
    seen = []
    _run(cfg, x_T, p, ds.grids.karras(p, 8), callback=lambda info: seen.append((info["x"], info["x"].clone())))
    assert torch.equal(x_T, start)
    assert len(seen) == 8 and all(torch.equal(x, copy) for x, copy in seen)


MULTISTEP = [("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"solver_order": 3}), ("sa_solver", {"eta": 0.0}),
             ("sa_solver_pece", {"eta": 0.0}), ("dpm_solver", {"solver_order": 3}),
             ("dpmpp_2m_sde", {"eta": 0.0}), ("plms", {}), ("pndm", {})]


@pytest.mark.parametrize("cfg", MULTISTEP, ids=config_id)
def test_the_multistep_engine_reads_estimates_however_it_likes(cfg):
    """Folding an estimate into the network output (at its last read) or forming it once is a cost
    choice of the engine: forming every estimate, or folding every one, gives the same run."""
    from diffsampler.loop import _initial_state

    p = ds.VP.scaled_linear()
    model = GMM.denoiser(p, "eps")
    solver = ds.solvers.get(cfg[0], **cfg[1])
    x_T = p.prior((5, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = ds.grids.karras(p, 12)
    knots, state = _initial_state(solver, p, tuple(grid.tolist()), tuple(x_T.shape), x_T.dtype, x_T.device)
    inner = getattr(state, "multistep", state)

    def run(flag):
        flags = {f: tuple(tuple(flag for _ in row) for row in getattr(inner, f)) for f in ("last_P", "last_K")}
        s = state._replace(multistep=inner._replace(**flags)) if inner is not state else state._replace(**flags)
        x = x_T
        for i in range(len(knots)):
            x, s = solver.step(model, x, i, s, None)
        return x

    default = ds.sample(model, x_T, grid, solver)
    for flag in (False, True):
        torch.testing.assert_close(run(flag), default, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", SOLVER_CONFIGS, ids=config_id)
def test_solver_objects_hold_no_state_between_runs(cfg):
    """One solver object used for two different problems in turn gives what fresh objects give."""
    p = ds.VP.linear()
    solver = ds.solvers.get(cfg[0], **cfg[1])
    x1 = p.prior((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x2 = p.prior((7, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g1, g2 = ds.grids.logsnr(p, 5), ds.grids.karras(p, 9)
    model = GMM.denoiser(p, "eps")
    run = lambda s, x, g: ds.sample(model, x, g, s, generator=torch.Generator().manual_seed(3))
    first, second = run(solver, x1, g1), run(solver, x2, g2)
    torch.testing.assert_close(first, run(ds.solvers.get(cfg[0], **cfg[1]), x1, g1), rtol=0, atol=0)
    torch.testing.assert_close(second, run(ds.solvers.get(cfg[0], **cfg[1]), x2, g2), rtol=0, atol=0)


@pytest.mark.parametrize("cfg", SOLVER_CONFIGS, ids=config_id)
def test_nfe_is_counted_and_matches_the_declared_cost(cfg):
    p = ds.EDM()
    model = GMM.denoiser(p, "x0")
    x_T = p.prior((3, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = 6
    ds.sample(model, x_T, ds.grids.karras(p, steps, end="min"), ds.solvers.get(cfg[0], **cfg[1]),
              generator=torch.Generator().manual_seed(0))
    cls = ds.solvers.REGISTRY[cfg[0]]
    if cls.adaptive:  # whole attempts of nfe_per_step evaluations
        assert model.nfe > 0 and model.nfe % cls.nfe_per_step == 0
    else:
        assert model.nfe == cls.run_nfe(steps)


@pytest.mark.parametrize("cfg", SOLVER_CONFIGS, ids=config_id)
def test_conditioning_reaches_the_network(cfg):
    """Conditioning keywords pass through sample() to every evaluation: a class-conditional run
    lands in the class's component."""
    p = ds.VP.scaled_linear()
    gmm = ds.testbeds.ring8(radius=3.0, std=0.1)
    x_T = p.prior((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = ds.sample(gmm.denoiser(p, "eps"), x_T, ds.grids.karras(p, 25), ds.solvers.get(cfg[0], **cfg[1]),
                  generator=torch.Generator().manual_seed(0), label=3)
    assert (x - gmm.means[3]).norm(dim=1).max().item() < 1.0


def test_callback_sees_every_step_in_order():
    p = ds.EDM()
    seen = []
    x_T = p.prior((2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = ds.grids.karras(p, 5)
    ds.sample(GMM.denoiser(p, "eps"), x_T, grid, "dpmpp_2m", callback=lambda info: seen.append(info))
    assert [s["i"] for s in seen] == list(range(5))
    assert [s["t"] for s in seen] == grid[:-1].tolist() and [s["t_next"] for s in seen] == grid[1:].tolist()


def test_progress_bar_changes_nothing_but_the_display():
    p = ds.EDM()
    x_T = p.prior((2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda **kw: ds.sample(GMM.denoiser(p, "eps"), x_T, ds.grids.karras(p, 3), "euler", **kw)  # noqa: E731
    assert torch.equal(run(progress=True), run())


def test_a_new_method_is_a_weight_rule_over_the_engine():
    """A user's solver: one plan() over the shared engine, no loop of its own, hashable or not."""
    from diffsampler.solvers.expint import data_step
    from diffsampler.solvers.multistep import LinearMultistep, StepPlan

    class MyFirstOrder(LinearMultistep):
        name, order, nfe_per_step, paper = "mine", 1, 1, "-"
        __hash__ = None  # unhashable on purpose: the loop's cache must cope

        def plan(self, knots):
            for i in range(len(knots)):
                A, B, _ = data_step(knots, i)
                yield StepPlan(knots.t[i], A, (B,))

    p = ds.VP.cosine()
    x_T = p.prior((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = ds.grids.logsnr(p, 9)
    model = GMM.denoiser(p, "eps")
    torch.testing.assert_close(ds.sample(model, x_T, grid, MyFirstOrder()), ds.sample(model, x_T, grid, "ddim"))

    class TooMuchHistory(MyFirstOrder):
        def plan(self, knots):
            for i in range(len(knots)):
                yield StepPlan(knots.t[i], 1.0, (0.5, 0.5))  # step 0 has no past estimate

    with pytest.raises(ValueError, match="mine: step 0 weighs more past estimates than exist there"):
        ds.sample(model, x_T, grid, TooMuchHistory())


@pytest.mark.parametrize("solver, kernels", [("ddim", lambda n: 2 * n), ("euler", lambda n: 2 * n),
                                             ("dpmpp_2m", lambda n: 4 * n - 4)])
def test_a_step_is_the_few_kernels_the_benchmark_report_claims(solver, kernels):
    """Sample-sized kernels besides the network's own, counted at the dispatcher: DDIM and Euler move x by
    2 (the eps -> x0 conversion folded into the step), DPM-Solver++(2M) by 4 once it has history (2 on its
    first step and on the first-order step into t = 0); the NaN look every few steps reads, it writes no sample."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SampleSized(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.count = numel, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.count += isinstance(out, torch.Tensor) and out.numel() == self.numel
            return out

    p = ds.VP.scaled_linear()
    x = p.prior((64, 3), generator=torch.Generator().manual_seed(0))
    model = ds.Denoiser(lambda x, t: x * 0.5, p, "eps")  # one sample-sized kernel an evaluation
    grid = ds.grids.get("uniform", p, 20)
    ds.sample(model, x, grid, solver)  # the per-grid work is cached from here on
    model.nfe = 0
    with SampleSized(x.numel()) as counted:
        ds.sample(model, x, grid, solver)
    assert counted.count - model.nfe == kernels(20)
