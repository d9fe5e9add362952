"""x0 corrections as Denoiser transforms: their definitions, composition with every solver, peer parity."""

import pytest
import torch

import diffsampler as ds

GMM = ds.testbeds.GaussianMixture([[2.0, 0.0], [-1.5, 1.5]], [0.3, 0.2], labels=[0, 1])


def test_clip_matches_its_definition_and_keeps_eps_consistent():
    p = ds.VP.scaled_linear()
    model = GMM.denoiser(p, "eps")
    x = torch.randn(32, 2, dtype=torch.float64)
    t = 0.4
    pred = ds.guidance.clip_x0(model, 1.0)(x, t)
    torch.testing.assert_close(pred.x0, model(x, t).x0.clamp(-1, 1))
    torch.testing.assert_close(float(p.alpha(t)) * pred.x0 + float(p.sigma(t)) * pred.eps, x)


def test_dynamic_threshold_matches_its_definition():
    p = ds.EDM()
    model = GMM.denoiser(p, "x0")
    x = torch.randn(8, 2, dtype=torch.float64) * 3
    raw = model(x, 2.0).x0
    pred = ds.guidance.dynamic_threshold(model, ratio=0.9, max_value=1.5)(x, 2.0)
    s = torch.quantile(raw.abs(), 0.9, dim=1).clamp(1.0, 1.5)[:, None]
    torch.testing.assert_close(pred.x0, raw.clamp(-s, s) / s)
    assert pred.x0.abs().max() <= 1.0 + 1e-12


def test_transforms_compose_and_count_the_wrapped_models_nfe():
    p = ds.Flow()
    model = GMM.denoiser(p, "velocity")
    both = ds.guidance.dynamic_threshold(ds.guidance.clip_x0(model, 2.0), 0.99, 1.2)
    x = p.prior((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ds.sample(both, x, ds.grids.uniform(p, 5), "euler")
    assert both.nfe == model.nfe == 5


def test_bad_transform_arguments():
    model = GMM.denoiser(ds.EDM(), "eps")
    with pytest.raises(ValueError, match="value must be a finite number > 0"):
        ds.guidance.clip_x0(model, 0.0)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        ds.guidance.dynamic_threshold(model, ratio=1.5)
    with pytest.raises(ValueError, match="max_value must be a finite number >= 1"):
        ds.guidance.dynamic_threshold(model, max_value=0.5)
    with pytest.raises(TypeError, match="must be a Denoiser"):
        ds.guidance.clip_x0(lambda x, t: x)


@pytest.mark.parametrize("config, transform", [
    ({"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
     lambda m: ds.guidance.dynamic_threshold(m, 0.9, 1.5)),
])
def test_thresholding_agrees_with_diffusers(config, transform):
    """diffusers' DPMSolverMultistepScheduler(thresholding=True) thresholds its data estimate inside each
    step; the transform does the same outside every solver."""
    diffusers = pytest.importorskip("diffusers")
    from diffsampler.bench import peers

    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012, **config)
    p = peers.vp_process_of(sched)
    model = GMM.denoiser(p, "eps")
    # image-shaped (batch, channels, h, w): diffusers' thresholding reshapes as images
    x = torch.randn(16, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    theirs = peers.run_diffusers(sched, model, x, 12)
    grid = peers.diffusers_grid(sched, p)
    mine = ds.sample(transform(model), x, grid, "dpmpp_2m")
    assert ((theirs - mine).norm() / mine.norm()).item() < 1e-6
    plain = ds.sample(model, x, grid, "dpmpp_2m")
    assert ((plain - mine).norm() / mine.norm()).item() > 1e-2  # the thresholding did act
