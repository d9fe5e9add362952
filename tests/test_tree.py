"""Diffusion tree sampling and search (DTS, DTS*) on the exact Gaussian-mixture oracle.

The target of DTS is ``p_theta(x) exp(lam r(x))`` with ``p_theta`` the law of the chain the tree is built
from (ddpm on a short grid, started from the population's own starting samples), which is not the
mixture: a short chain is not exact. So the reference is that chain itself, sampled many times from
the same starting samples and reweighted by ``exp(lam r)`` (self-normalised importance sampling).
"""

import math

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler.steering import best_of_n
from diffsampler.steering.particles import stochastic_solvers
from diffsampler.steering.tree import _boltzmann, _choose, tree_search, uct
from diffsampler.testbeds.gmm import GaussianMixture

from conftest import stat_size

PROCESS = ds.VP.scaled_linear()
# Two modes, the heavier one on the left: a linear reward moves mass to the right one.
MIX = GaussianMixture([[-1.0], [1.5]], [0.1, 0.2], [0.7, 0.3])
MODEL = MIX.denoiser(PROCESS, "eps")


def linear(x0, **cond):
    return x0.reshape(x0.shape[0], -1)[:, 0].to(torch.float64)


def grid(steps):
    return ds.grids.get("logsnr", PROCESS, steps)


def starts(n, seed=0):
    return torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def close(a, b, rtol=1e-10, atol=1e-12, what=""):
    """``a`` equals ``b`` to the tolerances, shapes included (torch.testing takes seconds to import)."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), (what, a, b)


def per_group(values, groups, weights, G):
    return torch.zeros(G, dtype=torch.float64).index_add_(0, groups, weights * values)


# -- the target: DTS's leaf distribution and root value -------------------------------------------

STEPS, P, LAM, BUDGET = 4, 2, 1.0, 400
# Finite-budget allowances. A value-driven selection leaves DTS short of the tilt at a finite budget
# (see the notes of steering/tree.py); measured with DIFFSAMPLER_FULL_STATS=1 (256 trees of 400 nodes
# on this 4-step chain, 162 leaves each): the weighted leaf mean 0.044 +- 0.015 low (the tilt moves it
# by 0.65), the mode weight 0.027 +- 0.008 low (tilt 0.35), the root value 0.005 +- 0.013 low. The
# allowances are about twice those; each test adds 3.5 standard errors of its own run on top.
BIAS_MEAN, BIAS_MODE, BIAS_VALUE = 0.08, 0.05, 0.04


@pytest.fixture(scope="module")
def dts_run():
    G = stat_size(64, 256)
    x_start = starts(P)
    # the reference: the chain itself from the same two starting samples, reweighted by exp(lam r)
    m = stat_size(20000, 100000)
    chain = ds.sample(MODEL, x_start.repeat_interleave(m, 0), grid(STEPS), "ddpm",
                      generator=torch.Generator().manual_seed(5))[:, 0]
    w = torch.softmax(LAM * chain, 0)
    ref = {"mean": float((w * chain).sum()), "mode": float((w * (chain > 0.25)).sum()),
           "value": float(torch.logsumexp(LAM * chain, 0) - math.log(len(chain))) / LAM,
           "untilted_mean": float(chain.mean()), "untilted_mode": float((chain > 0.25).double().mean()),
           "ess": float(1 / (w ** 2).sum())}
    r = tree_search(MODEL, x_start.repeat(G, 1), grid(STEPS), "ddpm", linear, particles=P,
                    generator=torch.Generator().manual_seed(1), lam=LAM, budget=BUDGET, parallel=4)
    return G, ref, r


@pytest.mark.statistical
def test_dts_leaf_distribution_converges_to_the_tilted_chain(dts_run):
    G, ref, r = dts_run
    wl, yl, gl = r.tree_log_weights.exp(), r.tree_leaves[:, 0], r.tree_groups
    # each tree's leaf distribution (all its leaves, weighted by the descent), then the mean over trees
    mean_g, mode_g = per_group(yl, gl, wl, G), per_group((yl > 0.25).double(), gl, wl, G)
    tol_mean = BIAS_MEAN + 3.5 * float(mean_g.std()) / math.sqrt(G)
    tol_mode = BIAS_MODE + 3.5 * float(mode_g.std()) / math.sqrt(G)
    # the setting tells the tilt from no tilt many times over
    assert ref["mean"] - ref["untilted_mean"] > 3 * tol_mean and ref["mode"] - ref["untilted_mode"] > 3 * tol_mode
    assert abs(float(mean_g.mean()) - ref["mean"]) < tol_mean, (float(mean_g.mean()), ref, tol_mean)
    assert abs(float(mode_g.mean()) - ref["mode"]) < tol_mode, (float(mode_g.mean()), ref, tol_mode)
    # the returned samples are draws from those leaf distributions (P per tree)
    y = r.x[:, 0]
    se = float(y.std()) / math.sqrt(len(y))
    assert abs(float(y.mean()) - float(mean_g.mean())) < 4 * se, (float(y.mean()), float(mean_g.mean()), se)
    assert float(y.mean()) - ref["untilted_mean"] > 4 * se


@pytest.mark.statistical
def test_dts_root_value_converges_to_the_soft_value(dts_run):
    G, ref, r = dts_run
    e = torch.exp(LAM * r.root_value)           # exp(lam v_root) estimates E exp(lam r); its log is V
    estimate = math.log(float(e.mean())) / LAM
    se = float(e.std()) / (math.sqrt(G) * float(e.mean()) * LAM)
    assert abs(estimate - ref["value"]) < BIAS_VALUE + 3.5 * se, (estimate, ref["value"], se)


def test_root_value_is_the_soft_mean_of_its_leaves():
    # Two steps into t = 0 from one starting sample: every leaf hangs from its own node at knot 1, all
    # children of the start, so the root value is the soft mean over the leaves and each leaf's descent
    # probability is its softmax weight. Exact, at any budget.
    lam = 2.5
    r = tree_search(MODEL, starts(1), grid(2), "ddpm", linear, particles=1, lam=lam, budget=40,
                    generator=torch.Generator().manual_seed(3))
    rew = linear(r.tree_leaves)
    assert r.leaves.item() == len(rew) > 4
    soft = (torch.logsumexp(lam * rew, 0) - math.log(len(rew))) / lam
    close(r.root_value, soft.reshape(1), rtol=0, atol=1e-12)
    close(r.tree_log_weights, torch.log_softmax(lam * rew, 0), rtol=0, atol=1e-12)


@pytest.mark.statistical
def test_dts_draws_its_leaves_by_their_descent_weights():
    # Each population's particles are drawn from its tree's leaves with the descent probabilities
    # (tree_log_weights, exact as checked above): the drawn rewards average to the weighted ones.
    lam, G, p = 2.5, stat_size(200, 800), 2
    r = tree_search(MODEL, starts(p).repeat(G, 1), grid(3), "ddpm", linear, particles=p, lam=lam, budget=30,
                    generator=torch.Generator().manual_seed(6))
    expected = per_group(linear(r.tree_leaves), r.tree_groups, r.tree_log_weights.exp(), G)
    diff = r.rewards - expected.repeat_interleave(p)
    se = float(diff.std()) / math.sqrt(len(diff))
    assert abs(float(diff.mean())) < 4 * se, (float(diff.mean()), se)
    # and those weights are tilted: the draws beat the leaves' plain mean by far more than the noise
    plain = torch.zeros(G, dtype=torch.float64).index_add_(0, r.tree_groups, linear(r.tree_leaves)) / r.leaves
    assert float(r.rewards.mean() - plain.mean()) > 10 * se


def test_fixed_branching_fills_the_tree_and_stops():
    # widening=None, branching=2, three steps into 0: knots 0 and 1 branch in two, the last step is
    # deterministic, so the full tree has 2 * 2 = 4 leaves and 2 + 4 + 4 = 10 nodes; a larger budget
    # is left unspent. The tree is balanced, so the root value is the soft mean of the four leaves.
    r = tree_search(MODEL, starts(1), grid(3), "ddpm", linear, particles=1, lam=1.5, budget=100,
                    branching=2, widening=None, generator=torch.Generator().manual_seed(4))
    assert r.nodes.item() == 10 and r.leaves.item() == 4
    rew = linear(r.tree_leaves)
    assert len(set(rew.tolist())) == 4  # no copies: every leaf is a draw of its own
    close(r.root_value, ((torch.logsumexp(1.5 * rew, 0) - math.log(4)) / 1.5).reshape(1))
    assert r.nfe * 1 <= 10


# -- DTS*: search ---------------------------------------------------------------------------------

@pytest.mark.statistical
def test_dts_star_finds_better_rewards_than_best_of_n_at_equal_nfe():
    G, steps, p = stat_size(64, 256), 8, 2
    r = tree_search(MODEL, starts(G * p), grid(steps), "ddpm", linear, particles=p, method="dts*", lam=5.0,
                    budget=16 * steps, generator=torch.Generator().manual_seed(1))
    n_best = int(r.nfe * p // steps)  # best-of-N with at most the evaluations DTS* spent per population
    b = best_of_n(MODEL, starts(G * n_best, seed=7), grid(steps), "ddpm", linear, particles=n_best,
                  generator=torch.Generator().manual_seed(2))
    assert b.nfe * n_best <= r.nfe * p
    tree_best, bon_best = linear(r.best), linear(b.best)
    se = math.sqrt(float(tree_best.var()) / G + float(bon_best.var()) / G)
    # measured (64 populations, 126 evaluations each): DTS* 1.83 +- 0.04, best-of-15 (120) 1.54 +- 0.06;
    # DTS* selecting the worst child instead, 1.47 +- 0.06: the greedy selection finds the better leaves
    gain = float(tree_best.mean() - bon_best.mean())
    assert gain > 2 * se, (float(tree_best.mean()), float(bon_best.mean()), se)


def test_dts_star_returns_the_best_leaves():
    G, p = 3, 2
    r = tree_search(MODEL, starts(G * p), grid(5), "ddpm", linear, particles=p, method="dts*", budget=40,
                    exploration=0.3, generator=torch.Generator().manual_seed(2))
    leaf_r = linear(r.tree_leaves)
    for g in range(G):
        top = torch.sort(leaf_r[r.tree_groups == g], descending=True).values[:p]
        close(r.rewards[g * p:(g + 1) * p], top)
        close(linear(r.best[g:g + 1]), top[:1])
    close(linear(r.x), r.rewards)


# -- the result, the accounting, the randomness ---------------------------------------------------

class Counting:
    """The mixture's eps network, counting the samples it is evaluated on."""

    def __init__(self):
        self.samples = 0
        inner = MIX.denoiser(PROCESS, "eps")

        def net(x, time, **cond):
            self.samples += x.shape[0]
            return inner.fn(x, time, **cond)

        self.model = ds.Denoiser(net, PROCESS, "eps", time_input=lambda t: t)


def test_result_contract_and_nfe():
    G, p, budget, steps = 2, 3, 60, 5
    c = Counting()
    # a fixed branching lets the three paths a tree selects per round expand one node together
    r = tree_search(c.model, starts(G * p), grid(steps), "ddpm", linear, particles=p, budget=budget, parallel=3,
                    branching=4, widening=None, generator=torch.Generator().manual_seed(0))
    n = G * p
    assert r.x.shape == (n, 1) and r.best.shape == (G, 1) and r.rewards.shape == (n,)
    close(r.rewards, linear(r.x))
    close(torch.logsumexp(r.log_weights.reshape(G, p), 1), torch.zeros(G, dtype=torch.float64))
    w = r.tree_log_weights
    close(torch.zeros(G, dtype=torch.float64).index_add_(0, r.tree_groups, w.exp()),
                               torch.ones(G, dtype=torch.float64))
    leaf_r = linear(r.tree_leaves)
    for g in range(G):
        assert float(linear(r.best[g:g + 1])) == float(leaf_r[r.tree_groups == g].max())
    assert bool((r.nodes <= budget).all()) and bool((r.nodes >= p * steps).all())
    assert r.leaves.sum().item() == len(leaf_r)
    # nfe counts every evaluation, per output sample; children drawn together share their parent's
    assert r.nfe * n == c.samples
    assert c.samples < r.nodes.sum().item()


def test_populations_are_independent_and_runs_reproducible():
    # The second population's reward is scaled (a per-sample conditioning keyword, which the model
    # ignores), so its tree grows differently and takes more rounds than the first: what the first
    # population draws must not depend on that, nor on the second's samples.
    model = ds.Denoiser(lambda x, t, scale=None: MODEL.fn(x, t), PROCESS, "eps", time_input=lambda t: t)

    def scaled(x0, scale=None):
        return linear(x0) * scale

    def run(x, scale, seed=9, **kw):
        return tree_search(model, x, grid(4), "ddpm", scaled, particles=2, budget=40, scale=scale,
                           generator=torch.Generator().manual_seed(seed), **kw)

    x0, x1 = starts(2), starts(2, seed=1)
    for kw in (dict(), dict(parallel=3, branching=3, widening=None)):
        alone = run(x0, torch.ones(2), **kw)
        both = run(torch.cat([x0, x1]), torch.tensor([1.0, 1.0, 10.0, 10.0]), **kw)
        close(both.x[:2], alone.x, rtol=0, atol=1e-12)
        close(both.root_value[:1], alone.root_value, rtol=0, atol=1e-12)
        close(both.tree_leaves[both.tree_groups == 0], alone.tree_leaves, rtol=0, atol=1e-12)
        if not kw:
            assert both.leaves[1] > both.leaves[0]  # the second tree did take more rounds
        again = run(x0, torch.ones(2), **kw)
        close(again.x, alone.x, rtol=0, atol=0)
        other = run(x0, torch.ones(2), seed=10, **kw)
        assert not torch.equal(other.tree_leaves, alone.tree_leaves)


def test_conditioning_follows_each_tree():
    # Two far-apart labelled components; each population is conditioned on its own label, per sample.
    mix = GaussianMixture([[-3.0], [3.0]], [0.05, 0.05], labels=[0, 1])
    model = mix.denoiser(PROCESS, "eps")
    label = torch.tensor([0, 0, 1, 1])
    r = tree_search(model, starts(4), grid(4), "ddpm", linear, particles=2, budget=30,
                    generator=torch.Generator().manual_seed(0), label=label)
    leaves, groups = r.tree_leaves[:, 0], r.tree_groups
    assert bool((leaves[groups == 0] < 0).all()) and bool((leaves[groups == 1] > 0).all())
    assert bool((r.x[:2] < 0).all()) and bool((r.x[2:] > 0).all())


def test_selection_is_pluggable():
    seen = []

    def uniform(values, visits, parent_visits):
        seen.append((values.shape, visits.shape, parent_visits.shape))
        return torch.zeros_like(values)

    r = tree_search(MODEL, starts(2), grid(4), "ddpm", linear, particles=2, budget=30, selection=uniform,
                    generator=torch.Generator().manual_seed(0))
    assert seen and all(v == n and pv == (v[0], 1) for v, n, pv in seen)
    assert r.nodes.item() > 8
    with pytest.raises(ValueError, match="one score per candidate"):
        tree_search(MODEL, starts(2), grid(4), "ddpm", linear, particles=2, budget=30,
                    selection=lambda v, n, pn: v[:, :1])


def test_default_selections():
    f64 = dict(dtype=torch.float64)
    v, n, pn = torch.tensor([[1.0, -2.0]], **f64), torch.tensor([[1.0, 4.0]], **f64), torch.tensor([[5.0]], **f64)
    assert torch.equal(_boltzmann(2.0)(v, n, pn), 2.0 * v)  # DTS draws a child with probability ∝ exp(lam v)
    assert torch.equal(uct(0.0)(v, n, pn), v)                # DTS* is greedy on v by default
    close(uct(0.5)(v, n, pn), v + 0.5 * torch.sqrt(math.log(5.0) / n))


def test_choose_draws_by_exp_score_and_skips_ineligible():
    scores = np.array([[0.0, math.log(3.0), 5.0]] * 3)
    eligible = np.array([[True, True, False]] * 3)
    # probabilities 1/4 and 3/4 over the eligible columns: inverse CDF at u
    assert _choose(scores, eligible, np.array([0.2, 0.3, 0.999999])).tolist() == [0, 1, 1]
    assert _choose(scores, eligible, None).tolist() == [1, 1, 1]


# -- bad input -----------------------------------------------------------------------------------

class _FixedNoise:
    """The same standard normal for every step (one per stream), to compare two kernels draw for draw."""

    def __init__(self, z):
        self.z = z

    def draw(self, i, stream=0):
        return self.z[stream].clone()

    def between(self, a, b):
        return self.z[0].clone()


def test_every_stochastic_solver_is_a_one_step_kernel_or_refused():
    # tree_search accepts a stochastic solver whose state holds no per-sample tensor after a step and
    # moves a node at knot i with the first step of a run over grid[i:]. For every accepted solver that
    # step must be step i of the whole grid, draw for draw; every other solver must be refused.
    g = ds.grids.validate(PROCESS, grid(5))
    z = [torch.randn(3, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    accepted = []
    for name in stochastic_solvers():
        try:
            tree_search(MODEL, starts(2), g, name, linear, particles=1, budget=10,
                        generator=torch.Generator().manual_seed(0))
        except ValueError as err:
            assert "history" in str(err), (name, str(err))
            continue
        accepted.append(name)
        solver = ds.solvers.get(name)
        run = ds.Run(MODEL, starts(3), g, solver, generator=torch.Generator().manual_seed(1))
        run.step()
        run.step()
        fn = lambda x_, t_: MODEL(x_, t_)  # noqa: E731
        whole, _ = solver.step(fn, run.x, 2, run.state, _FixedNoise(z))
        rest = ds.Run(MODEL, run.x, g[2:], solver, generator=torch.Generator().manual_seed(1))
        first, _ = solver.step(fn, run.x, 0, rest.state, _FixedNoise(z))
        close(first, whole, rtol=1e-12, atol=1e-12, what=name)
    assert {"ddpm", "euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "lcm",
            "seeds_2", "seeds_3"} <= set(accepted)
    assert not {"dpmpp_2m_sde", "dpmpp_3m_sde", "sa_solver", "er_sde"} & set(accepted)
    # ddim with noise is a one-step kernel too
    tree_search(MODEL, starts(2), g, ds.solvers.get("ddim", eta=1.0), linear, particles=1, budget=10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=0), "budget must be an integer >= 1"),
    (dict(budget=2.5), "budget must be an integer"),
    (dict(budget=7), "less than the first rollouts need"),
    (dict(branching=0), "branching must be an integer >= 1"),
    (dict(branching=None, widening=None), "needs widening"),
    (dict(widening=0.0), "widening must be None or an exponent"),
    (dict(widening=1.5), "widening must be None or an exponent"),
    (dict(method="mcts"), "method must be one of 'dts', 'dts\\*'"),
    (dict(lam=0.0), "lam must be a finite number > 0"),
    (dict(lam=float("inf")), "lam must be a finite number > 0"),
    (dict(parallel=0), "parallel must be an integer >= 1"),
    (dict(exploration=-1.0), "exploration must be a finite number >= 0"),
    (dict(exploration=1.0), "exploration applies to method 'dts\\*'"),
    (dict(method="dts*", exploration=1.0, selection=lambda v, n, pn: v), "put the bonus in it"),
    (dict(particles=3), "must divide the batch"),
])
def test_bad_input(kwargs, match):
    args = dict(particles=2, budget=20)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tree_search(MODEL, starts(4), grid(4), "ddpm", linear, **args)


def test_deterministic_solver_is_refused_with_the_stochastic_ones_listed():
    with pytest.raises(ValueError, match="draws no noise") as info:
        tree_search(MODEL, starts(2), grid(4), "ddim", linear, particles=2)
    assert "ddpm" in str(info.value) and "euler_ancestral" in str(info.value)
    with pytest.raises(TypeError, match="selection must be callable"):
        tree_search(MODEL, starts(2), grid(4), "ddpm", linear, particles=2, selection=3)
