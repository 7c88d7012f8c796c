"""Bilevel tasks: A hyper-representation, B hyperparameter learning, C data hyper-cleaning."""

from __future__ import annotations

from rabo.config import Config
from rabo.models import PrunableModel
from rabo.tasks.base import Batch, BilevelTask
from rabo.tasks.hyperclean import HyperCleaning
from rabo.tasks.hyperparam import HyperparameterLearning
from rabo.tasks.hyperrep import HyperRepresentation

__all__ = ["Batch", "BilevelTask", "HyperCleaning", "HyperRepresentation",
           "HyperparameterLearning", "build_task"]


def build_task(cfg: Config, model: PrunableModel, train_sizes: list[int] | None = None
               ) -> BilevelTask:
    """The task ``cfg.task`` names, over ``model``."""
    if cfg.task == "A":
        return HyperRepresentation(model, mu=cfg.task_params.mu)
    if cfg.task == "B":
        return HyperparameterLearning(model, log_l2_init=cfg.task_params.log_l2_init)
    if train_sizes is None:
        raise ValueError("task C needs every client's train size (its x is per sample)")
    return HyperCleaning(model, train_sizes=train_sizes, c=cfg.task_params.clean_c)
