"""The flow SDE, the change of interpolant and rollover budget forcing (``diffsampler.steering.rbf``).

The SDE's marginals are checked against the closed form of a Gaussian mixture's noisy marginal:
first and second moments, and the expected posterior over components (under the true marginal its
mean is the mixture weights), each as a z-score from the sample size. The mixture has isotropic
components so its exact flow velocity is a few elementwise operations (checked against the testbed's
exact denoiser), which keeps the large runs cheap.
"""

import math

import pytest
import torch
from scipy.integrate import solve_ivp

import diffsampler as ds
from conftest import stat_size
from diffsampler.steering.rbf import FlowSDE, Reinterpolated, diffusion_coefficient, rbf, vp_interpolant

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]], dtype=torch.float64)
VARS = torch.tensor([0.3, 0.2, 0.15], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MIXTURE = ds.testbeds.GaussianMixture(MEANS, VARS, WEIGHTS)
FLOW = ds.Flow()
Z_MAX = 5.0


def _log_lik(x, a, s):
    """Per-component log-likelihoods (B, K) of x_t = x at alpha = a, sigma = s, and x - a mu_k, C_k."""
    c = a * a * VARS + s * s
    diff = x[:, None, :] - a * MEANS[None]
    return -0.5 * (diff ** 2).sum(-1) / c - 0.5 * MEANS.shape[1] * torch.log(c) + torch.log(WEIGHTS), diff, c


def _velocity(x, time):
    """The mixture's exact flow velocity eps_hat - x0_hat at t = time (one time for the batch)."""
    assert bool((time == time[0]).all()), "one time for the batch"
    t = float(time[0])
    a, s = 1.0 - t, t
    ll, diff, c = _log_lik(x, a, s)
    post = MEANS[None] + (a * VARS / c)[None, :, None] * diff
    x0 = (torch.softmax(ll, 1)[..., None] * post).sum(1)
    return (x - a * x0) / s - x0


def flow_model(counter=None):
    fn = _velocity
    if counter is not None:
        def fn(x, time):
            counter.append(x.clone())
            return _velocity(x, time)
    return ds.Denoiser(fn, FLOW, "velocity", time_input=lambda t: t)


def test_the_fast_velocity_is_the_testbeds_exact_one():
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    reference = MIXTURE.denoiser(FLOW, "velocity")
    for t in (1.0, 0.6, 0.05):
        torch.testing.assert_close(flow_model()(x, t).x0, reference(x, t).x0, rtol=1e-12, atol=1e-12)


def _z(x, process, t):
    a, s = float(process.alpha(t)), float(process.sigma(t))
    stats = torch.cat([x, x ** 2, (x[:, 0] * x[:, 1])[:, None], torch.softmax(_log_lik(x, a, s)[0], 1)], 1)
    mean = a * (WEIGHTS @ MEANS)
    second = a * a * (WEIGHTS[:, None] * (VARS[:, None] + MEANS ** 2)).sum(0) + s * s
    cross = a * a * (WEIGHTS * MEANS[:, 0] * MEANS[:, 1]).sum()
    exact = torch.cat([mean, second, cross[None], WEIGHTS])
    return (stats.mean(0) - exact) / (stats.std(0) / len(x) ** 0.5)


SDE_STEPS = 100
DIFFUSIONS = [("constant", 2.0), ("sigma", 3.0), ("square", 3.0), (lambda t: math.sin(math.pi * t / 2), 2.0)]


@pytest.mark.statistical
@pytest.mark.parametrize("diffusion, norm", DIFFUSIONS, ids=["constant", "sigma", "square", "callable"])
def test_the_flow_sde_has_the_flows_marginals_for_every_diffusion(diffusion, norm):
    """From the exact prior at t = 1 (alpha = 0: p_1 is N(0, I)) to t = 0.25, where the marginal is known."""
    n = stat_size(8000, 100000)
    g = torch.Generator().manual_seed(11)
    x = FLOW.prior((n, 2), generator=g, dtype=torch.float64)
    grid = torch.linspace(1.0, 0.25, SDE_STEPS + 1, dtype=torch.float64)
    out = ds.sample(flow_model(), x, grid, FlowSDE(diffusion=diffusion, norm=norm), generator=g)
    z = _z(out, FLOW, 0.25)
    assert bool((z.abs() < Z_MAX).all()), f"z-scores {z.tolist()}"


@pytest.mark.statistical
@pytest.mark.parametrize("diffusion, norm", [("square", 3.0), ("sigma", 2.0)])
def test_the_sde_of_the_vp_converted_flow_has_the_vp_marginals(diffusion, norm):
    """The authors' VP-SDE: the flow converted to VP (linear beta), then the SDE on the VP process, from
    exact samples of the VP marginal at r = 0.9 to r = 0.3."""
    n = stat_size(8000, 100000)
    g = torch.Generator().manual_seed(12)
    model = vp_interpolant(flow_model())
    vp = model.process
    x = MIXTURE.sample_marginal(vp, 0.9, n, generator=g)
    grid = torch.linspace(0.9, 0.3, SDE_STEPS + 1, dtype=torch.float64)
    out = ds.sample(model, x, grid, FlowSDE(diffusion=diffusion, norm=norm), generator=g)
    z = _z(out, vp, 0.3)
    assert bool((z.abs() < Z_MAX).all()), f"z-scores {z.tolist()}"


def test_without_diffusion_the_sde_is_the_flows_euler_ode():
    g = torch.Generator().manual_seed(0)
    x = FLOW.prior((16, 2), generator=g, dtype=torch.float64)
    grid = ds.grids.uniform(FLOW, 12)
    solver = FlowSDE(norm=0.0)
    assert not solver.stochastic
    euler = ds.sample(flow_model(), x, grid, "euler")
    torch.testing.assert_close(ds.sample(flow_model(), x, grid, solver), euler, rtol=1e-12, atol=1e-12)
    # a diffusion that vanishes everywhere is the same ODE, and so is the VP-converted model's on the VP grid
    zero = FlowSDE(diffusion=lambda t: 0.0)
    torch.testing.assert_close(ds.sample(flow_model(), x, grid, zero, generator=g), euler, rtol=1e-12, atol=1e-12)


def test_the_sde_is_a_solver_like_any_other():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    x = FLOW.prior((6, 2), generator=g(0), dtype=torch.float64)
    grid = ds.grids.uniform(FLOW, 7)
    solver = FlowSDE()
    assert solver.stochastic and solver.name == "flow_sde" and solver.options() == ["diffusion", "norm"]
    model = flow_model()
    a = ds.sample(model, x, grid, solver, generator=g(1))
    assert model.nfe == solver.run_nfe(7)
    assert torch.equal(a, ds.sample(model, x, grid, solver, generator=g(1)))
    assert not torch.equal(a, ds.sample(model, x, grid, solver, generator=g(2)))
    # a sample does not depend on its batch
    torch.testing.assert_close(ds.sample(model, x[:2], grid, solver, generator=g(1)), a[:2], rtol=1e-13, atol=1e-13)
    # step by step, reading the data estimate between steps costs nothing and changes nothing
    run = ds.Run(model, x, grid, solver, generator=g(1)).watch()
    while not run.done:
        run.evaluate()
        run.step()
    assert torch.equal(run.x, a) and run.sample_evaluations == 7 * 6
    # float32 keeps its dtype and stays finite from t = 1
    out = ds.sample(model, x.float(), grid, solver, generator=g(1))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_the_diffusion_shapes_are_the_authors():
    """g(t) = norm * (1, sigma(t), t^2, shape(t)) in process time, and the step's noise is g(t_i) sqrt(h)."""
    vp = ds.VP.linear()
    for process, t in ((FLOW, 0.7), (vp, 0.7), (vp, 0.2)):
        sigma = float(process.sigma(t))
        for diffusion, g in (("constant", 2.0), ("sigma", 2.0 * sigma), ("square", 2.0 * t * t),
                             (lambda u: u ** 3, 2.0 * t ** 3)):
            assert diffusion_coefficient(diffusion, 2.0, process, t) == pytest.approx(g, rel=1e-14)
            knots = ds.solvers.Knots.from_grid(process, torch.tensor([t, t / 2], dtype=torch.float64))
            plan = FlowSDE(diffusion=diffusion, norm=2.0).init(knots, torch.zeros(1, 2)).plans[0]
            assert plan.C == pytest.approx(g * math.sqrt(t / 2), rel=1e-14)
    assert FlowSDE() == FlowSDE(diffusion="square", norm=3.0)  # the authors' default


def test_bad_sde_options_get_a_clear_error():
    with pytest.raises(ValueError, match=r"flow_sde: diffusion = 'cubic' is invalid; allowed: one of constant, "
                                         r"sigma, square, or a callable"):
        FlowSDE(diffusion="cubic")
    with pytest.raises(ValueError, match="flow_sde: norm = -1.0 is invalid; allowed: a finite number >= 0"):
        FlowSDE(norm=-1.0)
    with pytest.raises(ValueError, match="norm = inf is invalid"):
        FlowSDE(norm=math.inf)
    x = FLOW.prior((2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"the diffusion callable returned -1.0 at t = 1; it must return a finite"):
        ds.sample(flow_model(), x, ds.grids.uniform(FLOW, 3), FlowSDE(diffusion=lambda t: -1.0))


# -- the change of interpolant -------------------------------------------------------------------------

def test_the_vp_converted_flow_is_the_exact_vp_denoiser():
    """The converted flow model answers as the mixture's exact denoiser on the VP process does, at one
    time for the batch and at one time per sample."""
    model = vp_interpolant(flow_model())
    vp = model.process
    assert isinstance(model, Reinterpolated) and isinstance(vp, ds.VPLinear) and vp.beta_max == 20.0
    exact = MIXTURE.denoiser(vp, "eps")
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    for r in (1.0, 0.7, 0.2, 0.01, vp.t_min):
        got, want = model(x, r), exact(x, r)
        torch.testing.assert_close(got.x0, want.x0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got.eps, want.eps, rtol=1e-10, atol=1e-10)
    assert model.nfe == 5  # one evaluation of the flow per call
    per_sample = vp_interpolant(MIXTURE.denoiser(FLOW, "velocity"))
    r = torch.linspace(vp.t_min, 1.0, 32, dtype=torch.float64)
    torch.testing.assert_close(per_sample(x, r).x0, exact(x, r).x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(per_sample(x, r).eps, exact(x, r).eps, rtol=1e-10, atol=1e-10)


def test_the_converted_velocity_is_lipmans_scale_time_transform():
    """u_r(x) = (s_r'/s_r) x + t_r' s_r u_t(x / s_r), s_r = sigma_r / sigma_t, t_r = SNR^{-1}(alpha_r / sigma_r),
    with t_r' and s_r' as the authors write them (METHODS 3.5)."""
    flow = flow_model()
    model = vp_interpolant(flow)
    vp = model.process
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for r in (0.95, 0.5, 0.1):
        a_r, s_r, da_r, ds_r = (float(f(r)) for f in (vp.alpha, vp.sigma, vp.d_alpha, vp.d_sigma))
        t = float(FLOW.t_of_lambda(math.log(a_r / s_r)))
        a_t, s_t, da_t, ds_t = 1.0 - t, t, -1.0, 1.0
        dt = s_t ** 2 * (s_r * da_r - a_r * ds_r) / (s_r ** 2 * (s_t * da_t - a_t * ds_t))
        scale = s_r / s_t
        dscale = (s_t * ds_r - s_r * ds_t * dt) / s_t ** 2
        lipman = (dscale / scale) * x + dt * scale * flow(x / scale, t).velocity(FLOW, t)
        torch.testing.assert_close(model(x, r).velocity(vp, r), lipman, rtol=1e-9, atol=1e-9)


def test_the_converted_odes_endpoint_is_the_flows():
    """The VP-path ODE of the converted model, solved from r = 1 to r = t_min (DOP853 at 1e-11), lands where
    the flow's ODE from the same point (at equal SNR) lands, rescaled to the VP path."""
    model = vp_interpolant(flow_model())
    vp = model.process
    x_r = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r0, r1 = 1.0, vp.t_min

    def rhs(r, y):
        xs = torch.from_numpy(y).reshape(x_r.shape)
        return model(xs, float(r)).velocity(vp, float(r)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (r0, r1), x_r.reshape(-1).numpy(), method="DOP853", rtol=1e-11, atol=1e-11)
    assert sol.success
    converted = torch.from_numpy(sol.y[:, -1].copy()).reshape(x_r.shape)
    (t0, c0), (t1, c1) = model.times(r0), model.times(r1)
    flow_end = MIXTURE.ode_reference(FLOW, x_r * c0, t0, t1)
    torch.testing.assert_close(converted, flow_end / c1, rtol=1e-6, atol=1e-6)
    # and the library's own solver on VP log-SNR steps agrees with both
    sampled = ds.sample(model, x_r, ds.grids.logsnr(vp, 200, end="min"), "dpmpp_3m")
    torch.testing.assert_close(sampled, converted, rtol=1e-4, atol=1e-4)


def test_bad_conversion_input_gets_a_clear_error():
    with pytest.raises(TypeError, match="Reinterpolated: process must be a diffsampler Process"):
        Reinterpolated(flow_model(), "vp")
    with pytest.raises(TypeError, match="model must be a Denoiser"):
        vp_interpolant(lambda x, t: x)


# -- rollover budget forcing ---------------------------------------------------------------------------

def _start(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FLOW.prior((n, 2), generator=g, dtype=torch.float64), g


class Scripted:
    """A reward that returns the next numbers of a script, one per row, and records what it scored."""

    def __init__(self, values):
        self.values, self.seen = list(values), []

    def __call__(self, x0):
        n = x0.shape[0]
        out, self.values = self.values[:n], self.values[n:]
        assert len(out) == n, "the script ran out"
        self.seen.append(x0.clone())
        return torch.tensor(out, dtype=torch.float64)


def test_the_budget_is_spent_and_rolled_over_exactly():
    """One particle, 2 starting candidates, 4 steps, max_nfe 14: B = (14 - 2) // 4 = 3 trials a step.

    start: rewards 0, 1 -> best 1.       step 0 (budget 3): 0.5, 2.0 -> accepted at trial 2, 1 left over.
    step 1 (budget 4): 0.1 0.2 0.3 0.1 -> none beats 2, the particle moves to the 0.3 trial.
    step 2 (budget 3): 5.0 -> accepted, 2 left over.   step 3, the last (budget 5): all 5 spent, the best kept.
    Evaluations: 2 + 2 + 4 + 1 = 9 (the last step's trials are final samples, scored without one)."""
    calls = []
    script = Scripted([0.0, 1.0, 0.5, 2.0, 0.1, 0.2, 0.3, 0.1, 5.0, 1.0, 4.0, 2.0, 3.0, 0.0])
    x, g = _start(1)
    res = rbf(flow_model(calls), x, ds.grids.uniform(FLOW, 4), None, script, init_particles=2, max_nfe=14,
              generator=g)
    assert not script.values, "every scripted reward was asked for"
    assert [len(c) for c in calls] == [2, 1, 1, 1, 1, 1, 1, 1]
    assert res.nfe == 9 and sum(len(c) for c in calls) == 9
    assert res.rewards.tolist() == [4.0]
    torch.testing.assert_close(res.x, script.seen[-4])  # the second of the last step's 5 trials
    assert torch.equal(res.best, res.x)
    # every trial drew noise of its own: the 4 trials of step 1 landed apart
    step1 = torch.cat(calls[3:7])
    assert torch.cdist(step1, step1).add(torch.eye(4, dtype=torch.float64)).min() > 1e-3
    # the candidates were x itself and one draw from the prior
    assert torch.equal(calls[0][0], x[0]) and not torch.equal(calls[0][1], x[0])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_reward_never_beaten_spends_every_steps_budget(batch_size):
    """Constant reward: nothing beats the best, nothing rolls over. 6 particles (3 populations of 2), 3
    candidates, 5 steps, max_nfe 27: B = 24 // 5 = 4; per particle 3 + 4 * 4 evaluations (not the last step's)."""
    calls = []
    x, g = _start(6)
    res = rbf(flow_model(calls), x, ds.grids.uniform(FLOW, 5), None, lambda x0: torch.zeros(len(x0)),
              particles=2, init_particles=3, max_nfe=27, batch_size=batch_size, generator=g)
    assert res.nfe == 3 + 4 * 4 and sum(len(c) for c in calls) == 6 * 19
    assert len(calls[0]) == 18 and max(len(c) for c in calls[1:]) == 6 * batch_size
    assert res.x.shape == (6, 2) and res.best.shape == (3, 2) and res.rewards.tolist() == [0.0] * 6


def test_a_reward_always_beaten_rolls_the_budget_over_to_the_last_step():
    """Each row scores higher than every earlier one: the first batch of every step is accepted, so each
    step but the last spends batch_size = 2 trials of its budget and rolls the rest over; the last step gets
    B + 4 * (B - 2) = 12 trials. 2 particles, 3 candidates, 5 steps, max_nfe 23: B = 4."""
    calls, counted = [], []

    def rising(x0):
        start = sum(counted)
        counted.append(len(x0))
        return torch.arange(start, start + len(x0), dtype=torch.float64)

    x, g = _start(2)
    res = rbf(flow_model(calls), x, ds.grids.uniform(FLOW, 5), None, rising, particles=2, init_particles=3,
              max_nfe=23, batch_size=2, generator=g)
    assert res.nfe == 3 + 2 * 4 and sum(len(c) for c in calls) == 2 * 11
    assert counted == [6] + [4] * 4 + [4] * 6  # the last step: 12 trials a particle, 2 at a time
    assert res.rewards.tolist() == [sum(counted) - 3.0, sum(counted) - 1.0]  # each particle's last trial


def test_without_diffusion_rbf_is_the_best_of_its_starting_candidates():
    """g = 0: every trial of a step is the same, so each particle follows the ODE from its best starting
    candidate (by the reward of the data estimate at t = 1), whatever the budget does."""
    calls = []
    a = torch.tensor([1.0, -0.5], dtype=torch.float64)
    reward = lambda x0: x0 @ a  # noqa: E731
    x, g = _start(4)
    grid = ds.grids.uniform(FLOW, 8)
    res = rbf(flow_model(calls), x, grid, FlowSDE(norm=0.0), reward, particles=2, init_particles=5, max_nfe=60,
              generator=g)
    candidates = calls[0].reshape(4, 5, 2)
    assert torch.equal(candidates[:, 0], x)
    scores = reward(flow_model()(calls[0], 1.0).x0).reshape(4, 5)
    chosen = candidates[torch.arange(4), scores.argmax(1)]
    solved = ds.sample(flow_model(), chosen, grid, "euler")
    torch.testing.assert_close(res.x, solved, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.rewards, reward(solved), rtol=1e-12, atol=1e-12)
    best = reward(solved).reshape(2, 2).argmax(1)
    torch.testing.assert_close(res.best, solved.reshape(2, 2, 2)[torch.arange(2), best])
    assert res.nfe <= 60


@pytest.mark.parametrize("solver", [FlowSDE(norm=0.0), ds.solvers.get("dpmpp_2m_sde", eta=0.0),
                                    ds.solvers.get("sa_solver", eta=0.0), ds.solvers.get("ddim")],
                         ids=["flow_sde", "dpmpp_2m_sde", "sa_solver", "ddim"])
def test_with_a_deterministic_solver_rbf_follows_its_path(solver):
    """No noise and a reward never beaten: every particle takes the solver's own steps, two identical
    trials a step (two batches), so the solver's history and corrector state and the reused evaluations
    come through the trial bookkeeping intact; one starting candidate, so the path is that of x."""
    x, g = _start(4)
    vp = ds.VP.linear()
    model = vp_interpolant(flow_model())
    grid = ds.grids.logsnr(vp, 8)
    res = rbf(model, x, grid, solver, lambda x0: torch.zeros(len(x0)), particles=2, init_particles=1,
              max_nfe=17, generator=g)
    torch.testing.assert_close(res.x, ds.sample(model, x, grid, solver), rtol=1e-12, atol=1e-12)
    assert res.nfe == 1 + 2 * 7


def test_rbf_raises_the_reward():
    """Against plain SDE samples from the same starting noise: RBF's particles score far higher."""
    a = torch.tensor([1.0, 0.5], dtype=torch.float64)
    reward = lambda x0: x0 @ a  # noqa: E731
    x, g = _start(64, seed=3)
    grid = ds.grids.uniform(FLOW, 6)
    plain = reward(ds.sample(flow_model(), x, grid, FlowSDE(), generator=torch.Generator().manual_seed(4)))
    res = rbf(flow_model(), x, grid, None, reward, init_particles=4, max_nfe=34, generator=g)
    # the best component (mean 2, 0.5: reward 2.25) holds 30% of the mass; plain samples average about 0.4
    assert res.rewards.mean() > plain.mean() + 1.0 and res.rewards.mean() > 2.0
    assert res.nfe <= 34


def test_rbf_is_reproducible_and_populations_are_independent():
    def run(groups, seed=5):
        x, g = _start(2 * groups, seed)
        return rbf(flow_model(), x, ds.grids.uniform(FLOW, 5), None, lambda x0: -x0.pow(2).sum(1), particles=2,
                   init_particles=3, max_nfe=20, batch_size=2, generator=g)
    a = run(3)
    assert torch.equal(a.x, run(3).x)
    assert not torch.equal(a.x, run(3, seed=6).x)
    torch.testing.assert_close(run(1).x, a.x[:2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", [None, "ddpm", ds.solvers.get("dpmpp_2m_sde"), ds.solvers.get("sa_solver")],
                         ids=["flow_sde", "ddpm", "dpmpp_2m_sde", "sa_solver"])
def test_rbf_on_the_vp_converted_model_with_guidance_and_per_sample_conditioning(solver):
    """Each particle keeps its own class through its candidates and trials (the conditional model lands in
    the class's component), and the reward sees each row's own label."""
    ring = ds.testbeds.ring8(radius=3.0, std=0.1)
    model = ds.guidance.cfg(vp_interpolant(ring.denoiser(FLOW, "velocity")), 1.5)
    vp = model.process
    label = torch.tensor([0, 3, 5, 7])

    def reward(x0, label):
        assert label.shape == (len(x0),)
        return -(x0 - ring.means[label]).pow(2).sum(1)

    g = torch.Generator().manual_seed(0)
    x = vp.prior((4, 2), generator=g, dtype=torch.float64)
    res = rbf(model, x, ds.grids.logsnr(vp, 10), solver, reward, particles=2, init_particles=3, max_nfe=33,
              generator=g, label=label)
    assert res.nfe <= 33 and res.x.shape == (4, 2) and res.best.shape == (2, 2)
    assert (res.x - ring.means[label]).norm(dim=1).max() < 1.0


def test_bad_rbf_input_gets_a_clear_error():
    x, g = _start(4)
    grid = ds.grids.uniform(FLOW, 5)
    reward = lambda x0: x0[:, 0]  # noqa: E731

    def call(solver=None, grid=grid, x=x, **kw):
        kw = {"init_particles": 3, "max_nfe": 30, **kw}
        return rbf(flow_model(), x, grid, solver, reward, generator=g, **kw)

    with pytest.raises(ValueError, match="rbf: max_nfe = 2 is smaller than init_particles = 3"):
        call(max_nfe=2)
    with pytest.raises(ValueError, match=r"rbf: max_nfe = 7 leaves no trial per step: .* at least 8"):
        call(max_nfe=7)
    with pytest.raises(ValueError, match="rbf: init_particles must be an integer >= 1, got 0"):
        call(init_particles=0)
    with pytest.raises(ValueError, match="rbf: batch_size must be an integer >= 1"):
        call(batch_size=1.5)
    with pytest.raises(ValueError, match="rbf: max_nfe must be an integer"):
        call(max_nfe=30.0)
    with pytest.raises(ValueError, match="particles = 3 must divide the batch"):
        call(particles=3)
    with pytest.raises(ValueError, match="rbf: solver 'heun' evaluates the network 2 time"):
        call("heun")
    with pytest.raises(ValueError, match="rbf: solver 'euler' evaluates the network away from the current sample"):
        call(ds.solvers.get("euler", s_churn=10.0))
    with pytest.raises(ValueError, match=r"the grid must start at the process's t_max = 1.0, not 0.8"):
        call(grid=torch.linspace(0.8, 0.0, 5, dtype=torch.float64))
    call(grid=torch.linspace(0.8, 0.0, 5, dtype=torch.float64), init_particles=1)  # from x alone it may
    with pytest.raises(ValueError, match=r"rbf: the reward returned \(12, 1\) at step 0"):
        rbf(flow_model(), x, grid, None, lambda x0: x0[:, :1], init_particles=3, max_nfe=30, generator=g)
    with pytest.raises(ValueError, match="unknown solver 'sde'"):
        call("sde")
