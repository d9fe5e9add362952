"""Training of the shipped models, reproducible from their seeds on two CPU cores.

``diffsampler train NAME`` runs :func:`train`; every shipped weight file was
produced by it. Denoisers are trained with the usual regression losses of their
prediction type (Ho et al., 2020 for ``eps``; Lipman et al., 2023 and Liu et al.,
2023 for the flow ``velocity``), times drawn uniformly over the process's range,
AdamW with a linear warm-up and cosine decay, and an exponential moving average
of the weights (the EMA is what ships). Class-conditional models drop the label
with probability ``label_dropout`` (Ho & Salimans, 2022), so the null label gives
the unconditional model that classifier-free guidance needs. The minority classifier
(``digits-minority``) learns the minority levels of the training digits (Um et al., 2024,
arXiv:2301.12334): quantile classes of their minority scores under the shipped ``digits`` model.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..process import VP, Flow, Process
from . import data, nets

__all__ = ["ModelSpec", "SPECS", "PROCESSES", "train", "fit", "minority_data", "minority_scores"]

#: The processes of the shipped models, by the name their metadata records.
PROCESSES: dict[str, Callable[[], Process]] = {
    "VP.linear()": VP.linear,
    "VP.cosine()": VP.cosine,
    "Flow()": Flow,
}


@dataclass(frozen=True)
class ModelSpec:
    """What a shipped model is and how it is trained.

    ``kind`` is ``"denoiser"`` (a network for a ``Denoiser``), ``"noisy_classifier"``
    (``log p(label | x_t)`` for guidance), ``"minority_classifier"`` (``log p(l | x_t)`` over
    the minority levels of the data under the shipped denoiser ``scored_by``, for minority
    guidance) or ``"evaluator"`` (a classifier of clean data). ``snapshot`` names a shorter
    run of another spec: the weights of ``snapshot[0]``'s training after ``snapshot[1]``
    steps, same seed and schedule.
    """

    name: str
    kind: str
    build: Callable[[], nn.Module]
    data: str
    steps: int
    batch: int
    lr: float
    seed: int
    description: str
    process: str | None = None
    prediction: str | None = None
    label_dropout: float = 0.0
    ema: float = 0.999
    snapshot: tuple[str, int] | None = None
    conditioning: dict = field(default_factory=dict)
    scored_by: str | None = None

    def stop(self) -> int:
        return self.snapshot[1] if self.snapshot else self.steps


def _toy(name: str, data_name: str) -> ModelSpec:
    return ModelSpec(name, "denoiser", nets.ToyMLP, f"toy2d:{data_name}", steps=6000, batch=512, lr=2e-3,
                     seed=0, process="VP.linear()", prediction="eps",
                     description=f"MLP on 2-D {data_name}, VP linear (continuous DDPM), eps prediction")


#: Quantile levels of the minority classifier: 10 of ~135 training digits each (the paper's 100 levels
#: are for data sets of 10^4 to 10^6 images; a level needs enough digits to be learnt).
MINORITY_LEVELS = 10

_DIGITS_LABEL = {"label": f"LongTensor of digit classes 0-9; {nets.NULL_LABEL} is the null label (unconditional)"}

_DIGITS = ModelSpec("digits", "denoiser", nets.DigitsUNet, "digits", steps=7000, batch=128, lr=1e-3, seed=0,
                    process="VP.cosine()", prediction="eps", label_dropout=0.15, conditioning=_DIGITS_LABEL,
                    description="class-conditional UNet with self-attention on 8x8 digits, VP cosine, eps prediction")

SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in [
    _toy("toy2d-moons", "moons"),
    _toy("toy2d-ring8", "ring8"),
    _toy("toy2d-swissroll", "swissroll"),
    _DIGITS,
    replace(_DIGITS, name="digits-weak", snapshot=("digits", 700),
            description="the digits UNet after a tenth of its training (for autoguidance)"),
    replace(_DIGITS, name="digits-flow", seed=1, process="Flow()", prediction="velocity",
            description="class-conditional UNet on 8x8 digits, rectified flow, velocity prediction"),
    ModelSpec("digits-classifier", "noisy_classifier", nets.NoisyDigitsClassifier, "digits", steps=4000,
              batch=256, lr=1e-3, seed=2, process="VP.cosine()",
              description="noise-conditioned classifier of VP-cosine noisy digits, for classifier guidance"),
    ModelSpec("digits-minority", "minority_classifier", functools.partial(nets.NoisyDigitsClassifier, 128,
                                                                           MINORITY_LEVELS),
              "digits", steps=1000, batch=256, lr=1e-3, seed=4, process="VP.cosine()", scored_by="digits",
              description=f"noise-aware minority classifier p(l | x_t) over {MINORITY_LEVELS} quantile levels of the "
                          "minority scores of the training digits under the shipped digits model (unconditional), "
                          "for minority guidance"),
    ModelSpec("digits-evaluator", "evaluator", nets.DigitsEvaluator, "digits", steps=3000, batch=128, lr=1e-3,
              seed=3, ema=0.99,
              description="classifier of clean digits trained on real digits only: judges generated digits"),
]}


def _lr(step: int, steps: int, lr: float, warmup: int = 200) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def _target(process: Process, prediction: str, t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor):
    """The noisy input and the regression target of ``prediction`` at times ``t``."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a, s = process.alpha(t).float().reshape(shape), process.sigma(t).float().reshape(shape)
    xt = a * x0 + s * eps
    if prediction == "eps":
        return xt, eps
    if prediction == "velocity":
        da, ds = process.d_alpha(t).float().reshape(shape), process.d_sigma(t).float().reshape(shape)
        return xt, da * x0 + ds * eps
    raise ValueError(f"training supports eps and velocity predictions, got {prediction!r}")


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (filled with the blank value -1), the evaluator's augmentation."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def _minority_scores(scored_by: str, split: str, seed: int) -> torch.Tensor:
    """The minority scores of the digits of ``split`` under the shipped ``scored_by`` (unconditional,
    the paper's time and 5 draws, from a generator seeded with ``seed``); cached, they take seconds."""
    # convolutions sum in a thread-dependent order: a score cached at another thread count is not this one
    return _minority_scores_at(scored_by, split, seed, torch.get_num_threads())


@functools.lru_cache(maxsize=8)
def _minority_scores_at(scored_by: str, split: str, seed: int, threads: int) -> torch.Tensor:
    from ..guidance.minority import minority_score
    from . import load

    images, _ = data.digits(split)
    return minority_score(load(scored_by), images, generator=torch.Generator().manual_seed(seed), batch=500)


def minority_scores(name: str | ModelSpec, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, scores)``: the digits of ``split`` and their minority scores under the shipped denoiser
    that the minority classifier ``name`` (or spec) is scored by, the package's own weights whatever the
    ``root`` a retraining writes to (the training digits with draws from its seed, others from seed + 1,
    so that no two splits share noise)."""
    spec = SPECS[name] if isinstance(name, str) else name
    if spec.kind != "minority_classifier":
        raise ValueError(f"minority_scores: {spec.name!r} is not a minority classifier")
    return data.digits(split)[0], _minority_scores(spec.scored_by, split, spec.seed + (split != "train"))


def minority_data(name: str | ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images, levels, scores, thresholds)``: the training digits of the minority classifier ``name``
    (or spec) and their minority levels, the equal-count quantile classes of their scores (Um et al. 2024),
    with the thresholds (which the weights record in ``info(name)["minority"]``)."""
    from ..guidance.minority import minority_classes

    spec = SPECS[name] if isinstance(name, str) else name
    images, scores = minority_scores(spec, "train")
    levels, thresholds = minority_classes(scores, spec.build().num_classes)
    return images, levels, scores, thresholds


def fit(spec: ModelSpec, progress: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train ``spec`` from its seed and return the EMA network (in eval mode).

    A snapshot spec runs its parent's training (seed, schedule) and stops early.
    """
    spec_run = spec if spec.snapshot is None else replace(SPECS[spec.snapshot[0]], steps=spec.steps)
    torch.manual_seed(spec_run.seed)
    g = torch.Generator().manual_seed(spec_run.seed)
    net = spec_run.build()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=spec_run.lr, weight_decay=0.0)
    process = PROCESSES[spec_run.process]() if spec_run.process else None
    if spec_run.kind == "minority_classifier":
        images, labels, _, _ = minority_data(spec_run)
    elif spec_run.data == "digits":
        images, labels = data.digits("train")
    loss_avg = None
    for step in range(spec.stop()):
        if spec_run.data.startswith("toy2d:"):
            x0, label = data.toy2d(spec_run.data.split(":", 1)[1], spec_run.batch, g), None
        else:
            idx = torch.randint(0, len(labels), (spec_run.batch,), generator=g)
            x0, label = images[idx], labels[idx]
        if spec_run.kind == "evaluator":
            x = _shift(x0, g) + 0.05 * torch.randn(x0.shape, generator=g)
            loss = F.cross_entropy(net(x), label)
        else:
            t = process.t_min + (process.t_max - process.t_min) * torch.rand(spec_run.batch, generator=g,
                                                                              dtype=torch.float64)
            eps = torch.randn(x0.shape, generator=g)
            if spec_run.kind in ("noisy_classifier", "minority_classifier"):
                xt, _ = _target(process, "eps", t, x0, eps)
                loss = F.cross_entropy(net(xt, t.float()), label)
            else:
                xt, target = _target(process, spec_run.prediction, t, x0, eps)
                cond = {}
                if label is not None:
                    drop = torch.rand(spec_run.batch, generator=g) < spec_run.label_dropout
                    cond["label"] = torch.where(drop, nets.NULL_LABEL, label)
                loss = F.mse_loss(net(xt, t.float(), **cond), target)
        for group in opt.param_groups:
            group["lr"] = _lr(step, spec_run.steps, spec_run.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(spec_run.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if progress is not None:
            progress(step + 1, loss_avg)
    return ema.eval()


def train(name: str, progress: Callable[[int, float], None] | None = None,
          steps: int | None = None) -> tuple[nn.Module, dict]:
    """Train the shipped model ``name``: ``(network, metadata)`` (the quality figures are added by
    :func:`diffsampler.models.quality.measure`).

    ``steps`` shortens the run (the whole schedule compressed into ``steps``), for quick checks;
    the shipped weights are made without it.
    """
    if name not in SPECS:
        raise ValueError(f"train: name must be one of {sorted(SPECS)}, got {name!r}")
    spec = SPECS[name]
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"train: steps must be a positive integer, got {steps!r}")
        spec = replace(spec, steps=steps, snapshot=None if spec.snapshot is None else (spec.snapshot[0], steps))
    start = time.perf_counter()
    net = fit(spec, progress)
    meta = {
        "name": spec.name, "kind": spec.kind, "description": spec.description, "data": spec.data,
        "process": spec.process, "prediction": spec.prediction, "steps": spec.stop(), "batch": spec.batch,
        "seed": spec.seed if spec.snapshot is None else SPECS[spec.snapshot[0]].seed,
        "conditioning": spec.conditioning, "train_seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in net.parameters()),
        "torch": torch.__version__,
    }
    if spec.kind == "minority_classifier":
        _, _, scores, thresholds = minority_data(spec)
        meta["minority"] = {"scored_by": spec.scored_by, "levels": len(thresholds) + 1, "score_seed": spec.seed,
                            "thresholds": [round(v, 6) for v in thresholds.tolist()],
                            "train_mean_score": round(scores.mean().item(), 4),
                            "score": "squared error at the paper's t (0.06), 5 draws, unconditional"}
    return net, meta
