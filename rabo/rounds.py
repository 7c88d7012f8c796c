"""The round, written once for every transport.

    members -> sample participants -> ratio per member -> plans
      -> transport: assignments out, updates and measurements back
      -> magnitude checks -> server step (or an empty round) -> evaluate -> record

:class:`RoundLoop` owns that sequence, the global model between rounds and the run's
records (built by ``rabo.records``). A :class:`Transport` only moves assignments and updates
and says what it measured on the way. Three implement it, and differ only in how
assignments travel and in the faults their medium has:

* ``rabo.runner``: in this process, clients stepped one after the other (``rabo simulate``);
* ``coordinator.rounds``: gRPC workers; a worker may vanish or straggle, so a round that
  brings fewer than ``min_updates`` updates is run again (same masks and batches) up to
  ``max_retries`` times, and the transport checks each update as it arrives (to answer the
  worker);
* ``rabo.dist``: torch.distributed rank 0, one rank per client.

Checkpoints, monitoring and the run folder's other files stay with the transport
(:meth:`Transport.recorded`), since each writes them at different moments.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rabo.engine import ClientPlan, GlobalState, RoundEngine, Update, sample_participants
from rabo.errors import RaboError, UpdateRejected
from rabo.evaluation import due, evaluate_round
from rabo.job import Decision, Job
from rabo.metrics import MetricsWriter
from rabo.policy import LinkEstimate, Resources
from rabo.records import WorkerRound, round_record

log = logging.getLogger("rabo.rounds")
UNCOVERED_ROUNDS = 20  # rounds in a row a coordinate of x is uncovered before the warning


@dataclass(frozen=True)
class Member:
    """A peer that may take part in a round: ``resources`` for the ratio policy, or a
    ``fixed`` decision the transport already knows (a simulation's static budgets)."""

    name: str
    client_id: int
    resources: Resources | None = None
    fixed: Decision | None = None


@dataclass(frozen=True)
class Task:
    """One member's share of a round: its plan, and why it got that ratio."""

    name: str
    plan: ClientPlan
    reason: str
    bound: str = ""  # what kept it from the next larger ratio (rabo.job.Decision)
    estimated_mem_bytes: int = 0  # the policy's estimates at its ratio
    estimated_s: float = 0.0


@dataclass
class Returned:
    """What came back for one task. ``measured``: the transport's measurements of it (its
    ``arrived`` is set by the loop). ``update`` None: nothing usable arrived. ``checked``:
    the transport ran the magnitude check itself (``refused`` says why it failed)."""

    task: Task
    measured: WorkerRound
    update: Update | None = None
    refused: str | None = None
    checked: bool = False


@dataclass
class Exchange:
    """A round's traffic: what came back, and when the round opened (its ``round_s``
    counts from there to the aggregate)."""

    returned: list[Returned]
    opened_at: float


class Transport:
    """How a round's assignments travel. A transport implements :meth:`members` and
    :meth:`exchange`; the rest has defaults (no retries, nothing to publish or to do after a
    round)."""

    name = "transport"
    max_retries = 0  # rounds with fewer than min_updates updates are run again this often
    min_updates = 0  # 0: a round aggregates whatever arrived (an empty one changes nothing)
    # whether each worker's transfer_s is its own link's (policy.link learns from it): not
    # where arrivals are stamped in turn (torch.distributed) or nothing moves (in-process)
    measures_links = False

    def clock(self) -> float:
        return time.perf_counter()

    def members(self, q: int) -> list[Member]:
        raise NotImplementedError

    def exchange(self, q: int, state: GlobalState, tasks: list[Task],
                 not_assigned: dict[str, str], early: EarlyAggregate) -> Exchange | None:
        """Send each task's assignment, wait for the updates; None: the run was stopped
        from outside meanwhile (the round is not aggregated). A transport that checks updates
        as they arrive may hand them to ``early`` meanwhile (optional: whatever it did not
        add is added after the exchange, in the same order)."""
        raise NotImplementedError

    def publish(self, state: GlobalState) -> None:
        """The model after a round, for whatever serves it to the peers."""

    def retrying(self, q: int, attempt: int, got: int) -> None:
        """Round ``q``'s try ``attempt`` brought ``got`` < min_updates updates."""

    def recorded(self, rec: dict[str, Any], state: GlobalState) -> None:
        """Round ``rec['round']`` is recorded (checkpoints, monitoring)."""


class EarlyAggregate:
    """Averages a round's updates while its other transfers are still running.

    The sums must run in increasing client id on every transport (that is what makes gRPC,
    gloo and the simulator give the same bits), so an update goes in once it and every task
    before it in that order are resolved: arrived and checked, or refused. A worker that is
    slow, or never answers, holds back only the updates after it; whatever is left when the
    round closes goes in then (``RoundEngine.server_step`` with ``started``). Off under
    ``aggregation.clip_rms``, which scales each update by the medians of the whole round.
    """

    def __init__(self, engine: RoundEngine, state: GlobalState, q: int, tasks: list[Task]
                 ) -> None:
        self.aggregation = (engine.aggregation(state, q)
                            if tasks and not engine.cfg.aggregation.clip_rms else None)
        self._order = sorted(((t.plan.client_id, t.plan) for t in tasks), key=lambda p: p[0])
        self._next = 0  # position in _order of the first task not yet resolved here

    def ready(self, resolved: Mapping[int, Update | None]) -> bool:
        """Whether :meth:`offer` of ``resolved`` would take anything in."""
        return (self.aggregation is not None and self._next < len(self._order)
                and self._order[self._next][0] in resolved)

    def offer(self, resolved: Mapping[int, Update | None]) -> int:
        """Adds the updates that can go in now. ``resolved``: per client id, its checked
        update, or None when the task ended without a usable one (refused). Returns how many
        went in."""
        added = 0
        while self.ready(resolved):
            cid, plan = self._order[self._next]
            upd = resolved[cid]
            if upd is not None:
                assert self.aggregation is not None
                self.aggregation.add(plan, upd)
                added += 1
            self._next += 1
        return added


class RoundsExhausted(RaboError):
    """Every try of a round brought fewer than the transport's ``min_updates``."""


@dataclass
class RoundLoop:
    """Runs rounds ``state.round + 1 .. cfg.rounds`` of ``job`` over ``transport``.
    ``records`` holds the rounds already run (a resumed run's); ``writer`` gets each new one;
    ``progress`` is called with it. ``device``: where the global model is evaluated."""

    job: Job
    transport: Transport
    state: GlobalState
    records: list[dict[str, Any]] = field(default_factory=list)
    writer: MetricsWriter | None = None
    progress: Callable[[dict[str, Any]], None] | None = None
    device: Any = "cpu"
    retries: int = 0  # round tries that were run again, over the whole run
    # per member name, per ratio: the largest peak memory its worker reported above its
    # start-up footprint (the ratio policy's calibration, policy.calibrate)
    peaks: dict[str, dict[float, int]] = field(default_factory=dict)
    # per member name: its link's seconds per byte, from the rounds it ran (policy.link)
    links: dict[str, LinkEstimate] = field(default_factory=dict)
    stopped: bool = False  # the transport reported a stop from outside
    # coordinates of x that no update covered in any round since ``_gap_start`` (a streak of
    # rounds each leaving some coordinates uncovered); warned of once (UNCOVERED_ROUNDS)
    _never: dict[str, Any] | None = None
    _gap_start: int = 0
    _gap_warned: bool = False

    def run(self) -> GlobalState:
        """Every remaining round; returns the final model (also ``self.state``)."""
        cfg = self.job.cfg
        start = self.transport.clock()
        for q in range(self.state.round + 1, cfg.rounds + 1):
            rec = self.run_round(q, start)
            if rec is None:
                self.stopped = True
                break
        return self.state

    def _watch_coverage(self, q: int, stats: Any) -> None:
        """Warn once when, under static masks, some coordinates of x were covered by no update
        in each of ``UNCOVERED_ROUNDS`` rounds in a row: with static masks what a round covers
        depends only on who takes part and at which ratio, so such coordinates are not being
        trained (e.g. two workers at ratio 0.5 leave everything beyond the first half of each
        layer untouched). Rolling and random masks move over the whole model with time (a
        sweep can take many rounds), so a gap there is not a sign of anything."""
        if self._gap_warned or self.job.cfg.mask.policy != "static":
            return
        if stats.coverage_x.total == 0:  # nothing aggregated (all updates dropped): no news
            return
        covered = stats.x_covered
        if covered is None:  # everything covered this round: no coordinate's gap goes on
            self._never = None
            return
        if self._never is None:
            self._never, self._gap_start = {k: ~c for k, c in covered.items()}, q
        else:
            for k, c in covered.items():
                self._never[k] &= ~c
        if q - self._gap_start + 1 < UNCOVERED_ROUNDS:
            return
        idle = sum(int(t.sum()) for t in self._never.values())
        if idle == 0:
            self._never = None  # every coordinate was covered at some point: a new streak
            return
        total = sum(t.numel() for t in self._never.values())
        log.warning("%d of %d coordinates of x (%.0f%%) were covered by no worker's submodel "
                    "in rounds %d-%d, so they were not trained: under static masks every "
                    "submodel keeps the first units of each layer; use mask.policy=rolling or "
                    "random, or have a worker at ratio 1 take part", idle, total,
                    100 * idle / total, self._gap_start, q)
        self._gap_warned = True

    def plan(self, q: int, members: list[Member]) -> tuple[list[Task], dict[str, str]]:
        """Round ``q``'s participants (seeded sample of ``members``), their ratios and plans;
        and those that cannot take part, with why."""
        engine = self.job.engine
        by_client = {m.client_id: m for m in members}
        participants = sample_participants(self.job.cfg.seed, q, list(by_client),
                                           self.job.cfg.clients.participation)
        tasks: list[Task] = []
        not_assigned: dict[str, str] = {}
        for cid in participants:
            m = by_client[cid]
            resources = m.resources
            link = self.links.get(m.name)
            if resources is not None and link is not None:
                resources = dataclasses.replace(resources, link_s_per_byte=link.s_per_byte,
                                                link_fixed_s=link.fixed_s)
            d = m.fixed if m.fixed is not None else self.job.decide(
                cid, resources, self.peaks.get(m.name), links=self.transport.measures_links)
            if d.ratio is None:
                not_assigned[m.name] = f"not assigned: {d.reason}"
                log.warning("round %d: %s not assigned: %s", q, m.name, d.reason)
                if link is not None and d.bound == "link":
                    # a worker left out for its link is measured no more: let the estimate
                    # decay (halve it each round), so that a link that got
                    # faster, or one slow round, does not keep it out for the rest of the run
                    link.decay()
                continue
            tasks.append(Task(m.name, engine.plan(q, cid, d.ratio), d.reason, d.bound,
                              d.memory_bytes, d.time_s))
        return tasks, not_assigned

    def run_round(self, q: int, start: float) -> dict[str, Any] | None:
        """One round, with the transport's retries; its record (None: stopped)."""
        t = self.transport
        for attempt in range(t.max_retries + 1):
            cpu0 = time.process_time()
            tasks, not_assigned = self.plan(q, t.members(q))
            early = EarlyAggregate(self.job.engine, self.state, q, tasks)
            ex = t.exchange(q, self.state, tasks, not_assigned, early)
            if ex is None:
                return None
            got = sum(1 for r in ex.returned if r.update is not None and r.refused is None)
            if got >= t.min_updates:
                return self._finish(q, ex, not_assigned, start, cpu0, early)
            self.retries += 1
            t.retrying(q, attempt, got)
        raise RoundsExhausted(f"round {q}: fewer than {t.min_updates} updates in "
                              f"{t.max_retries + 1} attempts")

    def _finish(self, q: int, ex: Exchange, not_assigned: dict[str, str], start: float,
                cpu0: float, early: EarlyAggregate) -> dict[str, Any]:
        engine, t = self.job.engine, self.transport
        results: list[tuple[ClientPlan, Update]] = []
        workers: list[WorkerRound] = []
        refused: dict[int, str] = {}
        for r in sorted(ex.returned, key=lambda r: r.task.plan.client_id):
            plan, why = r.task.plan, r.refused
            if r.update is not None and why is None and not r.checked:
                try:
                    engine.check_magnitude(self.state, plan, r.update)
                except UpdateRejected as exc:
                    why = str(exc)
                    log.warning("round %d: the update of %s was refused: %s", q, r.task.name,
                                exc)
            if why is not None:
                refused[plan.client_id] = why
            elif r.update is not None:
                results.append((plan, r.update))
            workers.append(dataclasses.replace(
                r.measured, arrived=r.update is not None and why is None, bound=r.task.bound,
                estimated_mem_bytes=r.task.estimated_mem_bytes,
                estimated_s=r.task.estimated_s))
            if (self.job.cfg.policy.calibrate and r.update is not None and why is None
                    and r.measured.peak_mem_bytes > 0):
                seen = self.peaks.setdefault(r.task.name, {})
                seen[plan.ratio] = max(seen.get(plan.ratio, 0), r.measured.peak_mem_bytes)
            if self.job.cfg.policy.link and self.transport.measures_links \
                    and r.update is not None:
                self.links.setdefault(r.task.name, LinkEstimate()).add(
                    r.measured.payload_down_bytes + r.measured.payload_up_bytes,
                    r.measured.transfer_s)
        self.state, stats = (engine.server_step(self.state, results, early.aggregation)
                             if results else engine.skip_round(self.state, q))
        if results:
            self._watch_coverage(q, stats)
        t.publish(self.state)
        done_at = t.clock()
        cpu_s = time.process_time() - cpu0
        evaluation = (evaluate_round(self.job, self.state, self.device)
                      if due(self.job.cfg, q) else None)
        now = t.clock()
        rec = round_record(stats, self.state, now - start, done_at - ex.opened_at, workers,
                           evaluation, refused, eval_s=now - done_at,
                           not_assigned=not_assigned, process_cpu_s=cpu_s)
        self.records.append(rec)
        if self.writer:
            self.writer.write(rec)
        t.recorded(rec, self.state)
        if self.progress:
            self.progress(rec)
        return rec
