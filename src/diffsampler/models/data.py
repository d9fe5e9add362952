"""The training data of the shipped models, each reproducible from a seed.

* 2-D toys: two moons, the ring of eight Gaussians (``testbeds.ring8``, so the
  trained model can be compared with the exact one) and a Swiss roll.
* Digits: scikit-learn's 8x8 handwritten digits (1797 images, from the UCI
  optical recognition data set), scaled from [0, 16] to [-1, 1], as
  ``(n, 1, 8, 8)``. A fixed split keeps ``HELD_OUT`` images for evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..testbeds import ring8

__all__ = ["toy2d", "TOY2D", "digits", "HELD_OUT"]

HELD_OUT = 297


def _moons(n: int, g: torch.Generator) -> torch.Tensor:
    upper = torch.rand(n, generator=g) < 0.5
    angle = torch.rand(n, generator=g) * math.pi
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 2.0
    return pts + 0.1 * torch.randn(n, 2, generator=g)


def _swissroll(n: int, g: torch.Generator) -> torch.Tensor:
    turn = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    pts = torch.stack([turn * turn.cos(), turn * turn.sin()], 1) / 5.0
    return pts + 0.1 * torch.randn(n, 2, generator=g)


def _ring8(n: int, g: torch.Generator) -> torch.Tensor:
    return ring8().sample(n, generator=g)[0].float()


TOY2D = {"moons": _moons, "ring8": _ring8, "swissroll": _swissroll}


def toy2d(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` fresh points of the 2-D data set ``name`` (float32, shape ``(n, 2)``)."""
    if name not in TOY2D:
        raise ValueError(f"toy2d: name must be one of {sorted(TOY2D)}, got {name!r}")
    return TOY2D[name](n, generator)


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (n, 1, 8, 8) in [-1, 1], labels (n,))`` of the ``"train"`` or ``"held_out"`` split.

    Needs scikit-learn (``pip install 'diffsampler[train]'``), which ships the data.
    """
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"digits: split must be 'train', 'held_out' or 'all', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data comes with scikit-learn: pip install 'diffsampler[train]'") from err
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    labels = torch.from_numpy(data.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    if split == "train":
        order = order[:-HELD_OUT]
    elif split == "held_out":
        order = order[-HELD_OUT:]
    return images[order], labels[order]
