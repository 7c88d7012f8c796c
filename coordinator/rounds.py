"""The gRPC transport of the round loop (``rabo.rounds``): opens each round's ticket for the
servicer, waits until every assigned update arrived or the deadline passed (stragglers that
still move bytes earn grace), retries thin rounds, checkpoints and monitors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from coordinator.payloads import SharedPayloads, full_payload_bytes
from coordinator.state import Coordinator, CoordinatorError, RoundTicket, WorkerTask
from coordinator.wire import resources_of
from rabo import checkpoint
from rabo.config import to_dict
from rabo.engine import GlobalState, Update
from rabo.metrics import MetricsWriter, truncate_metrics, wire_total, write_json
from rabo.records import WorkerRound, summarize
from rabo.rounds import EarlyAggregate, Exchange, Member, Returned, RoundLoop, Task, Transport

log = logging.getLogger("rabo.coordinator")


# --------------------------------------------------------------------------- the rounds


class RoundDriver(Transport):
    """The gRPC transport of the round loop (``rabo.rounds.RoundLoop``), run on its own
    thread: opens each round's ticket for the servicer, waits for the updates (see
    :meth:`wait_round`), retries thin rounds, checkpoints and monitors."""

    measures_links = True  # each worker's transfer is timed on its own stream

    name = "grpc"

    def __init__(self, coord: Coordinator, progress: Callable[[dict[str, Any]], None] | None
                 ) -> None:
        self.c = coord
        self.max_retries = coord.cfg.cluster.max_round_retries
        self.min_updates = coord.cfg.cluster.min_workers
        self.loop = RoundLoop(coord.job, self, coord.state, progress=progress)
        self.error: BaseException | None = None
        self.summary: dict[str, Any] = {}
        self.done = threading.Event()  # run() has returned: no more records or checkpoints
        self._save_lock = threading.Lock()

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.loop.records

    @property
    def retries(self) -> int:
        return self.loop.retries

    # ------------------------------------------------------------------ the transport

    def clock(self) -> float:
        return self.c.clock()

    def members(self, q: int) -> list[Member]:
        """The live workers that have built their job (a loading worker's profile does not
        count its data yet: it takes part from the round after its ready heartbeat)."""
        return [Member(w.worker_id, w.client_id, resources_of(w.profile))
                for w in self.c.registry.ready()]

    def exchange(self, q: int, state: GlobalState, tasks: list[Task],
                 not_assigned: dict[str, str], early: EarlyAggregate) -> Exchange | None:
        ticket = self.open_round(q, tasks, not_assigned)
        ticket.early = early  # the driver fills it while it waits (wait_round)
        self.wait_round(ticket)
        if self.c.finished:
            return None  # stopped from outside mid-round: this round is not aggregated
        returned = []
        element_bytes = self.c.job.hyper.wire.bytes_per_element
        for task in tasks:
            t = ticket.tasks[task.name]
            returned.append(Returned(task, _worker_record(t, element_bytes),
                                     t.update, t.refused, checked=True))
        return Exchange(returned, ticket.opened_at)

    def publish(self, state: GlobalState) -> None:
        with self.c.cond:
            self.c.state = state

    def retrying(self, q: int, attempt: int, got: int) -> None:
        """A round with fewer than ``cluster.min_workers`` updates leaves the model as it is
        and is run again (same masks and batches), up to ``cluster.max_round_retries`` times:
        aggregating a thin round would let a few workers steer the model, and retrying keeps
        the run deterministic."""
        log.warning("round %d attempt %d: %d updates arrived, %d needed "
                    "(cluster.min_workers); the model is unchanged, retrying",
                    q, attempt + 1, got, self.min_updates)
        if not self.c.registry.live():
            self._wait_any_worker()
        self._wait_loading()

    def _wait_loading(self) -> None:
        """While fewer than ``min_workers`` live workers are ready and some are still loading
        their job (a restarted pod re-registered and reads its data), wait for them, up to
        ``register_timeout_s``, instead of spending the next try on a round they cannot be in."""
        c = self.c
        give_up = c.clock() + c.cfg.cluster.register_timeout_s
        with c.cond:
            while not c.finished and c.clock() < give_up:
                ready = len(c.registry.ready())
                if ready >= self.min_updates or ready == len(c.registry):
                    return
                c.cond.wait(0.5)

    def recorded(self, rec: dict[str, Any], state: GlobalState) -> None:
        c = self.c
        if c.monitor:
            c.monitor.observe_round(rec, len(c.registry))
        every = c.cfg.cluster.checkpoint_every
        q = rec["round"]
        if c.out_dir and every and q % every == 0 and q < c.cfg.rounds:
            self.save_checkpoint()

    # ------------------------------------------------------------------ one round's ticket

    def wait_for_workers(self) -> None:
        c = self.c
        want = c.cfg.cluster.workers or c.cfg.clients.count
        give_up = c.clock() + c.cfg.cluster.register_timeout_s
        def ready() -> int:
            return len(c.registry.ready())

        with c.cond:
            while ready() < want and not c.finished:
                if c.clock() >= give_up:
                    have = ready()
                    if have >= c.cfg.cluster.min_workers:
                        log.warning("starting with %d of %d workers after %.0fs (%d "
                                    "registered)", have, want,
                                    c.cfg.cluster.register_timeout_s, len(c.registry))
                        return
                    raise CoordinatorError(
                        f"only {have} of {want} workers registered and ready within "
                        f"{c.cfg.cluster.register_timeout_s:.0f}s ({len(c.registry)} "
                        f"registered; cluster.min_workers = {c.cfg.cluster.min_workers})")
                c.cond.wait(0.5)
            have = ready()
        if c.finished:  # stopped (a signal, an error) before the run could start
            log.info("stopped while waiting for workers: %d of %d registered, no round run",
                     have, want)
            return
        log.info("%d workers registered; starting %d rounds", have, c.cfg.rounds)

    def open_round(self, q: int, tasks: list[Task] | None = None,
                   not_assigned: dict[str, str] | None = None) -> RoundTicket:
        """Round ``q``'s ticket, which the servicer hands out (``tasks``: the loop's plan;
        None: planned here from the live workers)."""
        c = self.c
        if tasks is None:
            tasks, not_assigned = self.loop.plan(q, self.members(q))
        now = c.clock()
        ticket = RoundTicket(q, now, now + c.cfg.cluster.round_deadline_s)
        ticket.not_assigned = dict(not_assigned or {})
        for t in tasks:
            ticket.tasks[t.name] = WorkerTask(t.name, t.plan, t.reason)
        ticket.payloads = SharedPayloads(c.job.engine, c.state,
                                         ((t.name, t.plan) for t in tasks),
                                         budget_bytes=full_payload_bytes(c.job))
        with c.cond:
            c.ticket = ticket
            c.cond.notify_all()
        return ticket

    def wait_round(self, ticket: RoundTicket) -> None:
        """Until every assigned update is in, or every live worker's is, or the deadline has
        passed and no assigned transfer is making progress (see :meth:`_moving`), or
        ``round_grace_s`` past the deadline, whatever moves. Meanwhile the updates that have
        arrived go into ``ticket.early`` (on this thread, with the lock released, while the
        servicer keeps receiving the others)."""
        c = self.c
        early = ticket.early
        with c.cond:
            if not ticket.tasks:
                # no one could be assigned (no ratio fits): give the heartbeats two intervals
                # to bring fresh profiles before the round is retried, instead of burning
                # every retry at once
                until = min(ticket.deadline, ticket.opened_at + 2 * c.cfg.cluster.heartbeat_s)
                while not c.finished and c.clock() < until:
                    c.cond.wait(min(until - c.clock(), 0.5))
            while not ticket.complete() and not c.finished:
                if early is not None:
                    resolved = _resolved(ticket)
                    if early.ready(resolved):
                        c.cond.release()  # the servicer stores updates under this lock
                        try:
                            early.offer(resolved)
                        finally:
                            c.cond.acquire()
                        continue  # conditions may have changed meanwhile
                now = c.clock()
                live = {w.worker_id for w in c.registry.live()}
                if all(t.answered() or t.worker_id not in live
                       for t in ticket.tasks.values()):
                    break  # everyone still alive has answered
                if now >= ticket.deadline:
                    if now >= ticket.deadline + c.cfg.cluster.round_grace_s:
                        log.warning("round %d: closed %.0f s past its deadline "
                                    "(cluster.round_grace_s) with transfers still open",
                                    ticket.round, now - ticket.deadline)
                        break
                    if not any(self._moving(t, ticket.deadline, now)
                               for t in ticket.tasks.values()):
                        break
                c.cond.wait(0.25 if now >= ticket.deadline else min(ticket.deadline - now, 0.5))
            ticket.closed = True
            if ticket.payloads is not None:
                ticket.payloads.clear()
            c.cond.notify_all()

    def _moving(self, t: WorkerTask, deadline: float, now: float) -> bool:
        """Whether ``t``'s transfer still earns its round time past the deadline: bytes moved
        within ``stall_timeout_s`` and, once one such window has passed, an average of at
        least ``min_transfer_bytes_per_s`` since the deadline (any byte is not progress)."""
        cl = self.c.cfg.cluster
        if t.answered() or t.last_progress is None:
            return False
        if t.moved_at_deadline is None:
            t.moved_at_deadline = t.moved
        if now - t.last_progress >= cl.stall_timeout_s:
            return False
        late = now - deadline
        return late < cl.stall_timeout_s or \
            (t.moved - t.moved_at_deadline) >= cl.min_transfer_bytes_per_s * late

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc
            log.error("coordinator stopped: %s", exc)
            self.finish(f"error: {exc}")
        finally:
            self.done.set()

    def finish(self, reason: str, complete: bool = False) -> None:
        """Stop the driver. Only ``complete`` (every round done) tells the workers the run is
        over; a stop or an error leaves them retrying, so that a resumed coordinator finds
        them again (docs/reliability.md)."""
        with self.c.cond:
            self.c.finished = True
            self.c.complete = complete
            self.c.finish_reason = reason
            self.c.cond.notify_all()

    def _run(self) -> None:
        c = self.c
        cfg = c.cfg
        loop = self.loop
        started_at = time.time()
        if c.out_dir:
            # rounds past the starting point are re-run: drop their old lines (all of them on
            # a fresh start in a used folder, e.g. a pod restarted before its first checkpoint)
            loop.records = truncate_metrics(c.out_dir, c.state.round)
        if c.state.round:
            log.info("resuming after round %d", c.state.round)
        if c.state.round >= cfg.rounds:  # e.g. a restarted pod of a finished run
            self.summary = summarize(cfg, c.state, loop.records, 0.0, {"transport": "grpc"},
                                     started_at=started_at)
            self.finish(f"the run was already complete ({c.state.round} rounds)",
                        complete=True)
            return
        self.wait_for_workers()
        loop.writer = MetricsWriter.for_run(c.out_dir, append=True)
        start = c.clock()
        try:
            loop.run()
        finally:
            if loop.writer:
                loop.writer.close()
        if loop.stopped:
            return
        self.summary = summarize(cfg, c.state, loop.records, c.clock() - start,
                                 {"transport": "grpc",
                                  "wire_bytes_total": wire_total(loop.records),
                                  "rejected_messages": dict(c.rejected),
                                  "workers_left_out": sum(len(r.get("left_out", []))
                                                          for r in loop.records),
                                  "round_retries": self.retries}, started_at=started_at)
        if c.out_dir:
            self.save_checkpoint()
            checkpoint.save(c.out_dir, c.state, {"config": to_dict(cfg)})
            write_json(c.out_dir / "summary.json", self.summary)
        self.finish(f"all {cfg.rounds} rounds done", complete=True)

    def save_checkpoint(self) -> None:
        """Checkpoint the last completed round (safe from any thread: the state is replaced,
        never modified in place)."""
        c = self.c
        if not c.out_dir:
            return
        with c.cond:
            state = c.state
        with self._save_lock:  # the driver's periodic save and a SIGTERM's share file names
            path = checkpoint.save_rotating(c.out_dir, state, {"config": to_dict(c.cfg)},
                                            c.cfg.cluster.keep_checkpoints)
        log.info("checkpoint of round %d: %s", state.round, path.name)

    def _wait_any_worker(self) -> None:
        c = self.c
        give_up = c.clock() + c.cfg.cluster.register_timeout_s
        with c.cond:
            while not c.registry.live() and not c.finished:
                if c.clock() >= give_up:
                    raise CoordinatorError("no live workers left")
                c.cond.wait(0.5)


def _resolved(ticket: RoundTicket) -> dict[int, Update | None]:
    """Per client id, the checked update of each answered task (None: refused)."""
    return {t.plan.client_id: t.update if t.refused is None else None
            for t in ticket.tasks.values() if t.answered()}


def _worker_record(t: WorkerTask, element_bytes: float) -> WorkerRound:
    """What the servicer measured of one task (``arrived`` is the round loop's to set)."""
    upd = t.update
    elapsed = ((t.received_at or 0.0) - (t.sent_at or 0.0)) if upd else 0.0
    compute = upd.compute_s if upd else 0.0
    return WorkerRound(
        t.worker_id, t.plan.client_id, t.plan.ratio, arrived=upd is not None, reason=t.reason,
        element_bytes=element_bytes,
        payload_down_bytes=t.payload_down, payload_up_bytes=t.payload_up,
        message_down_bytes=t.message_down, message_up_bytes=t.message_up, wire=t.wire,
        compute_s=compute, receive_s=t.receive_s, upload_s=t.upload_s,
        transfer_s=elapsed - compute, peak_mem_bytes=upd.peak_mem_bytes if upd else 0,
        samples=upd.samples if upd else 0, upper_loss=upd.upper_loss if upd else None)
