"""Feynman-Kac correctors against targets known in closed form (or by quadrature), and their contracts.

Targets on a 2-D class-conditional mixture: the product with a second mixture (a mixture again,
``GaussianMixture.product``), annealing at beta = 2 (the mixture times itself) and CFG's geometric
mean ``p_u^(1-w) p_c^w`` (not a mixture: its moments come from quadrature on a fine grid). The
statistics are the means, second moments and the mass near each component mean (a Voronoi cell:
the same function of the sample for the particles and the quadrature). Each population gives one
weighted estimate; the z-score of their average uses the spread across populations. The uncorrected
run (the combined score alone, the same SDE without the weights) misses by many standard errors.
"""

import pytest
import torch

import diffsampler as ds
from conftest import FULL_STATS, stat_size

PROCESS = ds.VP.linear()
MIX = ds.testbeds.GaussianMixture(
    [[-1.5, 0.0], [1.5, 0.5], [0.0, 2.0]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.25, -0.05], [-0.05, 0.35]], [[0.2, 0.0], [0.0, 0.15]]],
    [0.5, 0.3, 0.2], labels=[0, 1, 1])
OTHER = ds.testbeds.GaussianMixture([[0.5, 1.0], [-1.0, -0.5]], [[[0.6, 0.2], [0.2, 0.5]], [[0.5, 0.0], [0.0, 0.5]]],
                                    [0.6, 0.4])
STEPS = 400 if FULL_STATS else 100
Z_MAX = 5.0
_AXIS = torch.linspace(-6.0, 6.0, 481, dtype=torch.float64)
GRID_POINTS = torch.stack(torch.meshgrid(_AXIS, _AXIS, indexing="ij"), -1).reshape(-1, 2)


def _statistics(x):
    cell = torch.cdist(x.to(torch.float64), MIX.means).argmin(1)
    return torch.cat([x, x ** 2, (x[:, 0] * x[:, 1])[:, None],
                      torch.nn.functional.one_hot(cell, MIX.n_components).to(torch.float64)], 1)


def _quadrature(log_density):
    w = torch.softmax(log_density(GRID_POINTS), 0)
    return (w[:, None] * _statistics(GRID_POINTS)).sum(0)


def _exact_product(first, second):
    """The product mixture's statistics, by its components (checks the quadrature too)."""
    return _quadrature(lambda p: first.log_prob(p) + second.log_prob(p))


TARGETS = {
    "cfg w=2": (lambda m: ds.steering.cfg_target(m, 2.0), {"label": torch.tensor(1)},
                lambda p: -MIX.log_prob(p) + 2 * MIX.log_prob(p, label=1)),
    "cfg w=4": (lambda m: ds.steering.cfg_target(m, 4.0), {"label": torch.tensor(1)},
                lambda p: -3 * MIX.log_prob(p) + 4 * MIX.log_prob(p, label=1)),
    "product": (lambda m: ds.steering.product(m, OTHER.denoiser(PROCESS, "eps")), {},
                lambda p: MIX.log_prob(p) + OTHER.log_prob(p)),
    "anneal beta=2": (lambda m: ds.steering.annealed(m, 2.0), {}, lambda p: 2 * MIX.log_prob(p)),
}


def _estimates(name, particles, batch, seed=0, weighted=True, steps=STEPS, **kw):
    make, cond, _ = TARGETS[name]
    target = make(MIX.denoiser(PROCESS, "eps"))
    g = torch.Generator().manual_seed(seed)
    x = PROCESS.prior((batch, 2), generator=g, dtype=torch.float64)
    grid = ds.grids.logsnr(PROCESS, steps)
    if weighted:
        res = ds.steering.fkc(target, x, grid, "ddpm", particles=particles, generator=g, **cond, **kw)
        samples, log_w = res.x, res.log_weights
    else:
        samples = ds.sample(target, x * target.init_scale, grid, "ddpm", generator=g, **cond)
        log_w = torch.zeros(batch, dtype=torch.float64)
    groups = batch // particles
    w = torch.softmax(log_w.reshape(groups, particles), 1)[..., None]
    return (w * _statistics(samples).reshape(groups, particles, -1)).sum(1)


def _z(estimates, exact):
    se = estimates.std(0) / len(estimates) ** 0.5
    live = se > 0  # a cell that neither the target nor the particles reach has no spread
    return (estimates.mean(0) - exact)[live] / se[live]


def test_the_quadrature_reproduces_a_closed_form_product():
    prod = MIX.product(OTHER)
    w, m, c = prod.weights, prod.means, prod.covs
    mean = w @ m
    second = (w[:, None] * (torch.diagonal(c, 0, 1, 2) + m ** 2)).sum(0)
    q = _exact_product(MIX, OTHER)
    assert torch.allclose(q[:2], mean, atol=1e-6) and torch.allclose(q[2:4], second, atol=1e-6)


@pytest.mark.statistical
@pytest.mark.parametrize("name", list(TARGETS))
def test_weighted_particles_reach_the_target_and_the_uncorrected_sde_does_not(name):
    particles = 256 if FULL_STATS else 128
    batch = stat_size(2048, 16384)
    exact = _quadrature(TARGETS[name][2])
    # the product's combined score is the stiffest at high noise (twice the prior's precision): the
    # first-order weights need twice the steps there; CFG at w = 4 has the most degenerate weights
    # (increments w (w-1) |eps_c - eps_u|^2 h), whose self-normalised bias of order 1/particles
    # needs twice the particles (measured: max |z| 7.8 at 128 particles and 2048 samples)
    steps = 2 * STEPS if name == "product" else STEPS
    if name == "cfg w=4":
        particles, batch = 2 * particles, 2 * batch
    corrected = _z(_estimates(name, particles, batch, steps=steps), exact)
    plain = _z(_estimates(name, particles, batch, weighted=False, steps=steps), exact)
    assert corrected.abs().max() < Z_MAX, f"{name}: FKC z-scores {corrected.tolist()}"
    assert plain.abs().max() > Z_MAX, f"{name}: the uncorrected run should miss, z-scores {plain.tolist()}"


@pytest.mark.statistical
def test_the_authors_centred_and_clamped_increments_bias_the_target():
    """Mean-centring alone changes nothing (a constant per population); clamping the centred
    increments to [-1, 1] (their Euler-Maruyama setting) cuts the large increments of CFG at w = 4."""
    particles, batch = 128, stat_size(2048, 16384)
    exact = _quadrature(TARGETS["cfg w=4"][2])
    centred = _estimates("cfg w=4", particles, batch, center=True)
    assert torch.allclose(centred, _estimates("cfg w=4", particles, batch), atol=1e-9)
    clamped = _z(_estimates("cfg w=4", particles, batch, center=True, clamp=1.0), exact)
    assert clamped.abs().max() > Z_MAX, f"clamping should bias the target, z-scores {clamped.tolist()}"


def _small_run(target, batch=8, particles=4, solver="ddpm", seed=0, steps=6, **kw):
    g = torch.Generator().manual_seed(seed)
    x = PROCESS.prior((batch, 2), generator=g, dtype=torch.float64)
    return ds.steering.fkc(target, x, ds.grids.logsnr(PROCESS, steps), solver, particles=particles, generator=g, **kw)


def test_nfe_counts_each_network_call_and_both_experts():
    """CFG's two passes are one call on a doubled batch (counted once, as ds.guidance.cfg is); a product
    calls two networks."""
    model = MIX.denoiser(PROCESS, "eps")
    assert _small_run(ds.steering.cfg_target(model, 2.0), label=torch.tensor(1)).nfe == 6
    assert _small_run(ds.steering.product(model, OTHER.denoiser(PROCESS, "eps"))).nfe == 2 * 6
    assert _small_run(ds.steering.annealed(model, 2.0)).nfe == 6


def test_a_population_does_not_depend_on_the_other_populations():
    target = ds.steering.cfg_target(MIX.denoiser(PROCESS, "eps"), 3.0)
    g = torch.Generator().manual_seed(3)
    x = PROCESS.prior((12, 2), generator=g, dtype=torch.float64)
    grid = ds.grids.logsnr(PROCESS, 8)
    whole = ds.steering.fkc(target, x, grid, "ddpm", particles=4, generator=torch.Generator().manual_seed(5),
                            label=torch.tensor(1))
    first = ds.steering.fkc(target, x[:4], grid, "ddpm", particles=4, generator=torch.Generator().manual_seed(5),
                            label=torch.tensor(1))
    assert torch.equal(whole.x[:4], first.x) and torch.equal(whole.log_weights[:4], first.log_weights)


@pytest.mark.parametrize("solver", ["ddpm", "dpmpp_2m_sde", "euler_ancestral", "dpmpp_2s_ancestral"])
def test_every_reverse_sde_kernel_runs_and_builds_no_graph(solver):
    net = torch.nn.Linear(2, 2).double()  # parameters that require grad
    torch.nn.init.zeros_(net.weight), torch.nn.init.zeros_(net.bias)
    model = ds.Denoiser(lambda x, t: MIX.denoiser(PROCESS, "eps")(x, t).eps + net(x), PROCESS, "eps")
    res = _small_run(ds.steering.annealed(model, 1.5), solver=solver)
    assert res.x.shape == (8, 2) and not res.x.requires_grad and bool(torch.isfinite(res.log_weights).all())
    assert torch.allclose(torch.logsumexp(res.log_weights.reshape(2, 4), 1), torch.zeros(2, dtype=torch.float64))


def test_bad_input_gets_a_clear_error():
    model = MIX.denoiser(PROCESS, "eps")
    target = ds.steering.annealed(model, 2.0)
    with pytest.raises(TypeError, match="target must be ds.steering.annealed"):
        _small_run(model)
    with pytest.raises(ValueError, match="not a reverse-SDE kernel"):
        _small_run(target, solver="dpmpp_2m")
    with pytest.raises(ValueError, match="not a reverse-SDE kernel"):
        _small_run(target, solver=ds.solvers.get("ddim", eta=0.5))
    with pytest.raises(ValueError, match="clamp must be None or a number > 0"):
        _small_run(target, clamp=0)
    with pytest.raises(ValueError, match="ess_threshold"):
        _small_run(target, ess_threshold=2.0)
    with pytest.raises(ValueError, match="particles = 3 must divide the batch"):
        _small_run(target, particles=3)
    with pytest.raises(ValueError, match="beta must be > 0"):
        ds.steering.annealed(model, 0.0)
    with pytest.raises(ValueError, match="one process"):
        ds.steering.product(model, MIX.denoiser(ds.EDM(), "eps"))
    flow = ds.Flow()
    with pytest.raises(ValueError, match="undefined where alpha"):
        g = torch.Generator().manual_seed(0)
        ds.steering.fkc(ds.steering.annealed(MIX.denoiser(flow, "velocity"), 2.0), flow.prior((4, 2), generator=g,
                        dtype=torch.float64), ds.grids.uniform(flow, 4), "ddpm", particles=2, generator=g)
    # below t = 1 the flow works
    g = torch.Generator().manual_seed(0)
    res = ds.steering.fkc(ds.steering.annealed(MIX.denoiser(flow, "velocity"), 2.0),
                          flow.prior((4, 2), generator=g, dtype=torch.float64),
                          torch.linspace(0.999, 0.0, 9, dtype=torch.float64), "ddpm", particles=2, generator=g)
    assert bool(torch.isfinite(res.x).all())
