"""Rewards for steering, and judges that are not the reward.

A reward is ``reward(x0, **cond) -> (batch,)`` on data estimates (see :mod:`diffsampler.steering`).
:func:`class_log_prob` makes one from any classifier; :func:`digits_reward` is the one of the
shipped digits models: ``log p(target | x0)`` under ``digits-classifier`` at its lowest noise level.
A steered sample is judged by a classifier that played no part in steering it (the reward's own
classifier rates what was optimised against it): :func:`digits_accuracy` uses ``digits-evaluator``,
trained on real digits only, and refuses the reward's classifier.

    reward = ds.steering.digits_reward(3)
    out = ds.steering.fk(model, x, grid, "ddpm", reward, particles=4, generator=g)
    ds.steering.digits_accuracy(out.best, 3)              # share of populations whose best is a 3
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["class_log_prob", "digits_reward", "digits_accuracy"]


def _classes(target, batch: int, cond: dict, device) -> torch.Tensor:
    """One class per sample (int64, ``(batch,)``): ``target`` itself, or the conditioning keyword it names."""
    if isinstance(target, str):
        if target not in cond:
            raise ValueError(f"class_log_prob: the target is the conditioning keyword {target!r}, but the call "
                             f"has {sorted(cond) or 'no conditioning'}; pass {target}= (one class per sample) "
                             f"to the steering driver")
        classes = torch.as_tensor(cond[target]).to(device=device, dtype=torch.int64)
        return classes.expand(batch) if classes.ndim == 0 else classes
    return torch.full((batch,), target, dtype=torch.int64, device=device)


def _check_target(target) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise TypeError(f"target must be a class index (int) or the name of a conditioning keyword holding one "
                        f"class per sample (str), got {target!r}")
    if isinstance(target, int) and target < 0:
        raise ValueError(f"target must be a class index >= 0, got {target}")


def class_log_prob(classifier, target, *, time: float | None = None):
    """The reward ``log p(target | x0)`` under ``classifier``, shape ``(batch,)``, without gradients.

    Parameters
    ----------
    classifier:
        ``classifier(x) -> logits (batch, classes)``; with ``time`` given, a noise-conditional one,
        called as ``classifier(x, t)`` with ``t`` that process time for every sample (use its lowest
        noise level: the reward scores data estimates, which are meant to be clean).
    target:
        The class: an int for every sample, or the name of a conditioning keyword that holds one class
        per sample (a ``(batch,)`` integer tensor passed to the driver). Conditioning follows its
        particle through resampling, candidates and trees, so each population can be steered toward
        its own class: ``"label"`` steers a class-conditional model toward its own label; any other
        name needs a model that accepts (and ignores) that keyword.

    The returned reward keeps the classifier as ``reward.classifier`` (so that a judge can refuse it).
    """
    if not callable(classifier):
        raise TypeError(f"class_log_prob: classifier must be callable, got {type(classifier).__name__}")
    _check_target(target)

    def reward(x0: torch.Tensor, **cond) -> torch.Tensor:
        n = x0.shape[0]
        with torch.no_grad():
            if time is None:
                logits = classifier(x0)
            else:
                logits = classifier(x0, torch.full((n,), float(time), device=x0.device))
            cls = _classes(target, n, cond, logits.device)
            if cls.shape != (n,) or int(cls.min()) < 0 or int(cls.max()) >= logits.shape[1]:
                raise ValueError(f"class_log_prob: the targets must be {n} classes in [0, {logits.shape[1]}), got "
                                 f"shape {tuple(cls.shape)} with values {cls.unique().tolist()[:10]}")
            return logits.log_softmax(dim=1).gather(1, cls[:, None]).squeeze(1)

    reward.classifier = classifier
    reward.target = target
    return reward


def digits_reward(target, *, root: str | Path | None = None, device: str | torch.device = "cpu"):
    """``log p(target | x0)`` under the shipped ``digits-classifier`` at its lowest noise level (``t_min``
    of the VP-cosine process it was trained on), for steering the digits models toward a class.

    ``target`` as for :func:`class_log_prob` (an int, or the name of a conditioning keyword holding one
    class per sample). Judge the results with :func:`digits_accuracy`, never with this classifier.
    """
    from .. import models
    from ..models.train import PROCESSES, SPECS

    classifier = models.load("digits-classifier", root, device)
    return class_log_prob(classifier, target, time=PROCESSES[SPECS["digits-classifier"].process]().t_min)


def digits_accuracy(images: torch.Tensor, target, evaluator=None) -> float:
    """The share of ``images`` that ``digits-evaluator`` (or ``evaluator``) classifies as ``target``.

    ``target``: one class (int) or one per image (an integer tensor ``(batch,)``). ``evaluator`` must
    be a classifier of clean digits other than the reward's: the noise-conditional ``digits-classifier``
    that :func:`digits_reward` steers with is refused.
    """
    from .. import models
    from ..models.nets import NoisyDigitsClassifier

    if evaluator is None:
        evaluator = models.load("digits-evaluator")
    if isinstance(evaluator, NoisyDigitsClassifier):
        raise ValueError("digits_accuracy: the evaluator is the noise-conditional digits-classifier, the reward's "
                         "own classifier; judge with digits-evaluator (trained on real digits only)")
    with torch.no_grad():
        predicted = evaluator(images.float()).argmax(dim=1)
    if isinstance(target, bool) or not isinstance(target, (int, torch.Tensor)):
        raise TypeError(f"digits_accuracy: target must be a class (int) or one class per image, got {target!r}")
    classes = torch.as_tensor(target, dtype=torch.int64, device=predicted.device)
    if classes.ndim not in (0, 1) or (classes.ndim == 1 and classes.shape[0] != images.shape[0]):
        raise ValueError(f"digits_accuracy: target must be one class or one per image ({images.shape[0]}), "
                         f"got shape {tuple(classes.shape)}")
    return (predicted == classes).double().mean().item()
