"""The quality figures of the shipped models, measured with the library's own samplers.

* Digits: the accuracy of generated digits under ``digits-evaluator`` (a classifier
  trained on real digits only, so it judges the generator independently) and the
  Frechet distance (Heusel et al., 2017) between generated and held-out real digits
  in that classifier's feature space.
* 2-D toys: the sliced Wasserstein distance to fresh data, beside the distance
  between two fresh data draws of the same size (the floor a perfect model reaches).
* Classifiers: held-out accuracy (at several noise levels for the noisy one); for the minority
  classifier, the rank correlation of its expected level with held-out digits' minority scores.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy import linalg

from .. import grids
from ..bench.distribution import sliced_wasserstein
from ..guidance import cfg
from ..loop import sample
from ..process import Flow
from . import data
from .train import PROCESSES, SPECS

__all__ = ["frechet_distance", "digits_samples", "digits_figures", "minority_figures", "measure"]


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` between two sets of feature rows."""
    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr (C_a C_b)^(1/2) = tr (S C_b S)^(1/2) with S = C_a^(1/2): symmetric, so eigvalsh is stable
    w, v = linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(linalg.eigvalsh(root_a @ cb @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross)


def default_grid(process) -> str:
    """The grid family natural for ``process``: log-SNR for VP, uniform in t for flows (which start at
    t = 1, where the log-SNR is infinite)."""
    return "uniform" if isinstance(process, Flow) else "logsnr"


def digits_samples(model, *, per_class: int = 10, solver: str = "dpmpp_2m", steps: int = 15,
                   grid: str | None = None, scale: float = 1.0, seed: int = 0, guide=None,
                   condition: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (10 per_class, 1, 8, 8), labels)``: ``per_class`` samples of every digit.

    ``scale`` is the classifier-free guidance weight; ``guide`` replaces it by any
    transform ``model -> model``. ``grid`` defaults to :func:`default_grid`. With
    ``condition=False`` no label is passed (the unconditional model; ``labels`` are
    then only the order the samples were drawn in).
    """
    labels = torch.arange(10).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    process = model.process
    x_t = process.prior((len(labels), 1, 8, 8), generator=g)
    guided = guide(model) if guide is not None else cfg(model, scale)
    with torch.no_grad():
        cond = {"label": labels} if condition else {}
        grid = grid or default_grid(process)
        x0 = sample(guided, x_t, grids.get(grid, process, steps), solver, generator=g, **cond)
    return x0, labels


def digits_figures(images: torch.Tensor, labels: torch.Tensor, evaluator) -> dict:
    """Accuracy under the evaluator and Frechet distance to the held-out real digits."""
    real, _ = data.digits("held_out")
    with torch.no_grad():
        accuracy = (evaluator(images.float()).argmax(1) == labels).double().mean().item()
        fd = frechet_distance(evaluator.features(images.float()), evaluator.features(real))
    return {"accuracy": round(accuracy, 4), "frechet_distance": round(fd, 3)}


def _toy_figures(model, data_name: str, n: int = 4000) -> dict:
    g = torch.Generator().manual_seed(0)
    process = model.process
    x_t = process.prior((n, 2), generator=g)
    with torch.no_grad():
        x0 = sample(model, x_t, grids.get(default_grid(process), process, 20), "dpmpp_2m", generator=g)
    reference = data.toy2d(data_name, n, g)
    floor = data.toy2d(data_name, n, g)
    return {"sampler": f"dpmpp_2m, {default_grid(process)} grid, 20 NFE", "n": n,
            "swd_to_data": round(sliced_wasserstein(x0, reference), 4),
            "swd_data_to_data": round(sliced_wasserstein(floor, reference), 4)}


def minority_figures(name: str, model, times=(0.1, 0.3, 0.5)) -> dict:
    """A minority classifier on the held-out digits: at each noise level (the noise of each drawn in turn
    from one seeded generator) the rank correlation of the classifier's expected level with the digits'
    exact minority scores, and the mean of those scores.

    Ranks, not levels: the held-out digits score far above the training digits (``digits`` has memorised
    its training digits, so it reconstructs them better), so cut at the training thresholds nearly all of
    them fall in the top level, and an accuracy against those levels would measure that shift only. The
    scores are 5-draw estimates, so the correlation cannot reach 1 either.
    """
    from scipy.stats import spearmanr

    from .train import minority_scores

    images, scores = minority_scores(name, "held_out")
    process = PROCESSES[SPECS[name].process]()
    g = torch.Generator().manual_seed(0)
    figures = {}
    for t in times:
        xt = process.alpha(t) * images + process.sigma(t) * torch.randn(images.shape, generator=g)
        with torch.no_grad():
            probs = model(xt, torch.full((len(images),), t)).softmax(-1)
        expected = probs @ torch.arange(probs.shape[1], dtype=probs.dtype)
        figures[f"held_out_rank_correlation_t{t}"] = round(float(spearmanr(expected.double().numpy(),
                                                                           scores.numpy()).correlation), 4)
    figures["held_out_mean_score"] = round(scores.mean().item(), 4)
    return figures


def measure(name: str, model, evaluator=None, log=print) -> dict:
    """The quality figures of the shipped model ``name`` (a loaded model, see :func:`diffsampler.models.load`)."""
    spec = SPECS[name]
    start = time.perf_counter()
    if spec.kind == "evaluator":
        images, labels = data.digits("held_out")
        with torch.no_grad():
            figures = {"held_out_accuracy": round((model(images).argmax(1) == labels).double().mean().item(), 4)}
    elif spec.kind == "noisy_classifier":
        images, labels = data.digits("held_out")
        process = PROCESSES[spec.process]()
        g = torch.Generator().manual_seed(0)
        figures = {}
        for t in (0.1, 0.3, 0.5, 0.7, 0.9):
            xt = process.alpha(t) * images + process.sigma(t) * torch.randn(images.shape, generator=g)
            with torch.no_grad():
                acc = (model(xt, torch.full((len(labels),), t)).argmax(1) == labels).double().mean().item()
            figures[f"held_out_accuracy_t{t}"] = round(acc, 4)
    elif spec.kind == "minority_classifier":
        figures = minority_figures(name, model)
    elif spec.data.startswith("toy2d:"):
        figures = _toy_figures(model, spec.data.split(":", 1)[1])
    else:
        figures = {}
        for scale in (1.0, 2.0, 3.0):
            images, labels = digits_samples(model, per_class=50, steps=20, scale=scale)
            row = digits_figures(images, labels, evaluator)
            log(f"{name}: cfg scale {scale}, dpmpp_2m 20 NFE: {row}")
            figures[f"dpmpp_2m_20nfe_cfg{scale:g}"] = row
    figures["measure_seconds"] = round(time.perf_counter() - start, 1)
    return figures
