import pytest
import torch

import diffsampler as ds
from conftest import PROCESSES, make_process


def _gmm():
    return ds.testbeds.random_mixture(3, 3, seed=5)


@pytest.mark.parametrize("key", list(PROCESSES))
@pytest.mark.parametrize("prediction", ds.PREDICTIONS)
def test_every_prediction_type_gives_the_same_x0_and_eps(key, prediction):
    """Round trip: the exact model expressed in any parameterisation converts back to the same (x0, eps)."""
    p = make_process(key)
    gmm = _gmm()
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in (p.t_min * 3, 0.5 * (p.t_min + p.t_max), p.t_max * 0.98):
        ref = gmm.x0(x, p, t)
        pred = gmm.denoiser(p, prediction)(x, t)
        torch.testing.assert_close(pred.x0, ref, rtol=1e-9, atol=1e-10)
        a, s = float(p.alpha(t)), float(p.sigma(t))
        torch.testing.assert_close(x, a * pred.x0 + s * pred.eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", ds.PREDICTIONS)
def test_prediction_as_inverts_convert(prediction):
    p = ds.VP.linear()
    g = torch.Generator().manual_seed(2)
    x, x0 = torch.randn(8, 5, dtype=torch.float64, generator=g), torch.randn(8, 5, dtype=torch.float64, generator=g)
    t = 0.37
    eps = (x - float(p.alpha(t)) * x0) / float(p.sigma(t))
    out = ds.Prediction(x0, eps).as_(prediction, p, t)
    back = ds.denoiser.convert_prediction(out, x, prediction, p, t)
    torch.testing.assert_close(back.x0, x0)
    torch.testing.assert_close(back.eps, eps)


def test_score_and_velocity_match_their_definitions():
    """score = grad log p_t (autograd through the exact density); velocity is the probability-flow drift."""
    p = ds.VP.cosine()
    gmm = _gmm()
    t = 0.4
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    grad, = torch.autograd.grad(gmm.log_prob(x, p, t).sum(), x)
    pred = gmm.denoiser(p, "eps")(x.detach(), t)
    torch.testing.assert_close(pred.score(p, t), grad, rtol=1e-8, atol=1e-10)
    # PF-ODE drift: dx/dt = f x - g^2/2 score with f = dlog(alpha)/dt, g^2 = d(sigma^2)/dt - 2 f sigma^2
    a, s, da, dsg = (float(v) for v in (p.alpha(t), p.sigma(t), p.d_alpha(t), p.d_sigma(t)))
    f = da / a
    g2 = 2 * s * dsg - 2 * f * s * s
    drift = f * x.detach() - 0.5 * g2 * grad
    torch.testing.assert_close(pred.velocity(p, t), drift, rtol=1e-8, atol=1e-10)


def test_nfe_counting_time_input_and_conditioning():
    seen = {}

    def net(x, time, label=None):
        seen["time"], seen["label"] = time, label
        return torch.zeros_like(x)

    p = ds.VP.linear_discrete()
    model = ds.Denoiser(net, p, "eps")
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
    model(x, 0.5, label=7)
    model(x, 0.001, label=7)
    assert model.nfe == 2
    assert seen["label"] == 7
    assert seen["time"].shape == (4,) and seen["time"].dtype == torch.float32
    torch.testing.assert_close(seen["time"], torch.full((4,), 0.0))  # t = 1/N is timestep 0
    model(x.double(), 0.5)
    assert seen["time"].dtype == torch.float64 and float(seen["time"][0]) == 499.0


def test_custom_time_input():
    got = []
    model = ds.Denoiser(lambda x, tt: got.append(tt) or torch.zeros_like(x), ds.Flow(), "velocity",
                        time_input=lambda t: 1000 * t)
    model(torch.zeros(2, 3), 0.25)
    assert float(got[0][0]) == 250.0


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="prediction must be one of"):
        ds.Denoiser(lambda x, t: x, ds.EDM(), "noise")
    with pytest.raises(TypeError, match="process"):
        ds.Denoiser(lambda x, t: x, "vp", "eps")
    with pytest.raises(TypeError, match="callable"):
        ds.Denoiser(3, ds.EDM(), "eps")
    bad = ds.Denoiser(lambda x, t: x[:, :1], ds.EDM(), "x0", name="half")
    with pytest.raises(ValueError, match=r"returned \(2, 1\) for an input of shape \(2, 3\)"):
        bad(torch.zeros(2, 3), 1.0)


@pytest.mark.parametrize("key", ["vp_scaled_linear", "edm", "flow"])
@pytest.mark.parametrize("prediction", ds.PREDICTIONS)
@pytest.mark.parametrize("kind", ["x0", "eps"])
def test_combine_folds_an_unformed_estimate_exactly(key, prediction, kind):
    """combine() takes an estimate nobody has read from the network output it derives from; the result
    is the combination of the formed estimates, whether the answer was at the base sample or elsewhere."""
    from diffsampler.solvers.base import combine

    p = make_process(key)
    model = _gmm().denoiser(p, prediction)
    g = torch.Generator().manual_seed(4)
    x, y, z = (torch.randn(16, 3, dtype=torch.float64, generator=g) for _ in range(3))
    t, u = 0.6 * p.t_max + 0.4 * p.t_min, 0.3 * p.t_max + 0.7 * p.t_min

    def estimate(pred):
        return pred.x0 if kind == "x0" else pred.eps

    folded = combine(x, 0.7, ((0.3, model(x, t)), (-0.2, model(y, u)), (0.5, z), (0.0, model(y, t))), kind)
    formed = 0.7 * x + 0.3 * estimate(model(x, t)) - 0.2 * estimate(model(y, u)) + 0.5 * z
    torch.testing.assert_close(folded, formed, rtol=1e-12, atol=1e-12)
    # a form read before is used as it is
    read = model(x, t)
    estimate(read)
    torch.testing.assert_close(combine(x, 0.7, ((0.3, read),), kind), 0.7 * x + 0.3 * estimate(read),
                               rtol=1e-12, atol=1e-12)


def test_an_undefined_form_is_harmless_until_read():
    """At t = 1 of a flow an eps network's x0 is undefined (alpha = 0): the answer still carries eps, a
    weight of zero on x0 leaves the combination finite, and reading x0 gives NaN, not an exception."""
    from diffsampler.solvers.base import combine

    p = ds.Flow()
    model = ds.Denoiser(lambda x, t: 0.5 * x, p, "eps")
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    pred = model(x, 1.0)
    torch.testing.assert_close(pred.eps, 0.5 * x)
    assert torch.equal(combine(x, 1.0, ((0.0, pred),)), x)
    assert torch.isnan(model(x, 1.0).x0).all()


def test_per_sample_times_give_the_scalar_answers():
    p = ds.VP.cosine()
    gmm = _gmm()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    times = torch.linspace(0.2, 0.8, 6, dtype=torch.float64)
    for prediction in ds.PREDICTIONS:
        model = gmm.denoiser(p, prediction)
        batch = model(x, times)
        for k, t in enumerate(times.tolist()):
            one = model(x[k:k + 1], t)
            torch.testing.assert_close(batch.x0[k:k + 1], one.x0, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(batch.eps[k:k + 1], one.eps, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prediction", ds.PREDICTIONS)
def test_extrapolating_two_answers_mixes_their_outputs_exactly(prediction):
    """Guidance's u + w (c - u): from two answers of one network type it mixes the raw outputs, and gives
    what mixing the formed estimates gives; answers of different types fall back to the formed estimates."""
    p = ds.VP.cosine()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 3, dtype=torch.float64, generator=g)
    a, b = (ds.testbeds.random_mixture(3, 3, seed=s) for s in (5, 6))
    t = 0.45
    for other in (prediction, "x0" if prediction != "x0" else "eps"):
        u, c = a.denoiser(p, prediction)(x, t), b.denoiser(p, other)(x, t)
        mixed = ds.Prediction.extrapolate(u, c, 4.5, x)
        u, c = a.denoiser(p, prediction)(x, t), b.denoiser(p, other)(x, t)
        torch.testing.assert_close(mixed.x0, u.x0 + 4.5 * (c.x0 - u.x0), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mixed.eps, u.eps + 4.5 * (c.eps - u.eps), rtol=1e-10, atol=1e-10)
    halves = a.denoiser(p, prediction)(torch.cat([x, 2 * x]), t).chunk(2)
    torch.testing.assert_close(halves[1].x0, a.denoiser(p, prediction)(2 * x, t).x0, rtol=1e-12, atol=1e-12)
