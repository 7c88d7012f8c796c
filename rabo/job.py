"""Everything one run needs, built from a config: data, model, task and round engine.

The simulator, the coordinator, every worker and every torch.distributed rank build the same
:class:`Job` from the same config, so they agree on shapes, partitions and seeds without
shipping any of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import cycle, islice

import torch

from rabo.config import Config
from rabo.data import FederatedData, TensorSet, build_federated
from rabo.engine import ClientHyper, RoundEngine
from rabo.models import WidthModel, build_model
from rabo.params import Params
from rabo.policy import Resources, choose_ratio
from rabo.tasks import BilevelTask, build_task
from rabo.units import parse_bytes


@dataclass
class Job:
    cfg: Config
    data: FederatedData
    model: WidthModel
    task: BilevelTask
    engine: RoundEngine

    @classmethod
    def from_config(cls, cfg: Config) -> Job:
        data = build_federated(cfg.data, cfg.clients.count, cfg.seed)
        model = build_model(cfg.model.kind, data.input_shape, data.num_classes,
                            cfg.model.hidden, cfg.model.channels, cfg.model.kernel,
                            cfg.model.scaler)
        task = build_task(cfg, model, [len(c.train) for c in data.clients])
        return cls(cfg, data, model, task, RoundEngine(cfg, task))

    @property
    def hyper(self) -> ClientHyper:
        return self.engine.hyper

    def simulated_ratios(self) -> list[float]:
        """Per-client ratios of a simulation: the fixed list, or the policy's choice for each
        simulated memory budget, or 1 for everyone."""
        n = self.cfg.clients.count
        if self.cfg.clients.ratios:
            return list(islice(cycle(self.cfg.clients.ratios), n))
        if self.cfg.clients.memory_budgets:
            ratios = []
            for budget in islice(cycle(self.cfg.clients.memory_budgets), n):
                choice = choose_ratio(self.task, self.hyper, Resources(parse_bytes(budget)),
                                      self.cfg.policy.ladder, self.cfg.policy.safety, 0.0,
                                      self.cfg.data.batch_size or 1)
                ratios.append(0.0 if choice.ratio is None else choice.ratio)
            return ratios
        return [1.0] * n


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else the CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


@torch.no_grad()
def evaluate(task: BilevelTask, x: Params, y: Params, test: TensorSet,
             device: torch.device | str = "cpu", batch: int = 2048) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the model (x, y) on ``test``."""
    device = torch.device(device)
    xs = {k: t.to(device) for k, t in x.items()}
    ys = {k: t.to(device) for k, t in y.items()}
    correct = 0
    loss = 0.0
    n = len(test)
    for i in range(0, n, batch):
        inputs = test.inputs[i:i + batch].to(device)
        labels = test.labels[i:i + batch].to(device)
        logits = task.logits(xs, ys, inputs)
        loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
    return correct / max(n, 1), loss / max(n, 1)
