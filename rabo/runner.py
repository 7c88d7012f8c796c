"""The in-process runner: the round engine driven directly, clients simulated one by one.
Its records are built by ``rabo.records``, as every transport's are.

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
from rabo.config import Config
from rabo.engine import ClientPlan, GlobalState, Update, sample_participants
from rabo.errors import AssignmentError, UpdateRejected
from rabo.evaluation import due, evaluate_round
from rabo.job import Job, resolve_device
from rabo.metrics import MetricsWriter, write_json
from rabo.policy import Resources
from rabo.records import BYTES_PER_ELEMENT, WorkerRound, round_record, summarize
from rabo.units import parse_bytes


@dataclass
class RunResult:
    state: GlobalState
    records: list[dict[str, Any]]
    summary: dict[str, Any]


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
            workers: list[WorkerRound] = []
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
                workers.append(WorkerRound(
                    f"client-{cid}", cid, plan.ratio,
                    payload_down_bytes=assignment.payload_numel() * BYTES_PER_ELEMENT,
                    payload_up_bytes=update.payload_numel() * BYTES_PER_ELEMENT,
                    compute_s=update.compute_s, peak_mem_bytes=update.peak_mem_bytes,
                    samples=update.samples, upper_loss=update.upper_loss))
            state, stats = (engine.server_step(state, results) if results
                            else engine.skip_round(state, q))
            done_at = time.perf_counter()
            evaluation = evaluate_round(job, state, device) if due(cfg, q) else None
            now = time.perf_counter()
            rec = round_record(stats, state, now - start, done_at - round_start, workers,
                               evaluation, refused, eval_s=now - done_at)
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
