"""ds.calibrate: each optimiser's mathematics on a case with a known answer, the budget, generalisation, errors."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

import diffsampler as ds
from diffsampler import calibrate as cal
from diffsampler.calibrate import ays as ays_module

torch.set_num_threads(1)


# -- the generic DP ------------------------------------------------------------------------------------
@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8])
def test_dp_optimum_equals_brute_force(coeff):
    g = torch.Generator().manual_seed(5)
    n = 9
    cost = torch.rand(n, n, generator=g, dtype=torch.float64) * 3
    for edges in range(1, n):
        path = cal.shortest_path(cost, edges, coeff=coeff)
        assert path[0] == 0 and path[-1] == n - 1 and len(path) == edges + 1
        assert all(a < b for a, b in zip(path[:-1], path[1:]))
        best = min(cal.path_cost(cost, [0, *inner, n - 1], coeff=coeff)
                   for inner in itertools.combinations(range(1, n - 1), edges - 1))
        assert cal.path_cost(cost, path, coeff=coeff) == pytest.approx(best, rel=1e-12)


# -- DMN: the objective against its definition -----------------------------------------------------------
def _dmn_by_definition(lams, max_order):
    """DMN's bound written out from the paper's definition: Lagrange weights by numerical quadrature."""
    n_steps = len(lams) - 1
    bound = [(1 / (1 + math.exp(2 * v))) / (1 / math.sqrt(1 + math.exp(-2 * v))) for v in lams]
    total, linear = 0.0, np.zeros(len(lams))
    for s in range(n_steps):
        order = min(s + 1, n_steps - s, max_order)
        nodes = list(range(s - order + 1, s + 1))
        terms = []
        for j in nodes:
            basis = lambda lam, j=j: math.exp(lam) * np.prod([(lam - lams[k]) / (lams[j] - lams[k])
                                                              for k in nodes if k != j])
            weight = quad(basis, lams[s], lams[s + 1], epsabs=0, epsrel=1e-13)[0]
            terms.append((j, weight * bound[j]))
        if order == 1:
            total += abs(terms[0][1])
        elif s < 3:
            total += math.sqrt(sum(v * v for _, v in terms))
        else:
            for j, v in terms:
                linear[j] += v
    return total + np.abs(linear).sum()


@pytest.mark.parametrize("max_order", [1, 2, 3])
@pytest.mark.parametrize("n_steps", [2, 5, 8])
def test_dmn_objective_equals_definition(max_order, n_steps):
    rng = np.random.default_rng(n_steps * 10 + max_order)
    lams = np.sort(rng.uniform(-5.0, 6.0, n_steps + 1))
    assert cal.dmn_objective(lams, max_order) == pytest.approx(_dmn_by_definition(list(lams), max_order), rel=1e-9)


def test_dmn_optimum_is_below_the_uniform_logsnr_grid():
    proc = ds.VP.scaled_linear()
    lam_hi, lam_lo = float(proc.lambda_(proc.t_max)), float(proc.lambda_(proc.t_min))
    grid = cal.DMN(max_order=3).optimise(type("M", (), {"process": proc})(), None, ds.solvers.get("dpmpp_3m"), 6, {})
    lams = [float(proc.lambda_(t)) for t in grid[:-1]] + [lam_lo]
    uniform = np.linspace(lam_hi, lam_lo, 7)
    assert cal.dmn_objective(lams, 3) < cal.dmn_objective(uniform, 3)


# -- AYS: the optimiser against the closed-form optimum for Gaussian data -----------------------------------
def _gaussian_klub_optimum(c, s_lo, s_hi, steps):
    """The interior knots where the Gaussian KLUB is stationary, by shooting on its closed-form condition.

    For data N(mu, c^2) the bound of the interval [l, h] is c^2 int_l^h (a(s) - a(h)) / s^3 ds with
    a = c^2 / (c^2 + s^2). Its derivative in an interior knot s_i vanishes when
    a(s_{i+1}) = a(s_i) + a'(s_i) s_i^3 (s_{i-1}^-2 - s_i^-2) / 2: given s_0 = s_lo and s_1 this gives the
    next knots one by one; s_1 is set by bisection so that the last lands on s_hi.
    """
    a = lambda s: c * c / (c * c + s * s)  # noqa: E731
    da = lambda s: -2 * c * c * s / (c * c + s * s) ** 2  # noqa: E731

    def shoot(s1):
        knots = [s_lo, s1]
        for _ in range(steps - 1):
            lo, s = knots[-2], knots[-1]
            nxt = a(s) + da(s) * s ** 3 * (lo ** -2 - s ** -2) / 2
            if nxt <= 0:
                return None
            knots.append(math.sqrt(c * c / nxt - c * c))
        return knots

    lo_, hi_ = math.log(s_lo), math.log(s_hi)
    for _ in range(200):
        mid = 0.5 * (lo_ + hi_)
        knots = shoot(math.exp(mid))
        if knots is None or knots[-1] > s_hi:
            hi_ = mid
        else:
            lo_ = mid
    return shoot(math.exp(lo_))


def test_ays_recovers_gaussian_closed_form_optimum():
    c, steps = 0.5, 4
    proc = ds.EDM(0.01, 40.0)
    gauss = ds.testbeds.Gaussian([0.3], [[c * c]])
    model = gauss.denoiser(proc)
    x0, _ = gauss.sample(8000, torch.Generator().manual_seed(0))
    lattice = 161
    grid = ays_module.grid_from_data(model, x0, steps, lattice, 0, {})
    found = [math.exp(-float(proc.lambda_(t))) for t in grid[1:-1]][::-1]      # interior levels, increasing
    expected = _gaussian_klub_optimum(c, proc.t_min, proc.t_max, steps)[1:-1]
    spacing = (math.log(proc.t_max) - math.log(proc.t_min)) / (lattice - 1)
    for f, e in zip(found, expected):
        assert abs(math.log(f) - math.log(e)) <= 2.5 * spacing, (found, expected)


# -- the budget, for every method ------------------------------------------------------------------------
SMALL = {
    "gits": cal.GITS(teacher_steps=12, substeps=2),
    "oss": cal.OSS(teacher_steps=12, substeps=2),
    "dmn": cal.DMN(),
    "ays": cal.AYS(lattice=24, teacher_steps=8, substeps=2),
}


@pytest.fixture(scope="module")
def mixture_edm():
    mix = ds.testbeds.random_mixture(2, components=4, seed=7)
    proc = ds.EDM()
    return mix, proc, mix.denoiser(proc)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("method", sorted(SMALL))
def test_no_grid_costs_more_evaluations_than_asked(mixture_edm, method, solver):
    mix, proc, model = mixture_edm
    x = mix.sample_marginal(proc, proc.t_max, 16, torch.Generator().manual_seed(0))
    for nfe in range(3, 11):
        grid = cal.grid(model, x, solver, nfe, method=SMALL[method])
        assert grid.dtype == torch.float64 and bool((grid[1:] < grid[:-1]).all()) and grid[0] == proc.t_max
        model.nfe = 0
        ds.sample(model, x, grid, solver)
        assert model.nfe <= nfe, (method, solver, nfe, grid.tolist())
        assert model.nfe == ds.solvers.get(solver).run_nfe(len(grid) - 1, grid[-1] == 0)


# -- generalisation and the gain over hand-made grids ---------------------------------------------------------
@pytest.fixture(scope="module")
def held_out(mixture_edm):
    mix, proc, model = mixture_edm
    draws = {}
    for seed in (0, 1):
        x = mix.sample_marginal(proc, proc.t_max, 128, torch.Generator().manual_seed(seed))
        draws[seed] = (x, mix.ode_reference(proc, x, proc.t_max, 0.0))
    return draws


def _error(model, x, ref, grid, solver):
    return float((ds.sample(model, x, grid, solver) - ref).pow(2).sum(1).mean().sqrt())


@pytest.mark.parametrize("method", ["gits", "oss", "dmn"])
def test_calibration_generalises_to_held_out_points(mixture_edm, held_out, method):
    mix, proc, model = mixture_edm
    (x_cal, ref_cal), (x_new, ref_new) = held_out[0], held_out[1]
    grid = cal.grid(model, x_cal, "dpmpp_2m", 5, method=method)
    on_calibration = _error(model, x_cal, ref_cal, grid, "dpmpp_2m")
    on_held_out = _error(model, x_new, ref_new, grid, "dpmpp_2m")
    print(f"{method}: error on calibration points {on_calibration:.4f}, held out {on_held_out:.4f}")
    assert on_held_out <= 1.5 * on_calibration


@pytest.mark.parametrize("method", ["gits", "oss"])
def test_calibrated_grid_beats_logsnr_and_karras_at_nfe_5(mixture_edm, held_out, method):
    mix, proc, model = mixture_edm
    (x_cal, _), (x_new, ref_new) = held_out[0], held_out[1]
    grid = cal.grid(model, x_cal, "dpmpp_2m", 5, method=method)
    baseline = min(_error(model, x_new, ref_new, ds.grids.logsnr(proc, 5), "dpmpp_2m"),
                   _error(model, x_new, ref_new, ds.grids.karras(proc, 5), "dpmpp_2m"))
    calibrated = _error(model, x_new, ref_new, grid, "dpmpp_2m")
    print(f"{method}: calibrated / best of logsnr, karras at NFE 5 = {calibrated / baseline:.3f}")
    assert calibrated < baseline


# -- bad input ---------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(mixture_edm):
    mix, proc, model = mixture_edm
    x = mix.sample_marginal(proc, proc.t_max, 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"method 'gits'.*stochastic.*'euler_ancestral'|'euler_ancestral' is stochastic"):
        cal.grid(model, x, "euler_ancestral", 5)
    with pytest.raises(ValueError, match=r"nfe = 1 is below .*'heun'.*nfe >= 3"):
        cal.grid(model, x, "heun", 1)
    with pytest.raises(ValueError, match=r"nfe = 1 is below .*'ddim'.*nfe >= 2"):
        cal.grid(model, x, "ddim", 1, method="dmn")
    with pytest.raises(TypeError, match="model must be a diffsampler Denoiser"):
        cal.grid(lambda x, t: x, x, "ddim", 5)
    data, _ = mix.sample(8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"x must be start points drawn at the process's t_max.*RMS"):
        cal.grid(model, data, "ddim", 5)
    with pytest.raises(ValueError, match=r"method = 'nope' is unknown; allowed: ays, dmn, gits, oss"):
        cal.grid(model, x, "ddim", 5, method="nope")
    with pytest.raises(ValueError, match="adaptive"):
        cal.grid(model, x, "dpm_adaptive", 5)
    with pytest.raises(ValueError, match="coeff"):
        cal.GITS(coeff=-1.0)
    # AYS accepts a stochastic solver, and its budget still holds
    grid = cal.grid(model, x, "euler_ancestral", 4, method=SMALL["ays"])
    assert len(grid) - 1 == 4
