"""Sample quality of the shipped digits models per solver and NFE.

Every solver samples the same 50 digits of each class from the same prior
draws with classifier-free guidance at ``SCALE``; the digits are judged by
``digits-evaluator`` (a classifier trained on real digits only): its class
accuracy, and the Frechet distance between generated and held-out real digits
in its feature space. NFE is counted by the Denoiser (one batched network call
for both guidance passes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .. import solvers as _solvers
from .accuracy import budget_steps

__all__ = ["ModelResult", "GuidanceResult", "run_models", "run_guidance", "SCALE"]

SCALE = 2.0
NFES = [5, 10, 20]
QUICK_NFES = [10]
SOLVERS = ["ddim", "euler", "heun", "dpm_2", "lms", "deis", "dpm_solver", "dpmpp_2m", "dpmpp_3m", "unipc",
           "res_multistep", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "ddpm"]
QUICK_SOLVERS = ["ddim", "dpmpp_2m", "unipc"]
MODELS = {"digits": "logsnr", "digits-flow": "uniform"}


@dataclass
class ModelResult:
    model: str
    solver: str
    grid: str
    target_nfe: int
    nfe: int
    scale: float
    accuracy: float
    frechet_distance: float
    seconds: float


def run_models(quick: bool = False, log: Callable[[str], None] = print) -> list[ModelResult]:
    from .. import models
    from ..models.quality import digits_figures, digits_samples

    evaluator = models.load("digits-evaluator")
    results = []
    for name, grid in MODELS.items():
        model = models.load(name)
        for solver in QUICK_SOLVERS if quick else SOLVERS:
            cls = _solvers.REGISTRY[solver]
            for nfe in QUICK_NFES if quick else NFES:
                steps = budget_steps(cls, nfe)
                model.nfe = 0
                start = time.perf_counter()
                images, labels = digits_samples(model, per_class=20 if quick else 50, solver=solver, steps=steps,
                                                grid=grid, scale=SCALE)
                seconds = time.perf_counter() - start
                fig = digits_figures(images, labels, evaluator)
                results.append(ModelResult(name, solver, grid, nfe, model.nfe, SCALE, fig["accuracy"],
                                           fig["frechet_distance"], round(seconds, 2)))
                log(f"models {name} {solver} NFE {model.nfe}: accuracy {fig['accuracy']:.3f}, "
                    f"FD {fig['frechet_distance']:.2f}")
    return results


@dataclass
class GuidanceResult:
    method: str
    setting: str
    conditional: bool
    nfe_steps: int
    nfe: int
    accuracy: float | None
    frechet_distance: float
    confidence: float


GUIDANCE_STEPS = [10, 20]


def _guidance_configs(quick: bool, process, weak, classifier):
    """(method, setting, conditional, transform) on the digits models; ``None`` for unguided."""
    import torch

    from .. import guidance

    scales = [1.5, 3.0] if quick else [1.0, 1.5, 2.0, 3.0, 5.0]
    configs = [("none", "-", True, None), ("none", "-", False, None)]
    configs += [("cfg", f"w={s:g}", True, lambda m, s=s: guidance.cfg(m, s)) for s in scales if s != 1.0]
    configs += [("classifier", f"s={s:g}", True,
                 lambda m, s=s: guidance.classifier_guidance(m, classifier, s)) for s in ([1.0, 4.0] if quick else
                                                                                         [0.5, 1.0, 2.0, 4.0, 8.0])]
    configs += [("autoguidance", f"w={s:g}", c, lambda m, s=s: guidance.autoguidance(m, weak, s))
                for c in (True, False) for s in ([2.0] if quick else [1.5, 2.0, 3.0])]
    configs += [("pag", f"s={s:g}", c, lambda m, s=s: guidance.perturbed_attention(m, s))
                for c in (True, False) for s in ([2.0] if quick else [1.0, 2.0, 3.0])]
    def clean(x0):  # the noise-conditioned classifier at the smallest noise level judges clean estimates
        return classifier(x0, torch.full((x0.shape[0],), process.t_min, device=x0.device))

    configs += [("gfcg", f"s={s:g}", True, lambda m, s=s: guidance.gradient_free_guidance(m, clean, s))
                for s in ([2.0] if quick else [1.0, 2.0, 4.0])]
    if not quick:
        configs += [("cfg+pag", "w=2, s=1", True, lambda m: guidance.perturbed_attention(m, 1.0, cfg_scale=2.0))]
    return configs


def run_guidance(quick: bool = False, log: Callable[[str], None] = print) -> list[GuidanceResult]:
    """Each guidance method on the digits model at 10 and 20 steps of dpmpp_2m: class accuracy (for
    conditional runs), Frechet distance, and the evaluator's mean confidence in its own top class."""
    import torch

    from .. import models
    from ..models.quality import digits_figures, digits_samples

    evaluator = models.load("digits-evaluator")
    model = models.load("digits")
    weak = models.load("digits-weak")
    results = []
    for method, setting, conditional, transform in _guidance_configs(quick, model.process, weak,
                                                                     models.load("digits-classifier")):
        for steps in [10] if quick else GUIDANCE_STEPS:
            model.nfe = weak.nfe = 0
            # Classifier guidance hands the label to the classifier and calls the model without it.
            guide = transform if transform is not None else (lambda m: m)
            images, labels = digits_samples(model, per_class=20 if quick else 50, steps=steps, guide=guide,
                                            condition=conditional)
            fig = digits_figures(images, labels, evaluator)
            with torch.no_grad():
                confidence = evaluator(images).softmax(1).max(1).values.mean().item()
            results.append(GuidanceResult(method, setting, conditional, steps, model.nfe + weak.nfe,
                                          fig["accuracy"] if conditional else None, fig["frechet_distance"],
                                          round(confidence, 4)))
            log(f"guidance {method} {setting} {'cond' if conditional else 'uncond'} {steps} steps: {fig}")
    return results
