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
from rabo.engine import ClientHyper, GlobalState, RoundEngine
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

    def ratio_for(self, client_id: int, resources: Resources | None
                  ) -> tuple[float | None, str]:
        """A client's ratio and why: ``clients.mode`` over the fixed ``clients.ratios`` or the
        ratio policy on ``resources`` (None: no resource limit known, ratio 1). The one place
        every transport asks; None means the client does not take part."""
        cfg = self.cfg
        if cfg.clients.mode == "full":
            return 1.0, "full model (clients.mode: full)"
        if cfg.clients.ratios:
            ratio: float | None = list(islice(cycle(cfg.clients.ratios), client_id + 1))[-1]
            why = f"fixed ratio {ratio:g} (clients.ratios)"
        elif resources is None:
            ratio, why = 1.0, "no resource limit known"
        else:
            choice = choose_ratio(self.task, self.hyper, resources, cfg.policy.ladder,
                                  cfg.policy.safety, cfg.policy.deadline_s,
                                  self.step_batch(client_id))
            ratio, why = choice.ratio, choice.reason
        if cfg.clients.mode == "exclusion" and ratio is not None and ratio < 1.0:
            return None, f"excluded: fits only ratio {ratio:g} (clients.mode: exclusion)"
        return ratio, why

    def step_batch(self, client_id: int) -> int:
        """The samples one local gradient of this client uses, for the policy's estimates:
        ``data.batch_size``, or the client's whole train split when it is 0 (full batch)."""
        b = self.cfg.data.batch_size
        if b:
            return b
        clients = self.data.clients
        return max(1, len(clients[client_id % len(clients)].train)) if clients else 1

    def simulated_ratios(self) -> list[float]:
        """Per-client ratios of a simulation (0: does not take part), from the fixed list or
        the simulated memory budgets (``clients.memory_budgets``, cycled)."""
        budgets = self.cfg.clients.memory_budgets
        out = []
        for cid in range(self.cfg.clients.count):
            res = (Resources(parse_bytes(budgets[cid % len(budgets)])) if budgets else None)
            ratio, _ = self.ratio_for(cid, res)
            out.append(0.0 if ratio is None else ratio)
        return out


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else the CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


@torch.no_grad()
def evaluate_state(task: BilevelTask, state: GlobalState, test: TensorSet,
                   device: torch.device | str = "cpu") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a global state on ``test``. Under ``lower_level:
    personalized`` every client that has trained keeps its own y: the mean over those clients
    (each its y with the shared x) is reported, since the shared y never trains there."""
    if state.y_clients:
        scores = [evaluate(task, state.x, y, test, device)
                  for _, y in sorted(state.y_clients.items())]
        return (sum(a for a, _ in scores) / len(scores),
                sum(loss for _, loss in scores) / len(scores))
    return evaluate(task, state.x, state.y, test, device)


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
