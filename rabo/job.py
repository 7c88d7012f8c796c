"""Everything one run needs, built from a config: data, model, task and round engine.

The simulator, the coordinator, every worker and every torch.distributed rank build the same
:class:`Job` from the same config, so they agree on shapes, partitions and seeds without
shipping any of it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import cycle, islice

import torch

from rabo.config import Config
from rabo.data import FederatedData, build_federated
from rabo.engine import ClientHyper, RoundEngine
from rabo.errors import ConfigError
from rabo.models import PrunableModel, model_from_config
from rabo.policy import Resources, choose_ratio
from rabo.tasks import BilevelTask, build_task
from rabo.units import parse_bytes

log = logging.getLogger("rabo")


@dataclass(frozen=True)
class Decision:
    """A client's ratio for a round and why: ``bound``, what kept it from the next larger
    ratio ("memory", "compute", "link", "probe" for a link not measured yet, "none" when the
    ladder's largest fits, "fixed" for clients.ratios or clients.mode, "" when no limit is
    known); the policy's estimates at the chosen ratio (peak memory above start-up, step plus
    transfer seconds; 0 where not estimated)."""

    ratio: float | None
    reason: str
    bound: str = ""
    memory_bytes: int = 0
    time_s: float = 0.0


@dataclass
class Job:
    cfg: Config
    data: FederatedData
    model: PrunableModel
    task: BilevelTask
    engine: RoundEngine

    @classmethod
    def from_config(cls, cfg: Config) -> Job:
        data = build_federated(cfg.data, cfg.clients.count, cfg.seed)
        model = model_from_config(cfg.model, data.input_shape, data.num_classes)
        if cfg.model.scaler == "forward" and not model.has_normalization:
            log.warning("model.scaler: forward on a model without normalization layers "
                        "multiplies a small client's gradients by about 1/(kept fraction) "
                        "(21-85x measured at ratio 1/8), so small clients dominate shared "
                        "coordinates; 'consistent' corrects it (docs/method.md)")
        task = build_task(cfg, model, [len(c.train) for c in data.clients])
        return cls(cfg, data, model, task, RoundEngine(cfg, task))

    def reconfigured(self, cfg: Config) -> Job:
        """This job under ``cfg`` (same data, model and task: ``cfg`` may change only what
        they do not depend on, e.g. budgets or the estimator), with a new round engine."""
        return Job(cfg, self.data, self.model, self.task, RoundEngine(cfg, self.task))

    @property
    def hyper(self) -> ClientHyper:
        return self.engine.hyper

    def ratio_for(self, client_id: int, resources: Resources | None,
                  measured: Mapping[float, int] | None = None) -> tuple[float | None, str]:
        """A client's ratio and why (:meth:`decide`)."""
        d = self.decide(client_id, resources, measured)
        return d.ratio, d.reason

    def decide(self, client_id: int, resources: Resources | None,
               measured: Mapping[float, int] | None = None, links: bool = True
               ) -> Decision:
        """A client's ratio, why, and the policy's estimates: ``clients.mode`` over the fixed
        ``clients.ratios`` or the ratio policy on ``resources`` (None: no resource limit
        known, ratio 1) and the peaks measured on its worker (``measured``: per ratio, bytes
        above its start-up footprint). ``links`` False: the transport measures no links
        (policy.link does not apply: no probe round). The one place every transport asks; a
        ratio of None means the client does not take part."""
        cfg = self.cfg
        if cfg.clients.mode == "full":
            return Decision(1.0, "full model (clients.mode: full)", "fixed")
        if cfg.clients.ratios:
            ratio = list(islice(cycle(cfg.clients.ratios), client_id + 1))[-1]
            d = Decision(ratio, f"fixed ratio {ratio:g} (clients.ratios)", "fixed")
        elif resources is None:
            d = Decision(1.0, "no resource limit known")
        else:
            choice = choose_ratio(self.task, self.hyper, resources, cfg.policy.ladder,
                                  cfg.policy.safety, cfg.policy.deadline_s,
                                  self.step_batch(client_id), measured,
                                  link=cfg.policy.link and links,
                                  element_bytes=self.hyper.wire.bytes_per_element)
            d = Decision(choice.ratio, choice.reason, choice.bound, choice.memory_bytes,
                         choice.step_s + choice.transfer_s)
        if cfg.clients.mode == "exclusion" and d.ratio is not None and d.ratio < 1.0:
            return Decision(None, f"excluded: fits only ratio {d.ratio:g} (clients.mode: "
                                  f"exclusion)", "fixed")
        return d

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


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The one reading of a device setting (``device`` in the config, ``rabo worker
    --device``): 'auto' picks CUDA when available, else the CPU; 'cuda' or 'cuda:N' without a
    GPU is a ``ConfigError``. ``local_rank`` (torch.distributed): 'auto' and 'cuda' take GPU
    ``local_rank % count``, so more ranks than GPUs share them round-robin."""
    cuda = torch.cuda.is_available()
    if name.startswith("cuda") and not cuda:
        raise ConfigError(f"device {name!r} was asked for but torch sees no CUDA device "
                          f"(use 'auto' or 'cpu')")
    if name in ("auto", "cuda") and cuda:
        if local_rank is not None:
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r}: {exc}") from None
