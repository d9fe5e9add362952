"""Every guidance transform with every registered solver configuration: it runs, stays finite, keeps
shape and dtype, and composes (transforms of transforms)."""

import pytest
import torch

import diffsampler as ds
from conftest import SOLVER_CONFIGS, config_id
from diffsampler.models.nets import DigitsUNet

GMM = ds.testbeds.GaussianMixture([[2.0, 0.0], [-1.5, 1.5], [0.0, -2.0]], [0.3, 0.2, 0.4], labels=[0, 1, 1])
WEAK = ds.testbeds.GaussianMixture(GMM.means, GMM.covs * 2, GMM.weights, labels=[0, 1, 1])


def _gmm_transforms(p):
    model = GMM.denoiser(p, "eps")
    clean = GMM.noisy_classifier(p)
    clean_x0 = lambda x0: clean(x0, torch.full((x0.shape[0],), p.t_min, dtype=torch.float64))  # noqa: E731
    g = ds.guidance
    return {
        "cfg": g.cfg(model, 2.0, rescale=0.5, interval=(50.0, 0.1)),
        "cfg++": g.cfg(model, 0.7, plus_plus=True),
        "classifier": g.classifier_guidance(model, clean, 1.5),
        "gradient_free": g.gradient_free_guidance(model, clean_x0, 1.0),
        "autoguidance": g.autoguidance(model, WEAK.denoiser(p, "eps"), 2.0),
        "composed": g.dynamic_threshold(g.clip_x0(g.cfg(g.autoguidance(model, WEAK.denoiser(p, "eps"), 1.5), 2.0),
                                                  3.0), 0.99, 1.5),
    }


@pytest.mark.parametrize("config", SOLVER_CONFIGS, ids=config_id)
def test_every_transform_runs_with_every_solver(config):
    p = ds.VP.scaled_linear()
    solver = ds.solvers.get(config[0], **config[1])
    x = p.prior((6, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    label = torch.tensor([0, 1, 1, 0, 1, 0])
    grid = ds.grids.karras(p, 5)
    for name, model in _gmm_transforms(p).items():
        out = ds.sample(model, x, grid, solver, generator=torch.Generator().manual_seed(1), label=label)
        assert out.shape == x.shape and out.dtype == x.dtype, name
        assert bool(torch.isfinite(out).all()), name


@pytest.mark.parametrize("config", SOLVER_CONFIGS, ids=config_id)
def test_perturbed_attention_runs_with_every_solver(config):
    torch.manual_seed(0)
    net = DigitsUNet(channels=(8, 16), emb=16).eval().requires_grad_(False)
    model = ds.Denoiser(net, ds.VP.cosine(), "eps", null=ds.models.null_label)
    pag = ds.guidance.perturbed_attention(model, 1.5, cfg_scale=1.5)
    x = model.process.prior((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ds.sample(pag, x, ds.grids.logsnr(model.process, 4), ds.solvers.get(config[0], **config[1]),
                        generator=torch.Generator().manual_seed(1), label=torch.tensor([1, 2, 3]))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
