"""The bilevel task interface: which parameters are x and y, and the losses f_i and g_i.

    min_x  (1/N) sum_i f_i(x, y*(x))   s.t.  y*(x) = argmin_y (1/N) sum_i g_i(x, y)

A task owns a width-prunable model and says how its parameters split into the upper-level
variable x and the lower-level variable y (v, the linear-system variable, has y's layout).
Losses take one mini-batch; the round engine decides which batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rabo.masks import MaskSpec
from rabo.models import PrunableModel
from rabo.params import Params
from rabo.submodel import Layout, SlicePlan, plan


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor  # positions of these samples in the client's split (task C weights)


class BilevelTask(ABC):
    """f_i, g_i and the x / y split of one bilevel problem over a width-prunable model."""

    name: str = ""
    x_layout: Layout
    y_layout: Layout

    def __init__(self, model: PrunableModel) -> None:
        self.model = model

    # ------------------------------------------------------------------ variables

    @abstractmethod
    def init(self, seed: int) -> tuple[Params, Params]:
        """Initial (x, y)."""

    def x_names_for(self, client_id: int) -> tuple[str, ...]:
        """The x tensors a client works on (all of them, except for client-local x)."""
        return tuple(self.x_layout)

    def x_plan(self, mask: MaskSpec, client_id: int) -> SlicePlan:
        names = self.x_names_for(client_id)
        return plan({n: self.x_layout[n] for n in names}, self.model.kept(mask))

    def y_plan(self, mask: MaskSpec) -> SlicePlan:
        return plan(self.y_layout, self.model.kept(mask))

    # ------------------------------------------------------------------ losses

    @abstractmethod
    def g(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Batch
          ) -> torch.Tensor:
        """Lower-level loss g_i on a train batch (strongly convex in y where the task says so)."""

    @abstractmethod
    def f(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Batch
          ) -> torch.Tensor:
        """Upper-level loss f_i on a validation batch: a mean over the batch's samples (a
        worker reports f over its whole validation split, evaluated in batches and averaged
        by their sizes, so that its memory does not grow with its data)."""

    @abstractmethod
    def logits(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor],
               inputs: torch.Tensor) -> torch.Tensor:
        """Predictions of the model the pair (x, y) defines."""

    def cross_entropy(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor],
                      batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(x, y, batch.inputs), batch.labels)
