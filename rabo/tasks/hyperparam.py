"""Task B, hyperparameter learning: per-weight L2 strengths of a width-prunable classifier.

    y = the classifier (every layer), x = per-weight log L2 strengths with y's shapes,
    g_i(x, y) = CE(model_y(X_train_i)) + 1/2 sum_j exp(x_j) y_j^2
    f_i(x, y) = CE(model_y(X_val_i))

x mirrors y element-wise, so the same unit indices prune both (dual pruning).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rabo.models import PrunableModel
from rabo.params import Params
from rabo.tasks.base import Batch, BilevelTask


class HyperparameterLearning(BilevelTask):
    name = "B"

    def __init__(self, model: PrunableModel, log_l2_init: float) -> None:
        super().__init__(model)
        self.log_l2_init = log_l2_init
        self.y_layout = dict(model.layout)
        self.x_layout = dict(model.layout)

    def init(self, seed: int) -> tuple[Params, Params]:
        y = self.model.init(seed)
        x = {n: torch.full_like(t, self.log_l2_init) for n, t in y.items()}
        return x, y

    def logits(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor],
               inputs: torch.Tensor) -> torch.Tensor:
        return self.model.forward(y, inputs)

    def g(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Batch
          ) -> torch.Tensor:
        penalty = sum(torch.sum(torch.exp(x[n]) * y[n] * y[n]) for n in y)
        return self.cross_entropy(x, y, batch) + 0.5 * penalty

    def f(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Batch
          ) -> torch.Tensor:
        return self.cross_entropy(x, y, batch)
