"""The shipped models: they load as Denoisers with their processes, they are what their records
say, the digits model meets its quality target, and training reproduces from a seed."""

import json
from dataclasses import replace

import pytest
import torch

import diffsampler as ds
from diffsampler.models import quality
from diffsampler.models.train import PROCESSES, SPECS, fit

pytest.importorskip("sklearn")
SHIPPED = ds.models.names()


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_loads_and_records_how_it_was_made(name):
    meta = ds.models.info(name)
    spec = SPECS[name]
    assert meta["name"] == name and meta["kind"] == spec.kind and meta["process"] == spec.process
    assert meta["prediction"] == spec.prediction and meta["steps"] == spec.stop() and "quality" in meta
    model = ds.models.load(name)
    if spec.kind == "denoiser":
        assert isinstance(model, ds.Denoiser) and model.prediction == spec.prediction
        assert type(model.process) is type(PROCESSES[spec.process]())
    else:
        assert isinstance(model, torch.nn.Module)
        assert not any(p.requires_grad for p in model.parameters())


def test_shipped_weights_fit_the_size_budget():
    total = sum(ds.models.weights_path(name).stat().st_size for name in SHIPPED)
    assert total <= 10 * 2 ** 20


def test_digits_null_label_is_the_unconditional_model():
    model = ds.models.load("digits")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x, 0.5)
        null = model(x, 0.5, label=torch.full((4,), ds.models.NULL_LABEL))
        cond = model(x, 0.5, label=torch.arange(4))
    assert torch.equal(plain.eps, null.eps)
    assert (cond.eps - null.eps).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["digits", "digits-flow"])
def test_guided_digits_are_recognised_by_the_independent_classifier(name):
    """The issue's target: at least 90% class accuracy at 20 NFE with classifier-free guidance."""
    model = ds.models.load(name)
    images, labels = quality.digits_samples(model, per_class=20, steps=20, scale=2.0, seed=1)
    assert model.nfe == 20
    figures = quality.digits_figures(images, labels, ds.models.load("digits-evaluator"))
    assert figures["accuracy"] >= 0.9, figures
    unguided = quality.digits_figures(*quality.digits_samples(model, per_class=20, steps=20, scale=0.0, seed=1),
                                      ds.models.load("digits-evaluator"))
    assert unguided["accuracy"] < figures["accuracy"]  # scale 0 is the unconditional model: chance-like labels


def test_toy_ring8_model_is_close_to_the_exact_mixture():
    """The trained ring8 model against the testbed it was trained on, where the exact answer is known."""
    model = ds.models.load("toy2d-ring8")
    gmm = ds.testbeds.ring8()
    g = torch.Generator().manual_seed(0)
    x_t = model.process.prior((2000, 2), generator=g)
    with torch.no_grad():
        x0 = ds.sample(model, x_t, ds.grids.logsnr(model.process, 20), "dpmpp_2m")
    exact, _ = gmm.sample(2000, generator=g)
    other, _ = gmm.sample(2000, generator=g)
    floor = ds.bench.distribution.sliced_wasserstein(other, exact)
    assert ds.bench.distribution.sliced_wasserstein(x0, exact) < 3 * floor + 0.05
    # and most samples sit on the ring: exact log-density far above that of the prior
    assert gmm.log_prob(x0.double()).mean() > gmm.log_prob(x_t.double()).mean() + 2


def test_training_is_reproducible_from_the_seed():
    spec = replace(SPECS["toy2d-moons"], steps=20)
    a, b = fit(spec), fit(spec)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_a_snapshot_is_its_parents_run_stopped_early():
    """Same seed, data and learning-rate schedule as the parent: the first losses coincide exactly."""
    SPECS["_parent"] = replace(SPECS["toy2d-moons"], name="_parent", steps=30)
    try:
        parent_losses, early_losses = [], []
        fit(SPECS["_parent"], progress=lambda s, loss: parent_losses.append(loss))
        fit(replace(SPECS["_parent"], name="_early", snapshot=("_parent", 10)),
            progress=lambda s, loss: early_losses.append(loss))
        assert len(early_losses) == 10 and early_losses == parent_losses[:10]
    finally:
        del SPECS["_parent"]


def test_train_cli_writes_a_loadable_model_with_its_record(tmp_path):
    from typer.testing import CliRunner

    from diffsampler.cli import app
    result = CliRunner().invoke(app, ["train", "toy2d-moons", "--steps", "30", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    model = ds.models.load("toy2d-moons", root=tmp_path)
    assert isinstance(model, ds.Denoiser)
    meta = ds.models.info("toy2d-moons", root=tmp_path)
    assert meta["steps"] == 30 and meta["seed"] == 0 and "swd_to_data" in meta["quality"]
    assert json.dumps(meta)
    result = CliRunner().invoke(app, ["train", "nope"])
    assert result.exit_code != 0 and "toy2d-moons" in result.output


def test_models_errors_name_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        ds.models.load("mnist")
    with pytest.raises(FileNotFoundError, match="diffsampler train digits"):
        ds.models.load("digits", root=tmp_path)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        ds.models.train.train("toy2d-moons", steps=0)


def test_demo_cli_writes_a_labelled_grid_and_reports_accuracy(tmp_path):
    from typer.testing import CliRunner

    from diffsampler.cli import app
    result = CliRunner().invoke(app, ["demo", "--per-class", "2", "--steps", "5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "class accuracy" in result.output and "NFE (network calls)" in result.output
    assert list(tmp_path.glob("digits_dpmpp_2m_logsnr5_cfg*.png"))


def test_frechet_distance_matches_the_gaussian_closed_form():
    """For Gaussian samples the estimate approaches |mu_a - mu_b|^2 + tr(A + B - 2 (A B)^(1/2))."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    a = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([1.5, 1.0, 0.5]) + torch.tensor([1.0, 0, 0])
    exact = 1.0 + (1 + 4 + 0.25) + (2.25 + 1 + 0.25) - 2 * (1.5 + 2.0 + 0.25)
    assert quality.frechet_distance(a, b) == pytest.approx(exact, abs=0.03)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
