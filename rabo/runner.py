"""The in-process runner: the round engine driven directly, clients simulated one by one.

It is the reference the gRPC and torch.distributed transports are tested against, and the
quick way to study the method (``rabo simulate``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rabo.checkpoint import lock_run_dir
from rabo.config import Config, to_dict
from rabo.engine import ClientPlan, GlobalState, RoundStats, Update, sample_participants
from rabo.errors import AssignmentError, UpdateRejected
from rabo.evaluation import EMPTY_RECORD, Evaluation, due, evaluate_round
from rabo.job import Job, resolve_device
from rabo.metrics import MetricsWriter, write_json
from rabo.policy import Resources
from rabo.units import parse_bytes

BYTES_PER_ELEMENT = 4


@dataclass
class RunResult:
    state: GlobalState
    records: list[dict[str, Any]]
    summary: dict[str, Any]


def round_record(stats: RoundStats, state: GlobalState, wall_s: float, round_s: float,
                 clients: list[dict[str, Any]], evaluation: Evaluation | None,
                 refused: dict[int, str] | None = None) -> dict[str, Any]:
    """The per-round metrics object shared by every transport. The global model's figures
    (``upper_loss``, ``test_*``) are None in a round that does not evaluate it."""
    rec: dict[str, Any] = {
        "round": stats.round,
        "wall_s": round(wall_s, 4),
        "round_s": round(round_s, 4),
        **(evaluation.as_record() if evaluation else EMPTY_RECORD),
        "client_upper_loss": stats.upper_loss,
        "hypergradient_norm": stats.step_norm,
        **stats.coverage_x.as_dict("coverage_x"),
        **stats.coverage_y.as_dict("coverage_y"),
        "c_x_star": state.c_x_star,
        "aggregation_s": round(stats.aggregation_s, 6),
        # client id -> why its update was refused before aggregation (its magnitude)
        "refused_updates": {str(k): v for k, v in sorted((refused or {}).items())},
        "dropped_updates": list(stats.dropped),  # the aggregate was non-finite with them
        "clipped_parts": stats.clipped,
        "participants": len(clients),
        "clients": clients,
    }
    return rec


def client_record(plan: ClientPlan, update: Update, down_elems: int) -> dict[str, Any]:
    up_elems = update.payload_numel()
    return {
        "client_id": plan.client_id,
        "ratio": plan.ratio,
        "payload_down_elems": down_elems,
        "payload_up_elems": up_elems,
        "payload_down_bytes": down_elems * BYTES_PER_ELEMENT,
        "payload_up_bytes": up_elems * BYTES_PER_ELEMENT,
        "compute_s": round(update.compute_s, 6),
        "peak_mem_bytes": update.peak_mem_bytes,
        "upper_loss": update.upper_loss,
    }


def summarize(cfg: Config, state: GlobalState, records: list[dict[str, Any]], wall_s: float,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    evaluated = [r for r in records if r.get("test_acc") is not None]
    last = evaluated[-1] if evaluated else {}
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
        "config": to_dict(cfg),
    }


def simulate(cfg: Config, out_dir: str | Path | None = None,
             progress: Callable[[dict[str, Any]], None] | None = None,
             job: Job | None = None) -> RunResult:
    """Run ``cfg.rounds`` rounds in this process; write the run folder when ``out_dir``."""
    job = job or Job.from_config(cfg)
    device = resolve_device(cfg.device)
    engine = job.engine
    ratios = job.simulated_ratios()
    eligible = [c for c, r in enumerate(ratios) if r > 0]
    if not eligible:
        budgets = cfg.clients.memory_budgets
        why = job.ratio_for(0, Resources(parse_bytes(budgets[0])))[1] if budgets else ""
        raise AssignmentError(f"no client fits the smallest ratio of the ladder "
                              f"{sorted(cfg.policy.ladder)} in its memory budget "
                              f"(clients.memory_budgets = {list(budgets or [])})"
                              + (f"; client 0: {why}" if why else ""))
    state = engine.init_state()
    if out_dir is not None:
        lock_run_dir(out_dir)  # one run per folder (a second gets an error naming the pid)
    writer = MetricsWriter(out_dir) if out_dir is not None else None
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        for q in range(1, cfg.rounds + 1):
            round_start = time.perf_counter()
            participants = sample_participants(cfg.seed, q, eligible, cfg.clients.participation)
            results: list[tuple[ClientPlan, Update]] = []
            clients = []
            refused: dict[int, str] = {}
            for cid in participants:
                plan = engine.plan(q, cid, ratios[cid])
                assignment = engine.assign(state, plan)
                update = engine.client_step(assignment, job.data.clients[cid], device)
                try:
                    engine.check_magnitude(state, plan, update)
                except UpdateRejected as exc:
                    refused[cid] = str(exc)
                    continue
                results.append((plan, update))
                clients.append(client_record(plan, update, assignment.payload_numel()))
            state, stats = (engine.server_step(state, results) if results
                            else engine.skip_round(state, q))
            evaluation = evaluate_round(job, state, device) if due(cfg, q) else None
            now = time.perf_counter()
            rec = round_record(stats, state, now - start, now - round_start, clients,
                               evaluation, refused)
            records.append(rec)
            if writer:
                writer.write(rec)
            if progress:
                progress(rec)
    finally:
        if writer:
            writer.close()
    summary = summarize(cfg, state, records, time.perf_counter() - start,
                        {"transport": "in-process"})
    if out_dir is not None:
        write_json(Path(out_dir) / "summary.json", summary)
    return RunResult(state, records, summary)


def format_progress(rec: dict[str, Any], total_rounds: int) -> str:
    """One terminal line per round."""
    ratios = ",".join(f"{c['ratio']:g}" for c in rec["clients"])
    acc, loss = rec.get("test_acc"), rec.get("upper_loss")
    acc_s = f"{100 * acc:5.1f}%" if acc is not None else "   -  "
    loss_s = f"{loss:.4f}" if loss is not None else "   -  "
    return (f"round {rec['round']:>3}/{total_rounds}  test_acc {acc_s}  "
            f"upper_loss {loss_s}  cov_x min {rec['coverage_x_min']} "
            f"mean {rec['coverage_x_mean']:.2f}  ratios [{ratios}]  {rec['round_s']:.2f}s")
