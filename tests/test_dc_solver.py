"""DC-Solver: UniPC with dynamic compensation, its ratio search and the cascade polynomial regression."""

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler.calibrate.dc import fit_cpr, fit_ratios, predict_ratios, reference_trajectory
from diffsampler.solvers.dc_solver import compensation_weights
from conftest import rms

torch.set_num_threads(1)

MIXTURE = ds.testbeds.random_mixture(2, 4, seed=3)


def setup(steps=6, n=32, seed=0):
    p = ds.VP.scaled_linear()
    model = MIXTURE.denoiser(p, "eps")
    x = p.prior((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return p, model, x, ds.grids.logsnr(p, steps, end="min")


@pytest.mark.parametrize("opts", [{}, {"solver_order": 3, "variant": "bh1"}, {"corrector": False}])
def test_all_ratios_one_is_unipc_bitwise(opts):
    p, model, x, g = setup(8)
    a = ds.sample(model, x, g, ds.solvers.get("dc_solver", ratios=(1.0,) * 8, **opts))
    b = ds.sample(model, x, g, ds.solvers.get("unipc", **opts))
    assert torch.equal(a, b)
    assert torch.equal(ds.sample(model, x, g, ds.solvers.get("dc_solver", **opts)), b)


def test_compensation_is_the_lagrange_interpolant():
    """Independently: the quadratic through three (t, m) points evaluated at t~; rho = 1 is the identity."""
    t = (0.9, 0.6, 0.35, 0.2)
    for rho in (0.7, 1.3):
        w = compensation_weights(t, 3, rho, 2)
        t_comp = t[2] + rho * (t[3] - t[2])
        for m in (lambda s: 1.0, lambda s: s, lambda s: 3 * s * s - s + 2):  # exact for degree <= 2
            got = sum(wk * m(t[3 - k]) for k, wk in enumerate(w))
            assert abs(got - m(t_comp)) < 1e-12
    assert compensation_weights(t, 3, 1.0, 2) is None and compensation_weights(t, 1, 0.8, 2) is None


def test_compensated_run_matches_a_direct_implementation():
    """The folded weights against compensating the history by hand and running UniPC's update."""
    p, model, x, g = setup(5)
    ratios = (1.0, 1.0, 0.8, 1.2, 0.9)
    got = ds.sample(model, x, g, ds.solvers.get("dc_solver", ratios=ratios, corrector=False, solver_order=2))
    knots = ds.solvers.Knots.from_grid(p, g)
    from diffsampler.solvers.expint import unipc_weights, dpmpp_weights
    from diffsampler.solvers.multistep import step_orders
    orders = step_orders(knots, 2, "always")
    ms, xs = [], x
    for i in range(5):
        m = model(xs, knots.t[i]).x0
        if i >= 2 and ratios[i] != 1.0:
            tc = knots.t[i - 1] + ratios[i] * (knots.t[i] - knots.t[i - 1])
            nodes, vals = [knots.t[i], knots.t[i - 1], knots.t[i - 2]], [m, ms[-1], ms[-2]]
            m = sum(v * np.prod([(tc - nodes[j]) / (nodes[k] - nodes[j]) for j in range(3) if j != k])
                    for k, v in enumerate(vals))
        ms.append(m)
        if knots.sigma[i + 1] == 0.0:
            A, P, _ = dpmpp_weights(knots, i, 1)
        else:
            A, P, _ = unipc_weights(knots, i, orders[i], "bh2")
        xs = A * xs + sum(w * ms[-1 - j] for j, w in enumerate(P))
    assert torch.allclose(got, xs, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("objective,steps,bound", [("endpoint", 6, 0.9), ("step", 5, 0.95)])
def test_fitted_ratios_reduce_the_endpoint_error_on_held_out_points(objective, steps, bound):
    p = ds.VP.scaled_linear()
    model = MIXTURE.denoiser(p, "eps")
    x = p.prior((128, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = ds.grids.uniform(p, steps, end="min")
    # the exact probability-flow solution at every knot
    ref = torch.stack([x] + [MIXTURE.ode_reference(p, x, g[0], t) for t in g[1:].tolist()])
    ratios = fit_ratios(model, x, g, ref, objective=objective)
    assert len(ratios) == steps and ratios[:2] == (1.0, 1.0) and any(r != 1.0 for r in ratios)
    held = p.prior((64, 2), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    target = MIXTURE.ode_reference(p, held, g[0], g[-1])
    err_dc = rms(ds.sample(model, held, g, ds.solvers.get("dc_solver", ratios=ratios)), target)
    err_base = rms(ds.sample(model, held, g, "unipc"), target)
    assert err_dc < bound * err_base, (err_dc, err_base, ratios)


def test_reference_trajectory_is_the_ode_solution():
    """Against the exact solution at every knot, converging as the substeps grow (second order: each
    interval's solve starts with a first-order step)."""
    p, model, x, g = setup(4, n=8)
    exact = torch.stack([x] + [MIXTURE.ode_reference(p, x, g[0], t) for t in g[1:].tolist()])
    errors = [(reference_trajectory(model, x, g, substeps=n) - exact).abs().max().item() for n in (24, 64)]
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 4, errors


def test_cpr_recovers_a_cascade_it_can_represent():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(3, 3, 3)) * 0.1
    from diffsampler.calibrate.dc import CPR
    cpr_true = CPR(truth)
    tables = [(n, predict_ratios(cpr_true, n, g), g) for n in (5, 6, 8, 10, 12, 15) for g in (1.0, 4.0, 7.5)]
    fitted = fit_cpr(tables, degree=2)
    for n, g in ((7, 3.0), (20, 9.0)):
        assert np.allclose(predict_ratios(fitted, n, g), predict_ratios(cpr_true, n, g), atol=1e-8)
    assert predict_ratios(fitted, 7)[:2] == (1.0, 1.0)


def test_bad_input():
    p, model, x, g = setup(5, n=4)
    with pytest.raises(ValueError, match="ratios has 3 entries for a grid of 5 steps"):
        ds.sample(model, x, g, ds.solvers.get("dc_solver", ratios=(1.0, 1.0, 0.9)))
    with pytest.raises(ValueError, match="first dc_order"):
        ds.sample(model, x, g, ds.solvers.get("dc_solver", ratios=(0.9, 1.0, 1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="ratios"):
        ds.solvers.get("dc_solver", ratios=[1.0, float("nan")])
    with pytest.raises(ValueError, match="dc_order"):
        ds.solvers.get("dc_solver", dc_order=0)
    with pytest.raises(ValueError, match="reference must hold"):
        fit_ratios(model, x, g, torch.zeros(3, 4, 2))
    with pytest.raises(ValueError, match="objective"):
        fit_ratios(model, x, g, torch.zeros(6, 4, 2), objective="final")
    with pytest.raises(ValueError, match="bounds"):
        fit_ratios(model, x, g, torch.zeros(6, 4, 2), bounds=(1.1, 2.0))
    with pytest.raises(ValueError, match="one per step"):
        fit_cpr([(5, (1.0, 1.0, 0.9))])
    with pytest.raises(ValueError, match="steps"):
        predict_ratios(fit_cpr([(5, (1.0,) * 5)]), 0)


def test_cpr_keeps_the_solvers_dc_order():
    from diffsampler.calibrate.dc import fit_cpr, predict_ratios
    tables = [(steps, [1.0] * 3 + [1.0 + 0.01 * i for i in range(steps - 3)]) for steps in (6, 8, 10)]
    cpr = fit_cpr(tables, degree=1, dc_order=3)
    assert cpr.dc_order == 3 and predict_ratios(cpr, 7)[:3] == (1.0, 1.0, 1.0)
    ds.solvers.get("dc_solver", dc_order=3, ratios=predict_ratios(cpr, 7))  # accepted by the solver it was fitted for
