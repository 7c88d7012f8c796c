"""The in-process runner: the round loop (``rabo.rounds``) with clients simulated one by one
in this process.

It is the reference the gRPC and torch.distributed transports are tested against, and the
quick way to study the method (``rabo simulate``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rabo.checkpoint import lock_run_dir
from rabo.config import Config
from rabo.engine import GlobalState
from rabo.errors import AssignmentError
from rabo.job import Job, resolve_device
from rabo.metrics import MetricsWriter, write_json
from rabo.policy import Resources
from rabo.records import WorkerRound, summarize
from rabo.rounds import EarlyAggregate, Exchange, Member, Returned, RoundLoop, Task, Transport
from rabo.units import parse_bytes
from rabo.wireformat import ClientResiduals


@dataclass
class RunResult:
    state: GlobalState
    records: list[dict[str, Any]]
    summary: dict[str, Any]


class InProcess(Transport):
    """The round loop's in-process transport: each participant's client step runs here, one
    after the other. The clients whose simulated budget fits no ratio never join (they are
    no members), as a worker too small for the ladder would not."""

    name = "in-process"

    def __init__(self, job: Job, device: torch.device) -> None:
        self.job = job
        self.device = device
        self.residuals = ClientResiduals()  # the clients' int8 error feedback, for this run
        budgets = job.cfg.clients.memory_budgets
        self._members = []
        for cid in range(job.cfg.clients.count):
            res = Resources(parse_bytes(budgets[cid % len(budgets)])) if budgets else None
            # fixed for the run: budgets do not change, and nothing moves over a link
            d = job.decide(cid, res, links=False)
            if d.ratio is not None and d.ratio > 0:
                self._members.append(Member(f"client-{cid}", cid, res, d))

    def members(self, q: int) -> list[Member]:
        return self._members

    def exchange(self, q: int, state: GlobalState, tasks: list[Task],
                 not_assigned: dict[str, str], early: EarlyAggregate) -> Exchange:
        opened = self.clock()
        engine = self.job.engine
        fmt = engine.hyper.wire
        out = []
        for t in tasks:
            cid = t.plan.client_id
            assignment = engine.assign(state, t.plan)
            update = engine.client_step(assignment, self.job.data.clients[cid], self.device,
                                        self.residuals.of(fmt, cid))
            record = WorkerRound(
                t.name, cid, t.plan.ratio, reason=t.reason,
                element_bytes=fmt.bytes_per_element,
                payload_down_bytes=assignment.payload_bytes(),
                payload_up_bytes=update.payload_bytes(),
                compute_s=update.compute_s, peak_mem_bytes=update.peak_mem_bytes,
                samples=update.samples, upper_loss=update.upper_loss)
            out.append(Returned(t, record, update.received(fmt)))
        return Exchange(out, opened)


def simulate(cfg: Config, out_dir: str | Path | None = None,
             progress: Callable[[dict[str, Any]], None] | None = None,
             job: Job | None = None) -> RunResult:
    """Run ``cfg.rounds`` rounds in this process; write the run folder when ``out_dir``."""
    from rabo.provenance import provenance

    started_at = time.time()
    provenance()  # the checkout as the run starts (edits made while it runs do not count)
    job = job or Job.from_config(cfg)
    device = resolve_device(cfg.device)
    transport = InProcess(job, device)
    if not transport.members(1):
        budgets = cfg.clients.memory_budgets
        why = job.ratio_for(0, Resources(parse_bytes(budgets[0])))[1] if budgets else ""
        raise AssignmentError(f"no client fits the smallest ratio of the ladder "
                              f"{sorted(cfg.policy.ladder)} in its memory budget "
                              f"(clients.memory_budgets = {list(budgets or [])})"
                              + (f"; client 0: {why}" if why else ""))
    if out_dir is not None:
        lock_run_dir(out_dir)  # one run per folder (a second gets an error naming the pid)
    writer = MetricsWriter.for_run(out_dir)
    loop = RoundLoop(job, transport, job.engine.init_state(), writer=writer,
                     progress=progress, device=device)
    start = time.perf_counter()
    try:
        loop.run()
    finally:
        if writer:
            writer.close()
    summary = summarize(cfg, loop.state, loop.records, time.perf_counter() - start,
                        {"transport": "in-process"}, started_at=started_at)
    if out_dir is not None:
        write_json(Path(out_dir) / "summary.json", summary)
    return RunResult(loop.state, loop.records, summary)


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """``[########------------]`` for ``done`` of ``total``."""
    filled = min(width, max(0, round(width * done / total))) if total > 0 else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class ProgressLine:
    """The per-round line with the run's pace: rounds per second (or seconds per round) since
    the first round this process saw, and the time left at that pace. A resumed run counts from
    where it resumed. On a terminal (``bar``: stdout is one) the line starts with a progress
    bar; in a log (a file, a pipe) it stays one plain line per round."""

    def __init__(self, total_rounds: int, clock: Callable[[], float] = time.monotonic,
                 bar: bool | None = None) -> None:
        self.total, self.clock = total_rounds, clock
        self.bar = _stdout_is_terminal() if bar is None else bar
        self._t0: float | None = None
        self._q0 = 0

    def __call__(self, rec: dict[str, Any]) -> str:
        now = self.clock()
        if self._t0 is None:  # the first round's own time is known: start the clock there
            self._t0, self._q0 = now - float(rec.get("round_s") or 0.0), rec["round"] - 1
        done = max(1, rec["round"] - self._q0)
        per_round = max(1e-9, (now - self._t0) / done)
        pace = (f"{1 / per_round:.2f} rounds/s" if per_round < 1 else
                f"{format_duration(per_round)}/round")
        left = self.total - rec["round"]
        return ((progress_bar(rec["round"], self.total) + " " if self.bar else "")
                + format_progress(rec, self.total)
                + (f"  {pace}, ETA {format_duration(per_round * left)}" if left > 0 else ""))


def _stdout_is_terminal() -> bool:
    import sys

    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def format_progress(rec: dict[str, Any], total_rounds: int) -> str:
    """One terminal line per round."""
    # a ratio the policy chose under a binding resource carries it: 0.25(link), 0.5(memory)
    ratios = ",".join(f"{c['ratio']:g}" + (f"({c['bound']})" if c.get("bound") in
                                           ("memory", "compute", "link", "probe") else "")
                      for c in rec["clients"])
    acc, loss = rec.get("test_acc"), rec.get("upper_loss")
    acc_s = f"{100 * acc:5.1f}%" if acc is not None else "   -  "
    loss_s = f"{loss:.4f}" if loss is not None else "   -  "
    return (f"round {rec['round']:>3}/{total_rounds}  test_acc {acc_s}  "
            f"upper_loss {loss_s}  cov_x min {rec['coverage_x_min']} "
            f"mean {rec['coverage_x_mean']:.2f}  ratios [{ratios}]  {rec['round_s']:.2f}s")
