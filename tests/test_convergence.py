"""Every deterministic solver, against exact answers: empirical convergence order and exactness.

Orders are checked from both sides, each where it shows: the global order of a run from pure noise
(``test_empirical_convergence_order``), or from moderate noise for the solvers whose warm-up caps it
(``test_global_order_of_warm_up_capped_solvers``); the order of the steps from exact multistep history
(``test_step_order``); and the cap of a flow's start at t = 1 (``test_flow_from_t1_on_uniform_grids``).
"""

import functools

import numpy as np
import pytest
import torch

import diffsampler as ds
from conftest import PROCESSES, deterministic_solvers, natural_prediction, rms

STEPS = [16, 32, 64, 128]
MIXTURE = ds.testbeds.random_mixture(2, 3, seed=1)
GAUSSIAN = ds.testbeds.Gaussian([0.3, -0.5], [[0.5, 0.2], [0.2, 0.3]])


# Flows are tested from t = 0.99 on a log-SNR grid here. From t = 1 (alpha = 0) on the usual grid
# uniform in t, the first steps are O(1) long in log-SNR whatever the step count, which caps every
# log-SNR integrator at second order there: test_flow_from_t1_on_uniform_grids pins that down.
CONVERGENCE_PROCESSES = {**PROCESSES, "flow": (lambda: ds.Flow(t_max=0.99), "logsnr")}


def make_process(key):  # noqa: F811 - the convergence tests' own flow
    return CONVERGENCE_PROCESSES[key][0]()


def natural_grid(key, process, steps, **kw):  # noqa: F811
    return ds.grids.get(CONVERGENCE_PROCESSES[key][1], process, steps, **kw)


@functools.lru_cache(maxsize=None)
def _problem(key, testbed):
    """Start points and the exact endpoint of the probability-flow ODE over the natural grid's span."""
    p = make_process(key)
    tb = MIXTURE if testbed == "mixture" else GAUSSIAN
    x_T = p.prior((32, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    g = natural_grid(key, p, 8, end="min")
    if testbed == "mixture":
        ref = tb.ode_reference(p, x_T, g[0], g[-1])
    else:
        ref = tb.flow_map(p, x_T, g[0], g[-1])
    return p, tb, x_T, ref


def measured_order(key, testbed, solver_name):
    p, tb, x_T, ref = _problem(key, testbed)
    model = tb.denoiser(p, natural_prediction(p))
    solver = ds.solvers.resolve(solver_name)
    # A singlestep method of order k spends k grid intervals on one of its steps, so 16 intervals are
    # only 5 or 8 of its steps (measured local slopes of DPM-Solver-3 there: 3.4 to 3.65, settling at
    # 3.0 from 64 intervals on): measure it on twice the intervals.
    steps = [2 * n for n in STEPS] if isinstance(solver, ds.solvers.DPMSolverSinglestep) else STEPS
    if isinstance(solver, ds.solvers.GradientEstimation):
        # Its over-extrapolated derivative (weights 2, -1) keeps it pre-asymptotic for long: local slopes
        # 0.5-0.8 at 16-64 steps, 0.93-0.96 at 256-512. Measure where first order has set in.
        steps = [4 * n for n in STEPS]
    errors = [rms(ds.sample(model, x_T, natural_grid(key, p, n, end="min"), solver), ref) for n in steps]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0], errors


def _warm_up_capped(name):
    solver = ds.solvers.get(name)
    return solver.global_order < solver.order


# From t_max the warm-up steps of a capped solver sit in pure noise, where the estimates hardly change:
# their lower order does not show at these step counts (dpmpp_3m measures 2.6 over 16-128 steps on VP
# linear, lms 3.1, declared global order 2), on the mixture as on a single Gaussian (3.97 for dpmpp_3m).
# So this test takes the solvers whose steps are as good as their run; the capped ones are measured from
# moderate noise, where the cap shows, below.
@pytest.mark.parametrize("solver_name", [n for n in deterministic_solvers() if not _warm_up_capped(n)])
@pytest.mark.parametrize("testbed", ["mixture", "gaussian"])
@pytest.mark.parametrize("key", list(PROCESSES))
def test_empirical_convergence_order(key, testbed, solver_name):
    solver = ds.solvers.get(solver_name)
    order, errors = measured_order(key, testbed, solver_name)
    assert abs(order - solver.global_order) <= 0.3, \
        f"measured order {order:.2f}, declared {solver.global_order}; {errors}"


# -- Orders from moderate noise: the global order of capped runs, and the order of the steps ---------------
#
# The runs below start at alpha = sigma (lambda = 0), from a sample of the mixture's marginal there, on the
# natural grid of the process (the convergence tests' flow: log-SNR from t = 0.99) from that time to t_min.
# The probability-flow ODE from any point is well defined, and the reference is ode_reference from it.

ORDER_STEPS = [64, 128, 256]
# log-SNR, Karras, and a flow's log-SNR grid (the solvers work in lambda or sigma: the VP schedules differ
# only in how t maps to them)
ORDER_PROCESSES = ["vp_scaled_linear", "edm", "flow"]
# Knots given their exact value before the measured part: more than any step reads (a fourth-order step
# 3 past estimates, a corrector the point before the one it corrects).
HISTORY = 7


@functools.lru_cache(maxsize=None)
def _moderate_noise(key):
    """The process, the start time t_a (lambda = 0), 32 samples of the marginal there, and the exact path
    from them (a dict time -> x, filled by _exact)."""
    p = make_process(key)
    t_a = float(p.t_of_lambda(torch.tensor(0.0, dtype=torch.float64)))
    x_a = MIXTURE.sample_marginal(p, t_a, 32, generator=torch.Generator().manual_seed(7))
    return p, t_a, x_a, {t_a: x_a}


def _exact(key, times):
    """The exact solution from the start sample at each of ``times``, each integrated (ode_reference)
    from the nearest earlier time known."""
    p, _, _, path = _moderate_noise(key)
    for t in sorted(set(times) - set(path), reverse=True):
        start = min(s for s in path if s > t)
        path[t] = MIXTURE.ode_reference(p, path[start], start, t)
    return [path[t] for t in times]


def _order_grid(key, p, t_a, steps, spacing):
    if spacing == "equal":  # uniform in the k-diffusion noise level s = ode_sigma
        return ds.grids.karras(p, steps, rho=1.0, end="min", t_max=t_a)
    return natural_grid(key, p, steps, end="min", t_max=t_a)


def _slope(steps, errors):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.parametrize("solver_name", [n for n in deterministic_solvers() if _warm_up_capped(n)])
@pytest.mark.parametrize("key", ORDER_PROCESSES)
def test_global_order_of_warm_up_capped_solvers(key, solver_name):
    """From moderate noise the low-order warm-up (and, for fixed-weight methods, the uneven grid) caps
    the run at its global order; within 0.3 of it, from both sides. (Over 16-128 steps PLMS and F-PNDM
    still measure 2.1-2.5, local slopes falling from 2.6 to 2.0: their fourth-order part fades late, hence
    ORDER_STEPS.)"""
    solver = ds.solvers.get(solver_name)
    p, t_a, x_a, _ = _moderate_noise(key)
    model = MIXTURE.denoiser(p, natural_prediction(p))
    grids = [natural_grid(key, p, n, end="min", t_max=t_a) for n in ORDER_STEPS]
    (ref,) = _exact(key, [float(grids[0][-1])])
    errors = [rms(ds.sample(model, x_a, g, solver), ref) for g in grids]
    order = _slope(ORDER_STEPS, errors)
    assert abs(order - solver.global_order) <= 0.3, (order, errors)


# Methods whose weights are exact only on special grids, with the variable their steps are measured in:
# fixed equal-step Adams-Bashforth weights (iPNDM in ode_sigma; PLMS and F-PNDM in sigma / alpha, the
# variable of DDIM's transfer), fourth order on equal steps and second order on uneven ones; and iPNDM-v,
# whose weights are consistent on equal and geometric steps only (see ipndm_v_weights).
EQUAL_STEP_WEIGHTS = {"ipndm": "ode_sigma", "plms": "sigma/alpha", "pndm": "sigma/alpha"}
GEOMETRIC_STEP_WEIGHTS = {"ipndm_v": "ode_sigma"}


def _spacing_of(knots, variable):
    """"equal", "geometric" or "uneven": the steps of ``knots`` in ``variable``."""
    values = np.array(knots.s if variable == "ode_sigma" else [s / a for s, a in zip(knots.sigma, knots.alpha)])
    d = np.diff(values)
    if np.allclose(d, d[0], rtol=1e-9, atol=0.0):
        return "equal"
    return "geometric" if np.allclose(d[1:] / d[:-1], d[1] / d[0], rtol=1e-9, atol=0.0) else "uneven"


def expected_step_order(name, solver, knots):
    """The order of ``solver``'s steps on the grid of ``knots``; None where none is claimed."""
    if name in EQUAL_STEP_WEIGHTS:
        return solver.order if _spacing_of(knots, EQUAL_STEP_WEIGHTS[name]) == "equal" else 2
    if name in GEOMETRIC_STEP_WEIGHTS:
        return solver.order if _spacing_of(knots, GEOMETRIC_STEP_WEIGHTS[name]) != "uneven" else None
    return solver.order


def measured_step_order(key, solver, spacing="natural"):
    """The order of ``solver``'s steps, from a run whose history is exact.

    The run takes the solver's own steps on the whole grid from t_a, but the sample is replaced by its
    exact value at the HISTORY knots up to knot n/8: every estimate the solver keeps from there is the
    model's answer at an exact point, and the state carries nothing else, so warm-up no longer caps it.
    From knot n/8 on the solver runs freely; its error at knot n/2 against the exact solution is the
    global error over [t_{n/8}, t_{n/2}] (the same times for every n: the grids nest), local errors
    O(h^(p+1)) of steps of order p summed over n/2 - n/8 steps: C h^p (a predictor-corrector's last point
    is a prediction, of local error of that order too). The slope of log error against log n over
    ORDER_STEPS is p. Ending inside the grid keeps out the rules for its end (lower-order final steps, the
    step into t_min), which cap some runs but are not the steps' order.
    """
    p, t_a, x_a, _ = _moderate_noise(key)
    model = MIXTURE.denoiser(p, natural_prediction(p))
    # Singlestep groups of 2 or 3 intervals must start at knots n/8 and n/2: n a multiple of 48. LMS's
    # next error term, of the other sign, keeps its slopes above 4 for long on the flow (local slopes 4.54,
    # 4.32, 4.12 from 64 to 512 steps): it is measured on twice the steps.
    singlestep, lms = isinstance(solver, ds.solvers.DPMSolverSinglestep), isinstance(solver, ds.solvers.LMS)
    scale = 1.5 if singlestep else 2 if lms else 1
    steps = [int(n * scale) for n in ORDER_STEPS]
    errors = []
    for n in steps:
        g = _order_grid(key, p, t_a, n, spacing)
        start, end = n // 8, n // 2
        *history, target = _exact(key, g[start - HISTORY + 1:start + 1].tolist() + [float(g[end])])
        run = ds.Run(model, x_a, g, solver)
        while run.i < start - HISTORY + 1:
            run.step()
        for x in history:
            run.x = x
            run.step()
        while run.i < end:
            run.step()
        errors.append(rms(run.x, target))
    return _slope(steps, errors), errors


STEP_ORDER_CASES = [(key, name, "natural") for key in ORDER_PROCESSES for name in deterministic_solvers()] + [
    (key, name, "equal") for key in ORDER_PROCESSES for name in deterministic_solvers()
    if name in EQUAL_STEP_WEIGHTS or name in GEOMETRIC_STEP_WEIGHTS]


@pytest.mark.parametrize("key, solver_name, spacing", STEP_ORDER_CASES)
def test_step_order(key, solver_name, spacing):
    """Each solver's steps, from exact history (measured_step_order), converge at the order it declares,
    within 0.3 from both sides: on the natural grid, and for the methods of special grids also on one
    uniform in the noise level (Karras with rho = 1). For singlestep solvers the step order is the global
    order; the test still checks it from exact points."""
    solver = ds.solvers.get(solver_name)
    p, t_a, _, _ = _moderate_noise(key)
    expected = expected_step_order(solver_name, solver, ds.solvers.Knots.from_grid(
        p, _order_grid(key, p, t_a, ORDER_STEPS[0], spacing)))
    if expected is None:
        # iPNDM-v's order-4 weights on EDM's Karras grid and the flow's log-SNR grid (uneven in ode_sigma = t):
        # local slopes 3.0, 1.1, 1.7, 1.9 and 1.6, 1.8, 1.9, 1.9 over 32-512 steps, no order to check
        pytest.skip(f"{solver_name} claims no step order on this grid (its weights are not consistent on it)")
    order, errors = measured_step_order(key, solver, spacing)
    assert abs(order - expected) <= 0.3, f"step order {order:.2f}, expected {expected}; {errors}"


@pytest.mark.parametrize("legacy, exact", [(False, True), (True, False)])
@pytest.mark.parametrize("kind", ["x0", "eps"])
def test_third_order_multistep_steps_are_third_order(kind, legacy, exact):
    """A third-order step is exact when the model's estimate (data for DPM-Solver++(3M), noise for
    DPM-Solver-3) is quadratic in log-SNR. Ours are; the weight shipped by the DPM-Solver reference code,
    k-diffusion and diffusers (legacy_third_order) is not."""
    import math
    from scipy.integrate import quad
    from diffsampler.solvers.expint import dpm_solver_weights, dpmpp_weights

    p = ds.VP.linear()
    lams = [-1.0, -0.6, -0.3, -0.1]
    knots = ds.solvers.Knots.from_grid(p, p.t_of_lambda(torch.tensor(lams, dtype=torch.float64)))
    m = lambda lam: 0.2 - 0.3 * lam + 0.7 * lam * lam  # noqa: E731
    x = 0.4
    if kind == "x0":
        A, P, _ = dpmpp_weights(knots, 2, 3, legacy_third_order=legacy)
        s0, s1 = knots.sigma[2], knots.sigma[3]
        want = s1 / s0 * x + s1 * quad(lambda lam: math.exp(lam) * m(lam), lams[2], lams[3], epsabs=1e-14)[0]
    else:
        A, P = dpm_solver_weights(knots, 2, 3, legacy_third_order=legacy)
        a0, a1 = knots.alpha[2], knots.alpha[3]
        want = a1 / a0 * x - a1 * quad(lambda lam: math.exp(-lam) * m(lam), lams[2], lams[3], epsabs=1e-14)[0]
    got = A * x + sum(w * m(lam) for w, lam in zip(P, lams[2::-1]))
    assert (abs(got - want) < 1e-12) == exact


# The first steps from t = 1 have O(1) log-SNR lengths whatever the step count; their errors (of order
# k^(1 - p) / n^2 for the k-th step of a p-th order log-SNR step) sum to O(1 / n^2), O(log n / n^2) for p = 2.
# Over the whole range to t_min the third-order bulk error of the data end hides that cap up to ~256 steps
# (dpmpp_3m 2.6, unipc 2.1-2.4 and rising): the test integrates over the first half, [1, 0.5], where it shows.
FROM_T1_END = 0.5
# PLMS's equal-step weights meet, near t = 1, steps in sigma / alpha = t / (1 - t) whose ratios are O(1):
# local slopes 1.57, 1.61, 1.69, 1.74, 1.78 from 32 to 1024 steps, second order up to slowly fading logs.
FROM_T1_SLACK = {"plms": 0.45}


@functools.lru_cache(maxsize=None)
def _from_t1():
    p = ds.Flow()
    x_T = p.prior((32, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return p, x_T, MIXTURE.ode_reference(p, x_T, 1.0, FROM_T1_END)


@pytest.mark.parametrize("solver_name", deterministic_solvers())
def test_flow_from_t1_on_uniform_grids(solver_name):
    """From t = 1 on a grid uniform in t, every solver converges at its global order but at most second,
    within 0.3 from both sides (the cap of log-SNR steps; t-integrators are capped by their warm-up)."""
    p, x_T, ref = _from_t1()
    model = MIXTURE.denoiser(p, "velocity")
    errors = [rms(ds.sample(model, x_T, ds.grids.uniform(p, n, end="min", t_min=FROM_T1_END), solver_name), ref)
              for n in STEPS]
    slope = _slope(STEPS, errors)
    expected = min(ds.solvers.get(solver_name).global_order, 2)
    assert expected - FROM_T1_SLACK.get(solver_name, 0.3) <= slope <= expected + 0.3, (slope, errors)


def _point_mass():
    return ds.testbeds.Gaussian([0.7, -1.2], torch.zeros(2, 2))


@pytest.mark.parametrize("solver_name", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("key", list(PROCESSES))
@pytest.mark.parametrize("steps", [1, 2, 3, 7])
@pytest.mark.parametrize("end", ["min", "zero"])
def test_data_prediction_integrators_are_exact_for_point_mass_data(solver_name, key, steps, end):
    p = make_process(key)
    point = _point_mass()
    x_T = p.prior((8, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = natural_grid(key, p, steps, end=end)
    x = ds.sample(point.denoiser(p, natural_prediction(p)), x_T, g, solver_name)
    exact = point.flow_map(p, x_T, g[0], g[-1])
    assert (x - exact).abs().max().item() < 1e-10


@pytest.mark.parametrize("key", list(PROCESSES))
def test_euler_is_ddim_with_eta_zero(key):
    p = make_process(key)
    model = MIXTURE.denoiser(p, natural_prediction(p))
    x_T = p.prior((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = natural_grid(key, p, 12)
    torch.testing.assert_close(ds.sample(model, x_T, g, "euler"), ds.sample(model, x_T, g, "ddim"),
                               rtol=1e-11, atol=1e-11)


def test_heun_on_edm_is_the_papers_algorithm():
    """An independent transcription of Karras et al. (2022) Algorithm 1 in sigma: x' = x + dt (d1 + d2) / 2."""
    p = ds.EDM()
    model = MIXTURE.denoiser(p, "x0")
    x_T = p.prior((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = ds.grids.karras(p, 9)
    x = x_T.clone()
    for s, s_next in zip(g[:-1].tolist(), g[1:].tolist()):
        d = (x - model(x, s).x0) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - model(x_next, s_next).x0) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    torch.testing.assert_close(ds.sample(model, x_T, g, "heun"), x, rtol=1e-12, atol=1e-12)


def test_heun_on_flow_integrates_the_velocity_in_t():
    """For flows, Heun is the trapezoidal rule on dx/dt = velocity (diffusers' FlowMatchHeun update)."""
    p = ds.Flow()
    model = MIXTURE.denoiser(p, "velocity")
    x_T = p.prior((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = ds.grids.uniform(p, 9)
    x = x_T.clone()
    for t, t_next in zip(g[:-1].tolist(), g[1:].tolist()):
        u = model(x, t).velocity(p, t)
        x_euler = x + (t_next - t) * u
        x = x_euler if t_next == 0 else x + (t_next - t) * 0.5 * (u + model(x_euler, t_next).velocity(p, t_next))
    torch.testing.assert_close(ds.sample(model, x_T, g, "heun"), x, rtol=1e-12, atol=1e-12)


def test_res_multistep_is_the_published_update():
    """An independent transcription, in EDM sigma, of RES's multistep update (c2 = -h_prev / h,
    b2 = phi2(-h) / c2), against the registered solver."""
    import math
    p = ds.EDM()
    model = MIXTURE.denoiser(p, "x0")
    x_T = p.prior((8, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = ds.grids.karras(p, 9).tolist()
    phi1 = lambda v: math.expm1(v) / v  # noqa: E731
    phi2 = lambda v: (phi1(v) - 1.0) / v  # noqa: E731
    x, old = x_T.clone(), None
    for i in range(len(g) - 1):
        m = model(x, g[i]).x0
        if old is None or g[i + 1] == 0:
            x = x + (x - m) / g[i] * (g[i + 1] - g[i])
        else:
            t, t_next, t_prev = -math.log(g[i]), -math.log(g[i + 1]), -math.log(g[i - 1])
            h = t_next - t
            c2 = (t_prev - t) / h
            b1, b2 = phi1(-h) - phi2(-h) / c2, phi2(-h) / c2
            x = math.exp(-h) * x + h * (b1 * m + b2 * old)
        old = m
    torch.testing.assert_close(ds.sample(model, x_T, g, "res_multistep"), x, rtol=1e-12, atol=1e-12)



def test_ipndm_weights_are_adams_bashforth_for_equal_steps():
    """On equal steps the fixed iPNDM weights are the exact Lagrange integrals (LMS's), and so are
    iPNDM-v's up to order 3. Finding: iPNDM-v's order-4 weights as shipped are (57, -65, 43, -11) / 24
    on equal steps, not Adams-Bashforth's (55, -59, 37, -9) / 24: they integrate cubics wrongly, so
    its order-4 steps are third order."""
    from diffsampler.solvers.lms import AB_EQUAL_STEPS, ipndm_v_weights, lagrange_integrals
    nodes = [4.0, 5.0, 6.0, 7.0]
    for k in (1, 2, 3, 4):
        exact = lagrange_integrals(nodes[:k], 4.0, 3.0)
        assert [-c for c in AB_EQUAL_STEPS[k]] == pytest.approx(exact, rel=1e-12)
        if k < 4:
            assert ipndm_v_weights(nodes[:k], 4.0, 3.0) == pytest.approx(exact, rel=1e-12)
    assert [-24 * c for c in ipndm_v_weights(nodes, 4.0, 3.0)] == pytest.approx([57, -65, 43, -11], rel=1e-12)


def test_ipndm_v_order_four_weights_are_consistent_only_on_geometric_steps():
    """Finding: iPNDM-v's order-4 weights (as shipped by zju-pi's diff-solvers and ComfyUI) sum to the
    step only when successive steps shrink geometrically; on other uneven grids a constant derivative
    is not integrated exactly. Orders 2 and 3 are consistent on any grid."""
    from diffsampler.solvers.lms import ipndm_v_weights
    geometric = [0.8, 1.6, 3.2, 6.4]
    assert sum(ipndm_v_weights(geometric, 0.8, 0.4)) == pytest.approx(-0.4, rel=1e-12)
    uneven = [0.9, 1.7, 3.1, 5.0]
    assert sum(ipndm_v_weights(uneven[:3], 0.9, 0.4)) == pytest.approx(-0.5, rel=1e-12)
    assert abs(sum(ipndm_v_weights(uneven, 0.9, 0.4)) / -0.5 - 1) > 1e-3


@pytest.mark.parametrize("name, order", [("seeds_2", 2), ("seeds_3", 3)])
@pytest.mark.parametrize("key", ["vp_scaled_linear", "edm", "flow"])
def test_seeds_without_noise_converge_at_their_order(key, name, order):
    """SEEDS with eta = 0 are exponential Runge-Kutta methods for the probability-flow ODE."""
    measured, errors = measured_order(key, "mixture", ds.solvers.get(name, eta=0.0))
    assert order - 0.3 < measured < order + 0.3, (measured, errors)


@pytest.mark.parametrize("mode", ["tab", "rhoab"])
@pytest.mark.parametrize("key", list(PROCESSES))
def test_deis_modes_converge_at_their_order(key, mode):
    """DEIS's t-AB and rho-AB (solver_order 3) land between their global order 2 and step order 3."""
    order, errors = measured_order(key, "mixture", ds.solvers.DEIS(solver_order=3, deis_mode=mode))
    assert 1.7 < order < 3.3, (order, errors)


def test_deis_rhoab_is_kdiffusions_lms():
    """The same weights; only the step into t = 0 differs (first order in DEIS, as in diffusers and
    ComfyUI), so the grid stops at the smallest noise here."""
    p = ds.VP.cosine()
    model = MIXTURE.denoiser(p, "eps")
    x_T = p.prior((8, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = ds.grids.karras(p, 12, end="min")
    deis = ds.solvers.DEIS(solver_order=3, deis_mode="rhoab", lower_order_final=False)
    torch.testing.assert_close(ds.sample(model, x_T, g, deis), ds.sample(model, x_T, g, ds.solvers.LMS(3)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", ["vp_linear", "vp_cosine", "edm"])
def test_deis_tab_weights_integrate_polynomials_in_time_exactly(key):
    """A t-AB step of order k is exact when the noise estimate is a polynomial of degree k - 1 in the
    process time: its weights reproduce the integral in rho of that polynomial (scipy's quad on t(rho))."""
    from scipy.integrate import quad
    from diffsampler.solvers.lms import time_lagrange_integrals

    p = make_process(key)
    t_nodes = [0.6, 0.7, 0.8] if key != "edm" else [20.0, 30.0, 45.0]
    lo, hi = float(p.ode_sigma(t_nodes[0])), float(p.ode_sigma(0.8 * t_nodes[0]))
    poly = lambda t: 0.3 - 1.1 * t + 0.7 * t * t  # noqa: E731
    weights = time_lagrange_integrals(p, t_nodes, lo, hi)
    got = sum(w * poly(t) for w, t in zip(weights, t_nodes))
    want = quad(lambda rho: poly(float(p.t_of_ode_sigma(rho))), lo, hi, epsabs=1e-14, epsrel=1e-13)[0]
    assert got == pytest.approx(want, rel=1e-10)


def test_deis_tab_is_rhoab_on_flows():
    """For flows the solver's rho is the time itself, so the two modes are one method."""
    p = ds.Flow()
    model = MIXTURE.denoiser(p, "velocity")
    x_T = p.prior((8, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = ds.grids.uniform(p, 10)
    run = lambda mode: ds.sample(model, x_T, g, ds.solvers.DEIS(solver_order=3, deis_mode=mode))  # noqa: E731
    torch.testing.assert_close(run("tab"), run("rhoab"), rtol=1e-12, atol=1e-12)


SA_DETERMINISTIC = [
    (ds.solvers.SASolver(eta=0.0), 4),                                             # predictor 3, corrector 4
    (ds.solvers.SASolver(predictor_order=3, corrector_order=0, eta=0.0), 3),
    (ds.solvers.SASolver(predictor_order=1, corrector_order=0, eta=0.0), 1),
    (ds.solvers.SASolver(predictor_order=1, corrector_order=2, eta=0.0), 2),
    (ds.solvers.SASolverPECE(eta=0.0), 4),
]


@pytest.mark.parametrize("solver, order", SA_DETERMINISTIC, ids=lambda v: str(v)[:60])
@pytest.mark.parametrize("key", list(PROCESSES))
def test_sa_solver_without_noise_converges_at_its_order(key, solver, order):
    """eta = 0: an Adams predictor-corrector of order max(p, min(c, p + 1)) in its steps; the first-order
    first step caps the global order at 2, so the measured slope lies between."""
    assert solver.order == order
    measured, errors = measured_order(key, "mixture", solver)
    # (the third-order predictor alone measures 3.32 on EDM's Karras grid over 16-128 steps)
    assert solver.global_order - 0.3 < measured < order + 0.4, (measured, errors)


@pytest.mark.parametrize("tau", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_stochastic_adams_weights_integrate_polynomials_exactly(k, tau):
    """The weights reproduce (1 + tau^2) int e^{-(1 + tau^2)(l_t - l)} q(l) dl for any polynomial q of degree
    k - 1 through the k nodes (scipy's quad as the reference)."""
    import math
    from scipy.integrate import quad
    from diffsampler.solvers.sa_solver import stochastic_adams_weights

    nodes = [-0.4, -0.9, -1.3, -1.8][:k]
    l_s, l_t = -0.4, 0.3
    q = lambda lam: 0.5 - 0.8 * lam + 0.3 * lam ** 2 - 0.2 * lam ** 3 if k == 4 else (  # noqa: E731
        0.5 - 0.8 * lam + 0.3 * lam ** 2 if k == 3 else 0.5 - 0.8 * lam if k == 2 else 0.5)
    rate = 1 + tau * tau
    want = quad(lambda lam: rate * math.exp(-rate * (l_t - lam)) * q(lam), l_s, l_t, epsabs=1e-14)[0]
    got = sum(w * q(lam) for w, lam in zip(stochastic_adams_weights(nodes, l_s, l_t, tau), nodes))
    assert got == pytest.approx(want, rel=1e-12)


def test_sa_solver_simple_order_2_weights_keep_the_first_order_total():
    """The simplified order-2 weights (the paper's Appendix D) sum to the first-order weight and differ from
    the exact Lagrange integrals only in the difference term."""
    import math
    from diffsampler.solvers.sa_solver import _simple_order_2, stochastic_adams_weights

    for tau in (0.0, 1.0):
        total = -math.expm1(-(1 + tau * tau) * 0.5)
        for corrector in (False, True):
            w = _simple_order_2(-1.2, -0.7, -0.2, tau, corrector)
            assert sum(w) == pytest.approx(total, rel=1e-14)
            nodes = [-0.2, -0.7] if corrector else [-0.7, -1.2]
            assert w != pytest.approx(stochastic_adams_weights(nodes, -0.7, -0.2, tau), rel=1e-3)


@pytest.mark.parametrize("order, tolerances", [(2, [1e-2, 1e-3, 1e-4]), (3, [1e-3, 1e-4, 1e-5])])
@pytest.mark.parametrize("key", list(PROCESSES))
def test_dpm_adaptive_error_follows_its_tolerance(key, order, tolerances):
    """Over [t_max, t_min] (one grid interval), the endpoint error stays within 10x the tolerance and falls
    with it, and the cost grows as an order-k method's should: about 10^(1/k) times the evaluations for
    a tenth of the tolerance."""
    p, tb, x_T, ref = _problem(key, "mixture")
    g = natural_grid(key, p, 8, end="min")
    errors, nfe = [], []
    for rtol in tolerances:
        model = tb.denoiser(p, natural_prediction(p))
        x = ds.sample(model, x_T, torch.stack([g[0], g[-1]]), ds.solvers.DPMAdaptive(order=order, rtol=rtol,
                                                                                     atol=rtol / 10))
        errors.append(rms(x, ref))
        nfe.append(model.nfe)
    assert all(e < 10 * tol for e, tol in zip(errors, tolerances)), errors
    assert all(a > 4 * b for a, b in zip(errors, errors[1:])), errors
    growth = [b / a for a, b in zip(nfe, nfe[1:])]
    assert all(0.6 < g_ / 10 ** (1 / order) < 1.5 for g_ in growth), (nfe, growth)


@pytest.mark.parametrize("key", ["vp_scaled_linear", "flow"])
def test_dpm_adaptive_passes_through_the_grid_and_denoises_into_zero(key):
    """The grid's knots are points the integration passes: a finer grid only forces more steps (same
    answer within the tolerance); from t = 1 of a flow the first interval is one DDIM step, into t = 0 the
    last returns the data estimate."""
    p = make_process(key)
    model = MIXTURE.denoiser(p, natural_prediction(p))
    x_T = p.prior((16, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solver = ds.solvers.DPMAdaptive(rtol=1e-4, atol=1e-5)
    coarse = natural_grid(key, p, 2, end="zero")
    fine = natural_grid(key, p, 12, end="zero")
    a, b = ds.sample(model, x_T, coarse, solver), ds.sample(model, x_T, fine, solver)
    ref = MIXTURE.ode_reference(p, x_T, fine[0], fine[-2])
    pre = ds.sample(model, x_T, fine[:-1], solver)
    assert rms(pre, ref) < 2e-3
    assert rms(a, b) < 0.05 and bool(torch.isfinite(a).all())
