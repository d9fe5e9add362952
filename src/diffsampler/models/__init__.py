"""Small models trained here and shipped in the package, and the code that trains them.

    model = ds.models.load("digits")                  # a Denoiser (VP cosine, eps prediction)
    x = ds.sample(ds.guidance.cfg(model, 3.0), x_T, grid, "dpmpp_2m", generator=g, label=labels)

Names: ``toy2d-moons``, ``toy2d-ring8``, ``toy2d-swissroll`` (2-D MLPs), ``digits``
(class-conditional UNet, ``label=`` a LongTensor of classes 0-9, ``NULL_LABEL`` = 10
for none; without ``label`` the model is unconditional), ``digits-weak`` (an early
checkpoint of ``digits``, for autoguidance), ``digits-flow`` (rectified flow),
``digits-classifier`` (``log p(label | x_t)`` on VP-cosine noisy digits),
``digits-minority`` (``log p(l | x_t)`` over 10 minority levels of ``digits``, for
``ds.guidance.minority_guidance``; Um et al., 2024) and
``digits-evaluator`` (a classifier of clean digits trained on real digits only).
Every file records how it was made and its measured quality: :func:`info`.
``diffsampler train NAME`` reproduces a file from its seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..denoiser import Denoiser
from .nets import NULL_LABEL
from .train import PROCESSES, SPECS

__all__ = ["load", "info", "names", "weights_path", "NULL_LABEL", "null_label"]

WEIGHTS = Path(__file__).parent / "weights"


def names() -> list[str]:
    """The shipped models."""
    return sorted(SPECS)


def weights_path(name: str, root: str | Path | None = None) -> Path:
    """The safetensors file of ``name`` under ``root`` (default: the package's own weights)."""
    if name not in SPECS:
        raise ValueError(f"models: name must be one of {names()}, got {name!r}")
    path = Path(root if root is not None else WEIGHTS) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"models: no weights for {name!r} at {path}; `diffsampler train {name}` makes them")
    return path


def info(name: str, root: str | Path | None = None) -> dict:
    """The metadata record of ``name``: process, prediction, data, steps, seed and quality figures."""
    from safetensors import safe_open

    with safe_open(str(weights_path(name, root)), framework="pt") as f:
        return json.loads(f.metadata()["meta"])


def null_label(cond: dict) -> dict:
    """The unconditional keywords of the digits models: every label replaced by ``NULL_LABEL``."""
    label = cond.get("label")
    if label is None:
        return dict(cond)
    return {**cond, "label": torch.full_like(label, NULL_LABEL)}


def load_network(name: str, root: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The network of ``name`` with its shipped weights, in eval mode, parameters frozen."""
    from safetensors.torch import load_file

    net = SPECS[name].build()
    net.load_state_dict(load_file(str(weights_path(name, root)), device=str(device)))
    return net.to(device).eval().requires_grad_(False)


def load(name: str, root: str | Path | None = None, device: str | torch.device = "cpu"):
    """Load a shipped model: a :class:`Denoiser` for denoisers, the ``nn.Module`` for classifiers.

    ``root`` reads the weights from another directory (e.g. the output of
    ``diffsampler train``). Networks run in float32 whatever the sample's dtype.
    """
    if name not in SPECS:
        raise ValueError(f"models.load: name must be one of {names()}, got {name!r}")
    return _wrap(name, load_network(name, root, device))


def _wrap(name: str, net: torch.nn.Module):
    """The network of ``name`` as users get it: a Denoiser for denoisers, else the module itself."""
    spec = SPECS[name]
    if spec.kind != "denoiser":
        return net
    return Denoiser(net, PROCESSES[spec.process](), spec.prediction, name=name,
                    null=null_label if spec.conditioning else None)


def make(name: str, root: str | Path | None = None, progress=None, log=print, steps: int | None = None) -> Path:
    """Train ``name`` from its seed, measure its quality and write ``root/NAME.safetensors``.

    The digits denoisers are judged by ``digits-evaluator``, read from ``root`` when
    it is there and from the package otherwise. ``steps`` shortens the run (for checks).
    """
    from safetensors.torch import save_file

    from .quality import measure
    from .train import train

    root = Path(root if root is not None else WEIGHTS)
    root.mkdir(parents=True, exist_ok=True)
    net, meta = train(name, progress, steps)
    spec = SPECS[name]
    model = _wrap(name, net)
    evaluator = None
    if spec.kind == "denoiser" and spec.data == "digits":
        local = root / "digits-evaluator.safetensors"
        evaluator = load("digits-evaluator", root if local.is_file() else None)
    meta["quality"] = measure(name, model, evaluator, log=log)
    path = root / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"meta": json.dumps(meta)})
    return path
