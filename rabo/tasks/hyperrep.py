"""Task A, hyper-representation (FedNest's benchmark): x is the feature extractor, y the head.

    g_i(x, y) = CE(head_y(phi_x(X_train_i))) + (mu / 2) ||y||^2     (mu-strongly convex in y)
    f_i(x, y) = CE(head_y(phi_x(X_val_i)))

The head's input columns follow the backbone's kept units, so pruning x prunes y (dual pruning).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rabo.models import PrunableModel
from rabo.params import Params
from rabo.tasks.base import Batch, BilevelTask


class HyperRepresentation(BilevelTask):
    name = "A"

    def __init__(self, model: PrunableModel, mu: float) -> None:
        super().__init__(model)
        self.mu = mu
        self.x_layout = {n: model.layout[n] for n in model.backbone_names}
        self.y_layout = {n: model.layout[n] for n in model.head_names}

    def init(self, seed: int) -> tuple[Params, Params]:
        params = self.model.init(seed)
        return ({n: params[n] for n in self.x_layout}, {n: params[n] for n in self.y_layout})

    def logits(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor],
               inputs: torch.Tensor) -> torch.Tensor:
        return self.model.head(y, self.model.features(x, inputs))

    def g(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Batch
          ) -> torch.Tensor:
        ridge = sum(torch.sum(t * t) for t in y.values())
        return self.cross_entropy(x, y, batch) + 0.5 * self.mu * ridge

    def f(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Batch
          ) -> torch.Tensor:
        return self.cross_entropy(x, y, batch)
