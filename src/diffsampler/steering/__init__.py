"""Inference-time steering toward a reward: particle methods over any stochastic solver.

Each driver takes ``(model, x, grid, solver, reward)`` positionally, ``particles=`` (groups of that
many consecutive samples of ``x`` are one population), ``generator=`` and conditioning keywords,
and returns a :class:`SteeringResult`. Rewards are callables ``reward(x0, **cond) -> (batch,)`` on
data estimates; :func:`latent_reward` decodes first, :func:`digits_reward` steers the shipped digits
models toward a class and :func:`digits_accuracy` judges them with an independent classifier.
"""

from .fk import POTENTIALS, best_of_n, fk, schedule_steps
from .fkc import FKCTarget, annealed, cfg_target, fkc, product
from .particles import (REVERSE_SDE_SOLVERS, Population, SteeringResult, latent_reward, noise_level,
                        reverse_sde_solvers, stochastic_solvers)
from .resample import RESAMPLERS, ess, get_resampler, multinomial, resample_groups, residual, stratified, systematic
from .rbf import FlowSDE, Reinterpolated, rbf, vp_interpolant
from .rewards import class_log_prob, digits_accuracy, digits_reward
from .svdd import svdd
from .tree import TreeSearchResult, tree_search, uct

__all__ = ["best_of_n", "fk", "svdd", "SteeringResult", "latent_reward", "stochastic_solvers", "POTENTIALS",
           "schedule_steps", "ess", "multinomial", "systematic", "stratified", "residual", "RESAMPLERS",
           "get_resampler", "resample_groups", "Population", "class_log_prob", "digits_reward",
           "digits_accuracy", "rbf", "FlowSDE", "vp_interpolant", "Reinterpolated",
           "tree_search", "TreeSearchResult", "uct", "fkc", "FKCTarget", "annealed", "product", "cfg_target",
           "REVERSE_SDE_SOLVERS", "reverse_sde_solvers", "noise_level"]
