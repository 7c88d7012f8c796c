"""The metrics schema: one round's record, one worker's record in it, and a run's summary.

Every transport (the in-process runner, the gRPC round driver, torch.distributed's rank 0)
builds its records here, so ``metrics.jsonl`` and ``summary.json`` have one shape whatever
carried the round; what a transport cannot measure is None (the in-process runner moves no
messages, so its message and wire bytes are None and its transfer time 0).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rabo.config import Config, to_dict
from rabo.engine import GlobalState, RoundStats
from rabo.evaluation import EMPTY_RECORD, Evaluation
from rabo.netstat import SocketCounters

BYTES_PER_ELEMENT = 4


@dataclass(frozen=True)
class WorkerRound:
    """What one worker's share of one round cost. ``wire``: the kernel's counters of its
    connection over the round (None where they cannot be read)."""

    worker_id: str
    client_id: int
    ratio: float
    arrived: bool = True
    reason: str = ""
    payload_down_bytes: int = 0
    payload_up_bytes: int = 0
    message_down_bytes: int | None = None
    message_up_bytes: int | None = None
    wire: SocketCounters | None = None
    compute_s: float = 0.0
    receive_s: float = 0.0
    upload_s: float = 0.0
    transfer_s: float = 0.0
    peak_mem_bytes: int = 0
    # wire bytes per slice entry (wire.dtype; int8: its block scales spread over each block,
    # so the entry counts below are then exact to within the tensors' partial blocks)
    element_bytes: float = BYTES_PER_ELEMENT
    samples: int = 0
    upper_loss: float | None = None
    # the ratio policy's decision (rabo.job.Decision): what bound the ratio, and its
    # estimates at that ratio, beside the measured peak_mem_bytes and compute + transfer time
    bound: str = ""
    estimated_mem_bytes: int = 0
    estimated_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        w = self.wire
        return {
            "worker_id": self.worker_id,
            "client_id": self.client_id,
            "ratio": self.ratio,
            "arrived": self.arrived,
            "reason": self.reason,
            "payload_down_elems": round(self.payload_down_bytes / self.element_bytes),
            "payload_up_elems": round(self.payload_up_bytes / self.element_bytes),
            "payload_down_bytes": self.payload_down_bytes,
            "payload_up_bytes": self.payload_up_bytes,
            "message_down_bytes": self.message_down_bytes,
            "message_up_bytes": self.message_up_bytes,
            "wire_down_bytes": w.bytes_sent if w else None,
            "wire_up_bytes": w.bytes_received if w else None,
            "wire_down_l2_bytes": w.l2_sent() if w else None,
            "wire_up_l2_bytes": w.l2_received() if w else None,
            "compute_s": round(self.compute_s, 6),
            "receive_s": round(self.receive_s, 6),
            "upload_s": round(self.upload_s, 6),
            "transfer_s": round(max(0.0, self.transfer_s), 6),
            "peak_mem_bytes": self.peak_mem_bytes,
            "samples": self.samples,
            "upper_loss": self.upper_loss,
            "bound": self.bound,
            "estimated_peak_mem_bytes": self.estimated_mem_bytes,
            "estimated_s": round(self.estimated_s, 6),
        }


def round_record(stats: RoundStats, state: GlobalState, wall_s: float, round_s: float,
                 workers: Sequence[WorkerRound], evaluation: Evaluation | None,
                 refused: dict[int, str] | None = None, eval_s: float = 0.0,
                 not_assigned: dict[str, str] | None = None, process_cpu_s: float = 0.0
                 ) -> dict[str, Any]:
    """The per-round metrics object. ``workers``: everyone assigned this round; those whose
    update did not arrive are listed under ``left_out``, the others under ``clients``. The
    global model's figures (``upper_loss``, ``test_*``) are None in a round that does not
    evaluate it."""
    clients = [w.as_dict() for w in workers if w.arrived]
    wire = [c["wire_down_bytes"] for c in clients] + [c["wire_up_bytes"] for c in clients]
    return {
        "round": stats.round,
        "wall_s": round(wall_s, 4),
        "round_s": round(round_s, 4),
        "eval_s": round(eval_s, 6),
        **(evaluation.as_record() if evaluation else EMPTY_RECORD),
        "client_upper_loss": stats.upper_loss,
        "hypergradient_norm": stats.step_norm,
        **stats.coverage_x.as_dict("coverage_x"),
        **stats.coverage_y.as_dict("coverage_y"),
        "c_x_star": state.c_x_star,
        "aggregation_s": round(stats.aggregation_s, 6),
        "aggregated_early": stats.early,
        # CPU (user + system, every thread) of the process running the round loop, from
        # planning to the aggregate: the coordinator's own work on gRPC and torch.distributed
        # (rank 0); in-process it includes the clients' steps
        "process_cpu_s": round(process_cpu_s, 6),
        # client id -> why its update was refused before aggregation (its magnitude)
        "refused_updates": {str(k): v for k, v in sorted((refused or {}).items())},
        "dropped_updates": list(stats.dropped),  # the aggregate was non-finite with them
        "clipped_parts": stats.clipped,
        "participants": len(clients),
        "clients": clients,
        "left_out": [w.as_dict() for w in workers if not w.arrived],
        "not_assigned": dict(not_assigned or {}),
        "compute_s": max((c["compute_s"] for c in clients), default=0.0),
        "transfer_s": max((c["transfer_s"] for c in clients), default=0.0),
        "wire_bytes": sum(wire) if all(v is not None for v in wire) else None,
        "payload_bytes": sum(c["payload_down_bytes"] + c["payload_up_bytes"] for c in clients),
    }


def summarize(cfg: Config, state: GlobalState, records: list[dict[str, Any]], wall_s: float,
              extra: dict[str, Any] | None = None, started_at: float | None = None
              ) -> dict[str, Any]:
    """A run's summary.json: the last evaluated round's figures, the best accuracy, and what
    the transport adds (``extra``)."""
    import datetime

    from rabo.provenance import provenance

    evaluated = [r for r in records if r.get("test_acc") is not None]
    last = evaluated[-1] if evaluated else {}
    # when the run (this process's part of it) started: set-up and the wait for workers
    # included; callers pass it, the rounds' wall time is only a fallback
    started = datetime.datetime.fromtimestamp(
        started_at if started_at is not None else time.time() - wall_s, datetime.timezone.utc)
    return {
        "rounds": state.round,
        "test_acc": last.get("test_acc"),
        "test_loss": last.get("test_loss"),
        "best_test_acc": max((r["test_acc"] for r in evaluated), default=None),
        "upper_loss": last.get("upper_loss"),
        "test_acc_per_class": last.get("test_acc_per_class"),
        "test_acc_per_width": last.get("test_acc_per_width"),
        "client_upper_loss": records[-1]["client_upper_loss"] if records else None,
        "C_x_star": state.c_x_star,
        "wall_s": round(wall_s, 3),
        **(extra or {}),
        # what produced the numbers: version, commit, torch build, host, command line
        "provenance": {**provenance(), "started_at": started.isoformat(timespec="seconds")},
        "config": to_dict(cfg),
    }
