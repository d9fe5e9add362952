"""Every guidance transform called with one time per sample, checked sample by sample against its definition.

A batch whose samples sit at different times (a ``(B,)`` time tensor), with a guidance interval that
takes in some of them and leaves out others in no particular order, must give for each sample what the
transform's definition gives for that sample alone. The expected answers are written out here from the
un-guided models' answers at each sample's own (float) time, without the library's helpers: the
combination rules, the rescale, the interval's noise level, the CFG++ re-noising, the classifier's
gradient and the x0 corrections are all spelled out in this file.
"""

import pytest
import torch

import diffsampler as ds
from diffsampler.models.nets import DigitsUNet

# Three classes, so that gradient-free guidance has a choice of reference class.
GMM = ds.testbeds.GaussianMixture(
    [[1.5, 0.0, -0.5], [-1.5, 1.0, 0.0], [0.0, -2.0, 1.0], [0.5, 1.5, 1.5]],
    [0.3, 0.2, 0.4, 0.25], [0.3, 0.2, 0.3, 0.2], labels=[0, 1, 2, 1])
WEAK = ds.testbeds.GaussianMixture(GMM.means, GMM.covs * 2.5, GMM.weights, labels=[0, 1, 2, 1])
NULL = GMM.NULL_LABEL

# Where each sample's time sits in the process's range; the interval spans levels 0.25 to 0.7 of it.
# Inside: samples 2, 4, 5, 7 (not a contiguous block, and not symmetric under reversal of the batch).
FRACTIONS = [0.9, 0.15, 0.6, 0.05, 0.45, 0.3, 0.75, 0.5]
INTERVAL_FRACTIONS = (0.7, 0.25)
INSIDE = [False, False, True, False, True, True, False, True]
LABELS = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])

PROCESSES = {"vp": ds.VP.scaled_linear, "edm": ds.EDM, "flow": ds.Flow}
PREDICTION = {"vp": "eps", "edm": "x0", "flow": "velocity"}


def _time(p, f: float) -> float:
    """The time a fraction ``f`` of the way through the process's range (geometric in sigma for EDM)."""
    if isinstance(p, ds.EDM):
        return p.t_min ** (1 - f) * p.t_max ** f
    return p.t_min + f * (p.t_max - p.t_min)


def _level(p, t: float) -> float:
    """The noise level the guidance interval is stated in: EDM's sigma, ``sigma / alpha``, for VP and EDM; for
    flows the k-diffusion (and ComfyUI) convention, ``t`` itself (``Flow.ode_sigma``)."""
    if isinstance(p, ds.Flow):
        return t
    return float(p.sigma(t)) / float(p.alpha(t))


def _setup(key):
    p = PROCESSES[key]()
    times = [_time(p, f) for f in FRACTIONS]
    interval = tuple(_level(p, _time(p, f)) for f in INTERVAL_FRACTIONS)
    assert [interval[1] < _level(p, t) <= interval[0] for t in times] == INSIDE
    x = torch.randn(len(times), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 1.5
    return p, torch.tensor(times, dtype=torch.float64), interval, x


def _one(model, x, t, k, label):
    """The answer of ``model`` for sample ``k`` alone, at its own time as a Python float."""
    pred = model(x[k:k + 1], float(t[k]), label=torch.tensor([label]))
    return pred.x0[0], pred.eps[0]


def _std(v):
    return v.flatten().std()  # the sample's standard deviation over all its values (unbiased)


def _cfg_expected(p, x, t, k, c, u, scale, inside, rescale=0.0, space="x0"):
    """(x0, eps, renoise) of classifier-free guidance for sample ``k`` from its conditional ``c`` and
    unconditional ``u`` answers ((x0, eps) pairs)."""
    a, s = float(p.alpha(float(t[k]))), float(p.sigma(float(t[k])))
    if not inside:
        # Outside the interval the sample is not guided: the conditional answer, and CFG++ re-noises with the
        # conditional eps, so its step is plain DDIM's (as a float time outside the interval gives: the model's
        # own answer, without renoise, which the CFG++ solvers re-noise with its eps).
        return c[0], c[1], c[1]
    x0 = u[0] + scale * (c[0] - u[0])
    eps = u[1] + scale * (c[1] - u[1])
    if rescale:
        if space == "x0":
            matched = x0 * _std(c[0]) / _std(x0)
            x0 = rescale * matched + (1 - rescale) * x0
            eps = (x[k] - a * x0) / s
        else:
            matched = eps * _std(c[1]) / _std(eps)
            eps = rescale * matched + (1 - rescale) * eps
            x0 = (x[k] - s * eps) / a
    # CFG++ (Chung et al. 2024, Algorithm 1): the guided x0, re-noised with the unconditional eps
    return x0, eps, u[1]


def _check(out, k, x0, eps, what):
    torch.testing.assert_close(out.x0[k], x0, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}, sample {k} x0: {m}")
    torch.testing.assert_close(out.eps[k], eps, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}, sample {k} eps: {m}")


CFG_CASES = {
    "plain": {},
    "rescale_x0": {"rescale": 0.7, "space": "x0"},
    "rescale_eps": {"rescale": 0.7, "space": "eps"},
}


@pytest.mark.parametrize("key", list(PROCESSES))
@pytest.mark.parametrize("case", list(CFG_CASES))
@pytest.mark.parametrize("plus_plus", [False, True], ids=["cfg", "cfg++"])
def test_cfg_with_an_interval_is_its_definition_sample_by_sample(key, case, plus_plus):
    p, t, interval, x = _setup(key)
    model = GMM.denoiser(p, PREDICTION[key])
    opts = CFG_CASES[case]
    scale = 0.6 if plus_plus else 3.0  # CFG++'s lambda is in [0, 1]
    guided = ds.guidance.cfg(model, scale, rescale=opts.get("rescale", 0.0), rescale_space=opts.get("space", "x0"),
                             interval=interval, plus_plus=plus_plus)
    out = guided(x, t, label=LABELS)
    if not plus_plus:
        assert out.renoise is None
    for k in range(len(x)):
        c = _one(model, x, t, k, int(LABELS[k]))
        u = _one(model, x, t, k, NULL)
        x0, eps, renoise = _cfg_expected(p, x, t, k, c, u, scale, INSIDE[k], opts.get("rescale", 0.0),
                                         opts.get("space", "x0"))
        _check(out, k, x0, eps, f"cfg {case}")
        if plus_plus:
            torch.testing.assert_close(out.renoise[k], renoise, rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"cfg++ re-noise, sample {k} (inside: {INSIDE[k]}): {m}")


@pytest.mark.parametrize("key", list(PROCESSES))
def test_cfg_pp_without_an_interval_renoises_every_sample_with_its_unconditional_eps(key):
    p, t, _, x = _setup(key)
    model = GMM.denoiser(p, PREDICTION[key])
    out = ds.guidance.cfg(model, 0.4, plus_plus=True)(x, t, label=LABELS)
    for k in range(len(x)):
        c, u = _one(model, x, t, k, int(LABELS[k])), _one(model, x, t, k, NULL)
        x0, eps, renoise = _cfg_expected(p, x, t, k, c, u, 0.4, True)
        _check(out, k, x0, eps, "cfg++")
        torch.testing.assert_close(out.renoise[k], renoise, rtol=1e-9, atol=1e-9)


def test_an_interval_that_excludes_every_sample_is_the_conditional_model():
    p, t, _, x = _setup("vp")
    model = GMM.denoiser(p, "eps")
    high = _level(p, _time(p, 0.01)) * 0.999
    out = ds.guidance.cfg(model, 0.5, interval=(high, high / 2), plus_plus=True)(x, t, label=LABELS)
    for k in range(len(x)):
        c = _one(model, x, t, k, int(LABELS[k]))
        _check(out, k, c[0], c[1], "cfg++ outside everywhere")
        renoise = c[1] if out.renoise is None else out.renoise[k]  # no renoise: the solver re-noises with eps
        torch.testing.assert_close(renoise, c[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("key", list(PROCESSES))
def test_autoguidance_is_its_definition_sample_by_sample(key):
    p, t, _, x = _setup(key)
    good, weak = GMM.denoiser(p, PREDICTION[key]), WEAK.denoiser(p, PREDICTION[key])
    out = ds.guidance.autoguidance(good, weak, 2.5)(x, t, label=LABELS)
    for k in range(len(x)):
        g, w = _one(good, x, t, k, int(LABELS[k])), _one(weak, x, t, k, int(LABELS[k]))
        _check(out, k, w[0] + 2.5 * (g[0] - w[0]), w[1] + 2.5 * (g[1] - w[1]), "autoguidance")


@pytest.mark.parametrize("key", list(PROCESSES))
def test_cfg_pp_of_autoguidance_with_an_interval_sample_by_sample(key):
    """A composition: CFG++ with an interval over autoguidance, both evaluated per sample."""
    p, t, interval, x = _setup(key)
    good, weak = GMM.denoiser(p, PREDICTION[key]), WEAK.denoiser(p, PREDICTION[key])
    s, lam = 1.5, 0.7
    out = ds.guidance.cfg(ds.guidance.autoguidance(good, weak, s), lam, interval=interval,
                          plus_plus=True)(x, t, label=LABELS)

    def auto(k, label):
        g, w = _one(good, x, t, k, label), _one(weak, x, t, k, label)
        return w[0] + s * (g[0] - w[0]), w[1] + s * (g[1] - w[1])

    for k in range(len(x)):
        x0, eps, renoise = _cfg_expected(p, x, t, k, auto(k, int(LABELS[k])), auto(k, NULL), lam, INSIDE[k])
        _check(out, k, x0, eps, "cfg++ of autoguidance")
        torch.testing.assert_close(out.renoise[k], renoise, rtol=1e-9, atol=1e-9)


def _log_class_posterior_gradient(p, xk, tk: float, label: int):
    """grad_x log p(label | x_t) at one sample, from the mixture's exact class posterior."""
    xg = xk[None].clone().requires_grad_(True)
    log_post = GMM.class_posterior(xg, p, tk).log()[0, label]
    (grad,) = torch.autograd.grad(log_post, xg)
    return grad[0]


@pytest.mark.parametrize("key", list(PROCESSES))
@pytest.mark.parametrize("condition_model", [False, True])
def test_classifier_guidance_is_its_definition_sample_by_sample(key, condition_model):
    p, t, _, x = _setup(key)
    model = GMM.denoiser(p, PREDICTION[key])
    scale = 2.0
    out = ds.guidance.classifier_guidance(model, GMM.noisy_classifier(p), scale,
                                          condition_model=condition_model)(x, t, label=LABELS)
    for k in range(len(x)):
        tk = float(t[k])
        a, s = float(p.alpha(tk)), float(p.sigma(tk))
        base = _one(model, x, t, k, int(LABELS[k]) if condition_model else NULL)
        # eps - scale sigma grad log p(y | x_t)  (Dhariwal & Nichol 2021, in the score form)
        eps = base[1] - scale * s * _log_class_posterior_gradient(p, x[k], tk, int(LABELS[k]))
        _check(out, k, (x[k] - s * eps) / a, eps, "classifier guidance")


@pytest.mark.parametrize("adaptive", [True, False])
def test_gradient_free_guidance_is_its_definition_sample_by_sample(adaptive):
    p, t, _, x = _setup("vp")
    model = GMM.denoiser(p, "eps")

    def clean(x0):
        return GMM.class_posterior(x0, p, p.t_min).log()

    scale = 1.5
    out = ds.guidance.gradient_free_guidance(model, clean, scale, adaptive=adaptive)(x, t, label=LABELS)
    refs = set()
    for k in range(len(x)):
        target = int(LABELS[k])
        c = _one(model, x, t, k, target)
        probs = GMM.class_posterior(c[0][None], p, p.t_min)[0]
        ref = max((j for j in range(GMM.n_classes) if j != target), key=lambda j: float(probs[j]))
        refs.add(ref)
        w = scale * float(probs[ref]) / float(probs[ref] + probs[target]) if adaptive else scale
        r = _one(model, x, t, k, ref)
        _check(out, k, c[0] + w * (c[0] - r[0]), c[1] + w * (c[1] - r[1]), "gradient-free guidance")
    assert len(refs) > 1  # the reference class differs between samples


@pytest.mark.parametrize("transform", ["clip", "threshold"])
def test_x0_corrections_are_their_definitions_sample_by_sample(transform):
    p, t, _, x = _setup("vp")
    model = GMM.denoiser(p, "eps")
    x = x * 2
    if transform == "clip":
        out = ds.guidance.clip_x0(model, 1.0)(x, t, label=LABELS)
    else:
        out = ds.guidance.dynamic_threshold(model, 0.5, 1.6)(x, t, label=LABELS)
    for k in range(len(x)):
        tk = float(t[k])
        raw = _one(model, x, t, k, int(LABELS[k]))[0]
        if transform == "clip":
            x0 = raw.clamp(-1.0, 1.0)
        else:
            # Imagen: s = the ratio-quantile of |x0| clamped to [1, max], then clamp(x0, -s, s) / s
            level = min(max(float(torch.quantile(raw.abs(), 0.5)), 1.0), 1.6)
            x0 = raw.clamp(-level, level) / level
        eps = (x[k] - float(p.alpha(tk)) * x0) / float(p.sigma(tk))
        _check(out, k, x0, eps, transform)
    assert (out.x0 - model(x, t, label=LABELS).x0).abs().max() > 0.1  # the correction acted


@pytest.mark.parametrize("transform", ["clip", "threshold"])
def test_x0_corrections_of_cfg_pp_keep_its_renoise_sample_by_sample(transform):
    """A corrected CFG++ answer is still re-noised with the unconditional eps (inside the interval) and the
    conditional one (outside): the correction changes the data estimate only."""
    p, t, interval, x = _setup("vp")
    model = GMM.denoiser(p, "eps")
    x = x * 2
    inner = ds.guidance.cfg(model, 0.8, interval=interval, plus_plus=True)
    if transform == "clip":
        outer = ds.guidance.clip_x0(inner, 1.0)
    else:
        outer = ds.guidance.dynamic_threshold(inner, 0.5, 1.6)
    out = outer(x, t, label=LABELS)
    assert out.renoise is not None
    for k in range(len(x)):
        tk = float(t[k])
        c, u = _one(model, x, t, k, int(LABELS[k])), _one(model, x, t, k, NULL)
        raw, _, renoise = _cfg_expected(p, x, t, k, c, u, 0.8, INSIDE[k])
        if transform == "clip":
            x0 = raw.clamp(-1.0, 1.0)
        else:
            level = min(max(float(torch.quantile(raw.abs(), 0.5)), 1.0), 1.6)
            x0 = raw.clamp(-level, level) / level
        _check(out, k, x0, (x[k] - float(p.alpha(tk)) * x0) / float(p.sigma(tk)), f"{transform} of cfg++")
        torch.testing.assert_close(out.renoise[k], renoise, rtol=1e-9, atol=1e-9)


def _digits_model():
    torch.manual_seed(0)
    net = DigitsUNet(channels=(8, 16), emb=16).eval().requires_grad_(False)
    return ds.Denoiser(net, ds.VP.cosine(), "eps", null=ds.models.null_label)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_perturbed_attention_is_its_definition_sample_by_sample(cfg_scale):
    model = _digits_model()
    p = model.process
    t = torch.tensor([_time(p, f) for f in FRACTIONS[:5]], dtype=torch.float64)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    label = torch.tensor([3, 1, 4, 1, 5])
    scale = 2.5
    with torch.no_grad():
        out = ds.guidance.perturbed_attention(model, scale, cfg_scale=cfg_scale)(x, t, label=label)
        attention = model.fn.attn_mid
        for k in range(len(x)):
            c = _one(model, x, t, k, int(label[k]))
            u = _one(model, x, t, k, ds.models.NULL_LABEL)
            attention.perturbed = True  # identity attention in the middle block: the perturbed pass
            try:
                q = _one(model, x, t, k, int(label[k]))
            finally:
                attention.perturbed = False
            x0 = u[0] + cfg_scale * (c[0] - u[0]) + scale * (c[0] - q[0])
            eps = u[1] + cfg_scale * (c[1] - u[1]) + scale * (c[1] - q[1])
            torch.testing.assert_close(out.x0[k], x0, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out.eps[k], eps, rtol=1e-4, atol=1e-4)
            assert (q[1] - c[1]).abs().max() > 1e-3  # the perturbation changes this sample's answer


def test_perturbed_attention_refuses_an_adaptive_scale_with_per_sample_times():
    model = _digits_model()
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    with pytest.raises(ValueError, match="adaptive_scale needs one time"):
        ds.guidance.perturbed_attention(model, 2.0, adaptive_scale=0.001)(torch.zeros(2, 1, 8, 8), t,
                                                                          label=torch.tensor([1, 2]))
