"""Editing a real digit: invert it under its label, regenerate it under another with CFG.

``edit_digit(index=17, to=8, method="edict")`` is what ``diffsampler edit --model digits --index 17 --to 8
--method edict`` runs: it returns the reconstruction error, the evaluator's label of the edit and its
distance to the original, and writes a picture (original, reconstruction, edit).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["edit_digit"]


def _natural_grid(process, steps: int) -> torch.Tensor:
    from .. import grids
    from ..process import Flow

    return grids.uniform(process, steps) if isinstance(process, Flow) else grids.logsnr(process, steps)


def edit_digit(index: int = 17, to: int = 8, method="edict", *, model: str = "digits", steps: int = 50,
               scale: float = 3.0, strength: float = 0.8, split: str = "held_out", dtype=torch.float64,
               seed: int = 0, out: str | Path | None = "edit.png") -> dict:
    """Invert digit ``index`` of ``split`` (``ds.models.data.digits``) under its own label with
    ``cfg(model, scale)`` over the last ``strength`` of a ``steps``-step grid (diffusers' strength, as the
    EDICT paper's editing: 0.8), then regenerate it under its label (reconstruction) and under ``to``
    (the edit). ``method`` is any :func:`~diffsampler.inversion.invert` method. Runs in ``dtype``
    (float64: EDICT's and BDIA's exactness needs it).

    Returns ``{"label", "to", "reconstruction_error" (relative L2), "edit_label" (the evaluator's),
    "edit_confidence", "distance" (RMS to the original, pixels in [-1, 1]), "nfe", "path"}`` and writes
    the picture to ``out`` (``None``: no picture).
    """
    from .. import models
    from ..guidance import cfg
    from ..models.data import digits
    from . import invert, regenerate, strength_grid

    images, labels = digits(split)
    if not isinstance(index, int) or not 0 <= index < len(labels):
        raise ValueError(f"edit: index must be an integer in [0, {len(labels)}) (the {split!r} digits), got {index!r}")
    if not isinstance(to, int) or not 0 <= to <= 9:
        raise ValueError(f"edit: to must be a digit class 0-9, got {to!r}")
    net = models.load(model)
    guided = cfg(net, scale)
    x0 = images[index:index + 1].to(dtype)
    src = labels[index:index + 1]
    dst = torch.full_like(src, to)
    grid = strength_grid(_natural_grid(net.process, steps), strength)
    before = net.nfe
    inv = invert(guided, x0, grid, method, generator=torch.Generator().manual_seed(seed), label=src)
    recon = regenerate(guided, inv, grid, label=src)
    edit = regenerate(guided, inv, grid, label=dst)
    evaluator = models.load("digits-evaluator")
    with torch.no_grad():
        probs = evaluator(edit.float().clamp(-1, 1)).softmax(-1)[0]
    result = {
        "index": index, "label": int(src), "to": to, "method": getattr(inv.method, "name", str(method)),
        "steps": len(grid) - 1, "reconstruction_error": float((recon - x0).norm() / x0.norm()),
        "edit_label": int(probs.argmax()), "edit_confidence": float(probs.max()),
        "distance": float((edit - x0).pow(2).mean().sqrt()), "nfe": net.nfe - before, "path": None,
    }
    if out is not None:
        result["path"] = str(_picture(Path(out), x0, recon, edit, result))
    return result


def _picture(path: Path, x0, recon, edit, r) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(6, 2.4))
    titles = [f"original ({r['label']})", f"reconstruction\nerr {r['reconstruction_error']:.1e}",
              f"edit to {r['to']}: read {r['edit_label']}\nRMS {r['distance']:.2f}"]
    for ax, img, title in zip(axes, (x0, recon, edit), titles):
        ax.imshow(img[0, 0].float().clamp(-1, 1).cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{r['method']}, {r['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
