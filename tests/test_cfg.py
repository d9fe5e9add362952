"""Classifier-free guidance: its definition, rescale, interval, batching and composition.

The class-conditional Gaussian mixture's exact denoiser is the model; its null
label gives the unconditional mixture exactly.
"""

import pytest
import torch

import diffsampler as ds
from conftest import SOLVER_CONFIGS, config_id

GMM = ds.testbeds.GaussianMixture([[2.0, 0.0], [-1.5, 1.5], [0.0, -2.0]], [0.3, 0.2, 0.4], labels=[0, 1, 1])


class Counting:
    """A Denoiser's network that records the batch sizes it was called with."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, x, time, **cond):
        self.batches.append(x.shape[0])
        return self.model.fn(x, time, **cond)


def _setup(prediction="eps", process=None):
    p = process or ds.VP.scaled_linear()
    base = GMM.denoiser(p, prediction)
    net = Counting(base)
    model = ds.Denoiser(net, p, prediction, time_input=base.time_input, null=base.null)
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    label = torch.tensor([0, 1, 0, 1, 1, 0])
    return p, model, net, x, label


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "velocity"])
def test_cfg_is_its_definition_in_one_network_call(prediction):
    p, model, net, x, label = _setup(prediction, ds.Flow() if prediction == "velocity" else None)
    t = 0.5
    c = model(x, t, label=label)
    u = model(x, t, label=torch.full_like(label, GMM.NULL_LABEL))
    net.batches.clear()
    g = ds.guidance.cfg(model, 3.5)(x, t, label=label)
    assert net.batches == [12]  # both passes in one call on a doubled batch
    torch.testing.assert_close(g.x0, u.x0 + 3.5 * (c.x0 - u.x0))
    torch.testing.assert_close(g.eps, u.eps + 3.5 * (c.eps - u.eps))
    torch.testing.assert_close(float(p.alpha(t)) * g.x0 + float(p.sigma(t)) * g.eps, x)


def test_scale_one_is_the_conditional_model_exactly_and_costs_one_pass():
    _, model, net, x, label = _setup()
    c = model(x, 0.3, label=label)
    net.batches.clear()
    g = ds.guidance.cfg(model, 1.0)(x, 0.3, label=label)
    assert net.batches == [6]
    assert torch.equal(g.x0, c.x0) and torch.equal(g.eps, c.eps)


def test_guidance_interval_uses_the_conditional_model_outside():
    p, model, net, x, label = _setup()
    sigma = lambda t: float(p.ode_sigma(t))  # noqa: E731
    guided = ds.guidance.cfg(model, 2.0, interval=(sigma(0.6), sigma(0.3)))
    for t, inside in ((0.8, False), (0.6, True), (0.45, True), (0.3, False), (0.1, False)):
        net.batches.clear()
        out = guided(x, t, label=label)
        reference = ds.guidance.cfg(model, 2.0 if inside else 1.0)(x, t, label=label)
        assert net.batches[0] == (12 if inside else 6)
        torch.testing.assert_close(out.x0, reference.x0, rtol=0, atol=0)
    # Per-sample times: each sample guided or not by its own time.
    times = torch.tensor([0.8, 0.45, 0.1, 0.5, 0.3, 0.59], dtype=torch.float64)
    out = guided(x, times, label=label)
    for k, t in enumerate(times.tolist()):
        inside = sigma(0.3) < sigma(t) <= sigma(0.6)
        one = ds.guidance.cfg(model, 2.0 if inside else 1.0)(x[k:k + 1], t, label=label[k:k + 1])
        torch.testing.assert_close(out.x0[k:k + 1], one.x0)


@pytest.mark.parametrize("space", ["x0", "eps"])
def test_rescale_matches_its_definition(space):
    p, model, _, x, label = _setup()
    t, w, phi = 0.4, 5.0, 0.7
    c = model(x, t, label=label)
    plain = ds.guidance.cfg(model, w)(x, t, label=label)
    out = ds.guidance.cfg(model, w, rescale=phi, rescale_space=space)(x, t, label=label)
    guided, cond = (plain.x0, c.x0) if space == "x0" else (plain.eps, c.eps)
    matched = guided * cond.std(dim=1, keepdim=True) / guided.std(dim=1, keepdim=True)
    expected = phi * matched + (1 - phi) * guided
    torch.testing.assert_close(out.x0 if space == "x0" else out.eps, expected)
    torch.testing.assert_close(float(p.alpha(t)) * out.x0 + float(p.sigma(t)) * out.eps, x)
    # phi = 1: the per-sample standard deviation is the conditional one.
    full = ds.guidance.cfg(model, w, rescale=1.0, rescale_space=space)(x, t, label=label)
    torch.testing.assert_close((full.x0 if space == "x0" else full.eps).std(dim=1), cond.std(dim=1))


def test_cfg_with_scale_one_samples_the_conditional_model_with_every_solver():
    p, model, _, x, label = _setup()
    grid = ds.grids.karras(p, 8)
    for name in ("ddim", "dpmpp_2m", "heun", "unipc"):
        a = ds.sample(ds.guidance.cfg(model, 1.0), x, grid, name, label=label)
        b = ds.sample(model, x, grid, name, label=label)
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", SOLVER_CONFIGS, ids=config_id)
def test_every_solver_runs_with_guidance_and_counts_one_call_per_evaluation(config):
    p, model, net, x, label = _setup()
    solver = ds.solvers.get(config[0], **config[1])
    guided = ds.guidance.clip_x0(ds.guidance.cfg(model, 2.5, rescale=0.5), 4.0)
    grid = ds.grids.karras(p, 6)
    out = ds.sample(guided, x, grid, solver, generator=torch.Generator().manual_seed(1), label=label)
    assert bool(torch.isfinite(out).all())
    assert net.batches == [2 * len(x)] * model.nfe
    if solver.adaptive:  # its steps follow the guided model's errors: the unguided run's count differs
        return
    guided_calls, model.nfe = model.nfe, 0
    ds.sample(model, x, grid, solver, generator=torch.Generator().manual_seed(1), label=label)
    assert guided_calls == model.nfe  # both passes of every evaluation in one network call


def test_cfg_errors_name_the_argument_and_what_is_allowed():
    _, model, _, x, label = _setup()
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ds.guidance.cfg(model, float("nan"))
    with pytest.raises(ValueError, match=r"rescale must be in \[0, 1\]"):
        ds.guidance.cfg(model, 2.0, rescale=1.5)
    with pytest.raises(ValueError, match="rescale_space must be 'x0' or 'eps'"):
        ds.guidance.cfg(model, 2.0, rescale_space="v")
    with pytest.raises(ValueError, match="interval must be"):
        ds.guidance.cfg(model, 2.0, interval=(0.1, 1.0))
    bare = ds.Denoiser(model.fn, model.process, "eps", time_input=model.time_input)
    with pytest.raises(ValueError, match="no null condition"):
        ds.guidance.cfg(bare, 2.0)(x, 0.5, label=label)
    with pytest.raises(ValueError, match="same in every pass"):
        ds.guidance.cfg(bare, 2.0, uncond={"label": -1})(x, 0.5, label=0)


@pytest.mark.parametrize("key", ["vp", "edm", "flow"])
def test_cfg_pp_samplers_are_ddim_for_an_unguided_model(key):
    process = {"vp": ds.VP.scaled_linear(), "edm": ds.EDM(), "flow": ds.Flow(t_max=0.99)}[key]
    p, model, _, x, label = _setup("velocity" if key == "flow" else "eps", process)
    grid = ds.grids.logsnr(p, 12, t_max=p.t_max)
    for ours, base in (("euler_cfg_pp", "ddim"), ("euler_ancestral_cfg_pp", "euler_ancestral")):
        a = ds.sample(model, x, grid, ours, generator=torch.Generator().manual_seed(3), label=label)
        b = ds.sample(model, x, grid, base, generator=torch.Generator().manual_seed(3), label=label)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_cfg_pp_is_the_papers_algorithm():
    """Chung et al. 2024, Algorithm 1: x0 from eps_u + lambda (eps_c - eps_u), re-noised with eps_u."""
    p, model, _, x, label = _setup()
    lam = 0.6
    grid = ds.grids.logsnr(p, 10)
    ours = ds.sample(ds.guidance.cfg(model, lam, plus_plus=True), x, grid, "euler_cfg_pp", label=label)
    y = x.clone()
    null = torch.full_like(label, GMM.NULL_LABEL)
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        eps_c, eps_u = model(y, t, label=label).eps, model(y, t, label=null).eps
        eps = eps_u + lam * (eps_c - eps_u)
        x0 = (y - float(p.sigma(t)) * eps) / float(p.alpha(t))
        y = float(p.alpha(t_next)) * x0 + float(p.sigma(t_next)) * eps_u
    torch.testing.assert_close(ours, y, rtol=1e-10, atol=1e-10)
    plain = ds.sample(ds.guidance.cfg(model, lam), x, grid, "euler_cfg_pp", label=label)
    assert (plain - ours).abs().max() > 1e-3  # the re-noising term is what differs from plain CFG


def test_solvers_without_cfg_pp_do_plain_cfg_with_a_cfg_pp_model():
    p, model, _, x, label = _setup()
    grid = ds.grids.karras(p, 8)
    for name in ("dpmpp_2m", "heun", "unipc", "dpm_solver"):
        a = ds.sample(ds.guidance.cfg(model, 3.0, plus_plus=True), x, grid, name, label=label)
        b = ds.sample(ds.guidance.cfg(model, 3.0), x, grid, name, label=label)
        assert torch.equal(a, b), name


@pytest.mark.parametrize("key", ["vp", "edm", "flow"])
def test_dpmpp_2m_cfg_pp_is_dpmpp_2m_for_an_unguided_model(key):
    process = {"vp": ds.VP.scaled_linear(), "edm": ds.EDM(), "flow": ds.Flow()}[key]
    p, model, _, x, label = _setup("velocity" if key == "flow" else "eps", process)
    grid = ds.grids.get("uniform" if key == "flow" else "karras", p, 12)
    a = ds.sample(model, x, grid, "dpmpp_2m_cfg_pp", label=label)
    b = ds.sample(model, x, grid, ds.solvers.DPMpp2M(lower_order_final=False), label=label)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("key", ["vp", "edm"])
def test_dpmpp_2m_cfg_pp_is_comfyuis_loop(key):
    """Our transcription of ComfyUI's sample_dpmpp_2m_cfg_pp in k-diffusion's sigma coordinates, on the
    guided (c) and unconditional (u) data estimates: x' = c + e^{-h}(x - u) + (1 - e^{-h}) / (2r) (c - u_prev)."""
    import math
    process = {"vp": ds.VP.scaled_linear(), "edm": ds.EDM()}[key]
    p, model, _, x, label = _setup("eps", process)
    scale = 2.5
    grid = ds.grids.karras(p, 10)
    ours = ds.sample(ds.guidance.cfg(model, scale, plus_plus=True), x, grid, "dpmpp_2m_cfg_pp", label=label)
    null = torch.full_like(label, GMM.NULL_LABEL)
    times = grid.tolist()
    sig = [float(p.ode_sigma(t)) for t in times]
    y, u_prev = x / float(p.ode_scale(times[0])), None
    for i in range(len(times) - 1):
        xi = y * float(p.ode_scale(times[i]))
        u = model(xi, times[i], label=null).x0
        c = u + scale * (model(xi, times[i], label=label).x0 - u)
        if sig[i + 1] == 0:
            y = c
            continue
        h = math.log(sig[i] / sig[i + 1])
        mix = -math.exp(-h) * u
        if u_prev is not None:
            r = math.log(sig[i - 1] / sig[i]) / h
            mix = mix - math.expm1(-h) / (2 * r) * (c - u_prev)
        y, u_prev = c + mix + math.exp(-h) * y, u
    torch.testing.assert_close(ours, y * float(p.ode_scale(times[-1])), rtol=1e-10, atol=1e-10)


def test_nested_conditioning_goes_through_guidance_key_by_key():
    # SDXL's UNet takes added_cond_kwargs={"text_embeds": ..., "time_ids": ...}: a dict inside the keywords.
    calls = []

    def net(x, t, added_cond_kwargs=None, encoder_hidden_states=None):
        calls.append(x.shape[0])
        a = added_cond_kwargs
        return 0.5 * x + a["text_embeds"].sum(1, keepdim=True) * encoder_hidden_states + a["time_ids"][:, :1]

    model = ds.Denoiser(net, ds.VPLinear(), "eps")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, generator=g)
    cond = {"added_cond_kwargs": {"text_embeds": torch.randn(3, 4, generator=g), "time_ids": torch.randn(3, 6, generator=g)},
            "encoder_hidden_states": torch.randn(3, 2, generator=g)}
    uncond = {"added_cond_kwargs": {"text_embeds": torch.zeros(3, 4), "time_ids": torch.randn(3, 6, generator=g)},
              "encoder_hidden_states": torch.zeros(3, 2)}
    guided = ds.guidance.cfg(model, 4.0, uncond=uncond)(x, 0.4, **cond)
    assert calls == [6]  # one batched call for both passes
    c, u = model(x, 0.4, **cond), model(x, 0.4, **uncond)
    torch.testing.assert_close(guided.eps, u.eps + 4.0 * (c.eps - u.eps))
    bad = {"added_cond_kwargs": {"text_embeds": torch.zeros(3, 4)}, "encoder_hidden_states": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match="same keys in every pass"):
        ds.guidance.cfg(model, 4.0, uncond=bad)(x, 0.4, **cond)
