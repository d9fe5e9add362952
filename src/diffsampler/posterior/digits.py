"""Digits inpainting and denoising with AFDPS or DPS: the job behind ``diffsampler posterior --model digits``.

Held-out digits (8x8, in [-1, 1]) are measured, ``y = A x + sigma_y n`` (inpaint: the bottom half
masked, only the top half observed; denoise: every pixel, noisy), and the shipped unconditional
``digits`` model is the prior. The evaluator (``digits-evaluator``, trained on real digits only)
judges whether the samples are the true digit; the error in the observed pixels is the RMS of
``A(x) - A(x_true)`` there. AFDPS's figures are weighted by the particles' final weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import grids as _grids
from .afdps import afdps
from .dps import dps
from .operators import Inpaint

__all__ = ["posterior_digits"]

# The measurement noise of each job. AFDPS tilts the noisy state itself by the likelihood: at
# sigma_y = 0.1 on inpainting its explicit guidance step diverges within the first 20 of 100 steps and
# its weights collapse, at 0.3 the hidden half leaves the network's domain (accuracy 1%, 64
# particles); 0.6 keeps it usable (71%). DPS's step does not use sigma_y.
DEFAULT_SIGMA_Y = {("inpaint", "dps"): 0.1, ("inpaint", "afdps"): 0.6, ("denoise", "dps"): 0.3,
                   ("denoise", "afdps"): 0.3}
DEFAULT_PARTICLES = {"afdps": 64, "dps": 16}


def _mask(task: str) -> torch.Tensor:
    mask = torch.ones(1, 8, 8)
    if task == "inpaint":
        mask[:, 4:] = 0.0  # the bottom half is hidden
    return mask


def posterior_digits(task: str = "inpaint", method: str = "afdps", *, model: str = "digits", images: int = 4,
                     particles: int | None = None, steps: int = 100, solver: str = "ddpm",
                     sigma_y: float | None = None,
                     scale: float = 1.0, seed: int = 0, out: str | Path | None = "out",
                     show: int = 6) -> dict:
    """Inpaint (``task="inpaint"``) or denoise (``"denoise"``) ``images`` held-out digits.

    ``method="afdps"``: ``particles`` weighted particles per digit (``solver`` a reverse-SDE kernel or a
    deterministic one); ``"dps"``: ``particles`` independent DPS samples per digit with step ``scale``.
    ``sigma_y`` defaults to ``DEFAULT_SIGMA_Y[task, method]``, ``particles`` to 64 (AFDPS) or 16 (DPS).
    Writes ``out/posterior_digits_{task}_{method}.png`` (one row per digit: observation, ``show``
    samples, truth; AFDPS's samples drawn by weight) unless ``out`` is None, and returns the numbers:
    ``accuracy`` (the evaluator's, on the true class), ``observed_rmse`` (in the observed pixels,
    against the truth), ``nfe`` per sample, ``time`` and ``picture``.
    """
    from .. import models
    from ..models.data import digits

    if task not in ("inpaint", "denoise"):
        raise ValueError(f"posterior_digits: task must be 'inpaint' or 'denoise', got {task!r}")
    if method not in ("afdps", "dps"):
        raise ValueError(f"posterior_digits: method must be 'afdps' or 'dps', got {method!r}")
    sigma_y = DEFAULT_SIGMA_Y[task, method] if sigma_y is None else sigma_y
    particles = DEFAULT_PARTICLES[method] if particles is None else particles
    denoiser = models.load(model)
    process = denoiser.process
    truth_all, labels_all = digits("held_out")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(labels_all), generator=g)[:images]
    truth, labels = truth_all[pick], labels_all[pick]
    op = Inpaint(_mask(task))
    y = op(truth + sigma_y * torch.randn(truth.shape, generator=g))           # (images, 1, 8, 8)
    x = process.prior((images * particles, 1, 8, 8), generator=g)
    grid = _grids.logsnr(process, steps)
    start = time.perf_counter()
    if method == "afdps":
        res = afdps(denoiser, x, grid, solver, y=y, operator=op, sigma_y=sigma_y, particles=particles, generator=g)
        samples, weights, nfe = res.x, res.log_weights.exp(), res.nfe
    else:
        samples = dps(denoiser, x, grid, y=y.repeat_interleave(particles, 0), operator=op, sigma_y=sigma_y,
                      scale=scale, generator=g, solver=solver)
        weights, nfe = torch.full((len(x),), 1.0 / particles), float(steps)
    elapsed = time.perf_counter() - start
    samples = samples.clamp(-1, 1)
    evaluator = models.load("digits-evaluator")
    with torch.no_grad():
        predicted = evaluator(samples.float()).argmax(1)
    correct = (predicted == labels.repeat_interleave(particles)).double()
    w = weights.double().reshape(images, particles)
    # normalised again: log-weights of magnitude 1e8 (a strong likelihood) come back from their
    # logsumexp with relative errors of 1e-8 (accuracy must not read 100.000001%)
    w = w / w.sum(1, keepdim=True)
    accuracy = ((w * correct.reshape(images, particles)).sum(1) / w.sum(1)).mean().item()
    mask = _mask(task).bool().expand(1, 8, 8)
    sq = ((op(samples) - op(truth).repeat_interleave(particles, 0)) ** 2).reshape(images, particles, -1)
    per_sample = sq.sum(-1) / mask.sum()
    observed_rmse = (w * per_sample).sum(1).mean().sqrt().item()
    picture = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        picture = out / f"posterior_digits_{task}_{method}.png"
        _picture(picture, y, samples, w, truth, labels, predicted, particles, show, g,
                 f"{method} {task}: sigma_y {sigma_y:g}, {solver}, {steps} steps, {particles} per digit; "
                 f"accuracy {accuracy:.0%}, observed RMSE {observed_rmse:.3f}")
    return {"task": task, "method": method, "accuracy": accuracy, "observed_rmse": observed_rmse,
            "sigma_y": sigma_y, "steps": steps, "particles": particles, "images": images, "nfe": nfe,
            "time": elapsed, "picture": None if picture is None else str(picture)}


def _picture(path, y, samples, w, truth, labels, predicted, particles, show, g, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = truth.shape[0]
    show = min(show, particles)
    fig, axes = plt.subplots(images, show + 2, figsize=(1.1 * (show + 2), 1.2 * images + 0.5), squeeze=False)
    for i in range(images):
        draw = torch.multinomial(w[i].float(), show, replacement=True, generator=g) + i * particles
        row = [(y[i], "observed")] + [(samples[j], f"-> {int(predicted[j])}") for j in draw.tolist()] + \
            [(truth[i], f"truth {int(labels[i])}")]
        for k, (img, name) in enumerate(row):
            ax = axes[i, k]
            ax.imshow(img[0].float().numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(name, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_result(r: dict) -> str:
    """The CLI's printout of :func:`posterior_digits`'s numbers."""
    return "\n".join([
        f"{r['method']} {r['task']} on digits: {r['images']} digits, {r['particles']} per digit, {r['steps']} steps, "
        f"sigma_y {r['sigma_y']:g}",
        f"  evaluator accuracy (true class)  {r['accuracy']:.1%}",
        f"  RMSE in the observed pixels      {r['observed_rmse']:.4f}",
        f"  NFE per sample                   {r['nfe']:g}",
        f"  time                             {r['time']:.2f} s",
        f"  picture                          {r['picture']}",
    ])
