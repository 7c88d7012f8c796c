"""Task C, data hyper-cleaning: x holds one weight logit per training sample, y the classifier.

    g_i(x, y) = mean_k sigmoid(x_k) CE_k(model_y) + c ||y||^2      (over a train batch)
    f_i(x, y) = CE(model_y(X_val_i))                                  (clean validation data)

Train labels are corrupted once, when the data are built (``data.label_noise``). x is
client-local: client i's tensor ``w{i}`` covers only its own samples and is never width-pruned,
so only the participants' sample weights are covered in a round.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from rabo.models import PrunableModel
from rabo.params import Params
from rabo.submodel import ParamLayout
from rabo.tasks.base import Batch, BilevelTask


class HyperCleaning(BilevelTask):
    name = "C"

    def __init__(self, model: PrunableModel, train_sizes: list[int], c: float) -> None:
        super().__init__(model)
        self.c = c
        self.y_layout = dict(model.layout)
        self.x_layout = {f"w{i}": ParamLayout((n,), (None,)) for i, n in enumerate(train_sizes)}

    def x_names_for(self, client_id: int) -> tuple[str, ...]:
        return (f"w{client_id}",)

    def init(self, seed: int) -> tuple[Params, Params]:
        y = self.model.init(seed)
        x = {n: torch.zeros(lay.shape) for n, lay in self.x_layout.items()}
        return x, y

    def logits(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor],
               inputs: torch.Tensor) -> torch.Tensor:
        return self.model.forward(y, inputs)

    def g(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Batch
          ) -> torch.Tensor:
        (weights,) = x.values()  # a client sees only its own sample weights
        per_sample = F.cross_entropy(self.logits(x, y, batch.inputs), batch.labels,
                                     reduction="none")
        ridge = sum(torch.sum(t * t) for t in y.values())
        return torch.mean(torch.sigmoid(weights[batch.index]) * per_sample) + self.c * ridge

    def f(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Batch
          ) -> torch.Tensor:
        return self.cross_entropy(x, y, batch)
