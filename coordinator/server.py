"""The gRPC coordinator: registry, rounds, slice shipping, validation, aggregation, metrics.

Two halves share one lock and condition:

* :class:`CoordinatorServicer` answers RPCs as coroutines on gRPC's asyncio server (one event
  loop thread): a waiting call holds no thread. It never touches the global model: it hands
  out prepared assignments and files validated updates.
* :class:`RoundDriver` runs the rounds on its own thread: opens a round (participants, ratios,
  plans), waits until every assigned update arrived or the deadline passed, then calls the
  round engine's server step, evaluates, records metrics and checkpoints.

A rejected update (unknown worker, wrong credential, stale round, duplicate, wrong tensors,
bad chunk, truncated stream, checksum mismatch, NaN) ends its RPC with a status whose message
names the problem; since only the driver changes the model, and only from accepted updates,
the model stays bit-identical and the coordinator keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.monitoring import Monitor
from coordinator.registry import Registry, RegistryError, WorkerRecord
from coordinator.security import (
    RateLimiter,
    TokenInterceptor,
    peer_host,
    peer_identity,
    server_credentials,
)
from coordinator.untrusted import printable
from coordinator.wire import (
    assignment_header,
    encode_assignment,
    expected_update,
    resources_of,
    update_from_wire,
)
from rabo import checkpoint
from rabo.auth import TlsFiles
from rabo.config import Config, to_dict
from rabo.engine import ClientPlan, GlobalState, Update, sample_participants
from rabo.errors import RaboError, UpdateRejected
from rabo.evaluation import due, evaluate_round
from rabo.job import Job
from rabo.metrics import MetricsWriter, truncate_metrics, wire_total, write_json
from rabo.netstat import SocketCounters, TcpCounters, parse_peer
from rabo.records import WorkerRound, round_record, summarize
from rabo.runtime import tune_allocator
from rabo_proto import PROTOCOL_VERSION
from rabo_proto.codec import Assembler, WireError, check_header, message_bytes
from rabo_proto.status import RUN_COMPLETE, RUN_STATE_KEY, RUN_STOPPING
from rabo_proto.v1 import rabo_pb2 as pb
from rabo_proto.v1 import rabo_pb2_grpc as pb_grpc

log = logging.getLogger("rabo.coordinator")
STOP_DRAIN_S = 20.0  # SIGTERM: how long the driver may take to record its last round
SERVICE_NAME = "rabo.v1.Coordinator"


class CoordinatorError(RaboError):
    """The run cannot go on (e.g. too few workers, an address it cannot bind); the message
    says why."""


# --------------------------------------------------------------------------- round records


@dataclass
class WorkerTask:
    """One worker's share of one round."""

    worker_id: str
    plan: ClientPlan
    reason: str
    payload_down: int = 0
    message_down: int = 0
    sent_at: float | None = None
    counters_start: SocketCounters | None = None
    peer: str = ""
    last_progress: float | None = None  # when bytes of this task last moved, either way
    moved: int = 0  # message bytes of this task moved so far, both ways
    moved_at_deadline: int | None = None  # ``moved`` when the round's deadline passed
    receiving: bool = False
    update: Update | None = None
    received_at: float | None = None
    upload_s: float = 0.0
    receive_s: float = 0.0
    message_up: int = 0
    payload_up: int = 0
    wire: SocketCounters | None = None
    refused: str | None = None  # why its update was refused for its magnitude (round done)

    def answered(self) -> bool:
        """An update arrived, or one was refused for its magnitude (nothing more comes)."""
        return self.update is not None or self.refused is not None


@dataclass
class RoundTicket:
    round: int
    opened_at: float
    deadline: float
    tasks: dict[str, WorkerTask] = field(default_factory=dict)
    not_assigned: dict[str, str] = field(default_factory=dict)
    told: set[str] = field(default_factory=set)
    closed: bool = False

    def complete(self) -> bool:
        return all(t.answered() for t in self.tasks.values())


# --------------------------------------------------------------------------- shared state


class Signal(threading.Condition):
    """A condition that also wakes coroutines: the driver thread waits on it as on any
    condition, and the servicer's coroutines (on the gRPC event loop) wait for the same
    ``notify_all`` through :meth:`waiter` events."""

    def __init__(self) -> None:
        super().__init__()
        self._events: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}

    def waiter(self) -> asyncio.Event:
        """An event the next ``notify_all`` sets; take it with the lock held (so no change
        between the caller's check and its wait is missed), on the event loop."""
        event = asyncio.Event()
        self._events[event] = asyncio.get_running_loop()
        return event

    def discard(self, event: asyncio.Event) -> None:
        self._events.pop(event, None)

    def notify_all(self) -> None:
        super().notify_all()
        for event, loop in list(self._events.items()):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its waiter is gone
                self._events.pop(event, None)


class Coordinator:
    """State shared by the servicer and the driver."""

    def __init__(self, cfg: Config, job: Job, out_dir: Path | None,
                 clock: Callable[[], float] = time.monotonic,
                 state: GlobalState | None = None, monitor: Monitor | None = None) -> None:
        self.cfg = cfg
        self.job = job
        self.out_dir = out_dir
        self.clock = clock
        c = cfg.cluster
        self.registry = Registry(cfg.clients.count, c.heartbeat_s * c.heartbeat_misses, clock,
                                 out_dir / checkpoint.SLOTS if out_dir is not None else None)
        self.register_limiter = RateLimiter(c.register_rate_per_s, 4 * c.register_rate_per_s,
                                            clock)
        self.cond = Signal()
        self.state: GlobalState = state if state is not None else job.engine.init_state()
        self.monitor = monitor
        self.ticket: RoundTicket | None = None
        self.finished = False  # the round driver has stopped (completed, stopped or failed)
        self.complete = False  # ...because every round is done: workers may leave for good
        self.finish_reason = ""
        self.config_json = json.dumps(to_dict(cfg))
        self.counters = TcpCounters()
        self.port = 0  # the bound port, for the wire counters
        self.rejected: dict[str, int] = {}
        self.calls_open = 0  # coordinator calls in progress, all peers (the servicer counts)

    def reject(self, kind: str) -> None:
        with self.cond:
            self.rejected[kind] = self.rejected.get(kind, 0) + 1
        if self.monitor:
            self.monitor.rejected.labels(kind).inc()

    def read_counters(self, peer: str) -> SocketCounters | None:
        addr = parse_peer(peer)
        if addr is None or not self.port:
            return None
        return self.counters.read(self.port, addr)


# --------------------------------------------------------------------------- servicer


class _RoundClosed(Exception):
    """The round closed while its update was still arriving."""


class _Silent(Exception):
    """An update stream sent no message within ``cluster.message_timeout_s``."""


RECEIVE_HEADROOM = 1 << 20  # bytes beyond a chunk that a received message may hold
STATUS_MESSAGE_LIMIT = 1000  # characters of a refusal's message (it may quote the input)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                 trailing: tuple[tuple[str, str], ...] = ()) -> NoReturn:
    """End the call with ``code``; the message escaped and bounded, since it may quote what
    the peer sent (a 64 KiB name, 100,000 tensor names) and a client must be able to read it."""
    await context.abort(code, printable(message, STATUS_MESSAGE_LIMIT), trailing)
    raise AssertionError("unreachable: abort raises")


async def _wait(cond: Signal, event: asyncio.Event, timeout: float) -> None:
    """Until ``cond`` is notified or ``timeout`` passes (``event`` from ``cond.waiter()``)."""
    try:
        await asyncio.wait_for(event.wait(), max(timeout, 0.0))
    except TimeoutError:
        pass
    finally:
        with cond:
            cond.discard(event)


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """The coordinator's RPCs, as coroutines on gRPC's asyncio server: a call that waits (a
    long poll, a silent stream) holds no thread, so no number of them can starve the rest.
    Work that takes CPU time for a whole model (slicing an assignment, checking an update)
    runs in a worker thread, so the event loop keeps answering meanwhile."""

    def __init__(self, coord: Coordinator) -> None:
        self.c = coord
        self._calls: dict[str, int] = {}  # host -> calls in progress (touched on the loop only)

    # ------------------------------------------------------------------ every call

    @contextlib.asynccontextmanager
    async def _counted(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Every call runs inside this: counted against its host's
        ``cluster.max_calls_per_host`` (or refused at once), and counted down however it
        ends."""
        host = await self._enter(context)
        try:
            yield
        finally:
            self._leave(host)

    async def _enter(self, context: grpc.aio.ServicerContext) -> str:
        host = peer_host(context.peer())
        cap = self.c.cfg.cluster.max_calls_per_host
        n = self._calls.get(host, 0)
        if cap and n >= cap:
            self.c.reject("calls-per-host")
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"too many concurrent calls from {host}: at most {cap} "
                         f"(cluster.max_calls_per_host)")
        self._calls[host] = n + 1
        self.c.calls_open += 1
        return host

    def _leave(self, host: str) -> None:
        self.c.calls_open -= 1
        n = self._calls.get(host, 1) - 1
        if n > 0:
            self._calls[host] = n
        else:
            self._calls.pop(host, None)

    async def _auth(self, worker_id: str, credential: str,
                    context: grpc.aio.ServicerContext) -> WorkerRecord:
        try:
            return self.c.registry.authenticate(worker_id, credential, peer_identity(context))
        except RegistryError as exc:
            self.c.reject("auth")
            await _abort(context, getattr(grpc.StatusCode, exc.code), str(exc))

    async def _refuse_finished(self, context: grpc.aio.ServicerContext) -> NoReturn:
        """Once the driver has stopped: a complete run is over for good (FAILED_PRECONDITION,
        the worker leaves); a stopped or failed one is not (UNAVAILABLE, the worker retries and
        registers with the coordinator that resumes the run). Workers read which from the
        trailing metadata (rabo_proto.status), not from the message."""
        complete = self.c.complete
        trailing = ((RUN_STATE_KEY, RUN_COMPLETE if complete else RUN_STOPPING),)
        if complete:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"the run is over: {self.c.finish_reason}", trailing)
        await _abort(context, grpc.StatusCode.UNAVAILABLE,
                     f"the coordinator is shutting down ({self.c.finish_reason}); the run is "
                     f"not complete, retry until it resumes", trailing)

    # ------------------------------------------------------------------ membership

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
                       ) -> pb.RegisterReply:
        async with self._counted(context):
            return await self._register(request, context)

    async def _register(self, request: pb.RegisterRequest,
                        context: grpc.aio.ServicerContext) -> pb.RegisterReply:
        if request.protocol != PROTOCOL_VERSION:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"wire protocol {request.protocol} is not supported; this "
                         f"coordinator speaks {PROTOCOL_VERSION}")
        if self.c.finished:
            await self._refuse_finished(context)
        host = peer_host(context.peer())
        if not self.c.register_limiter.allow(host):
            self.c.reject("register-rate")
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"too many registrations from {host}; at most "
                         f"{self.c.cfg.cluster.register_rate_per_s:g} per second")
        try:
            rec = self.c.registry.register(request.name, request.profile, request.client_id,
                                           context.peer(), peer_identity(context),
                                           request.instance)
        except RegistryError as exc:
            self.c.reject("register")
            await _abort(context, getattr(grpc.StatusCode, exc.code), str(exc))
        if self.c.monitor:
            self.c.monitor.registrations.inc()
        log.info("registered worker %s (%s) as client %d: budget %d MiB (%s), %.1f GFLOP/s",
                 rec.worker_id, printable(rec.name), rec.client_id,
                 rec.profile.memory_budget_bytes >> 20, printable(rec.profile.budget_source),
                 rec.profile.flops_per_s / 1e9)
        with self.c.cond:
            self.c.cond.notify_all()
        return pb.RegisterReply(worker_id=rec.worker_id, credential=rec.credential,
                                client_id=rec.client_id, config_json=self.c.config_json,
                                heartbeat_s=self.c.cfg.cluster.heartbeat_s,
                                chunk_bytes=self.c.cfg.cluster.chunk_bytes)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
                        ) -> pb.HeartbeatReply:
        async with self._counted(context):
            await self._auth(request.worker_id, request.credential, context)
            self.c.registry.touch(request.worker_id, request.profile, context.peer())
            ticket = self.c.ticket
            return pb.HeartbeatReply(round=ticket.round if ticket else 0,
                                     finished=self.c.complete)

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext
                    ) -> pb.LeaveReply:
        async with self._counted(context):
            await self._auth(request.worker_id, request.credential, context)
            self.c.registry.remove(request.worker_id)
            log.info("worker %s left: %s", request.worker_id,
                     printable(request.reason) if request.reason else "no reason given")
            with self.c.cond:
                self.c.cond.notify_all()
            return pb.LeaveReply()

    # ------------------------------------------------------------------ assignments

    async def FetchAssignment(self, request: pb.FetchRequest,
                              context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[pb.AssignmentMessage]:
        async with self._counted(context):
            async for msg in self._fetch(request, context):
                yield msg

    async def _fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[pb.AssignmentMessage]:
        rec = await self._auth(request.worker_id, request.credential, context)
        wid = rec.worker_id
        self.c.registry.touch(wid, peer=context.peer())
        # a NaN would make every wait below non-blocking (a busy loop)
        wait_s = min(max(request.wait_s, 0.0), 60.0) if math.isfinite(request.wait_s) else 0.0
        give_up = self.c.clock() + wait_s
        c = self.c
        answer: pb.AssignmentMessage | None = None  # sent after the lock is released
        task: WorkerTask | None = None
        stopping = False
        while True:
            with c.cond:
                if c.finished:
                    if not c.complete:
                        stopping = True
                        break
                    answer = pb.AssignmentMessage(finished=pb.Finished(reason=c.finish_reason))
                    break
                t = c.ticket
                if t is not None and not t.closed:
                    # any open task not yet answered, whatever after_round says: a retried
                    # round reuses its number, and its new tasks are for everyone again
                    task = t.tasks.get(wid)
                    if task is not None and not task.answered() and not task.receiving:
                        task.peer = context.peer()
                        task.sent_at = c.clock()
                        ticket, state = t, c.state
                        break
                    task = None
                    if (t.round > request.after_round and wid in t.not_assigned
                            and wid not in t.told):
                        t.told.add(wid)
                        answer = pb.AssignmentMessage(wait=pb.Wait(
                            reason=f"round {t.round}: {t.not_assigned[wid]}",
                            retry_after_s=0.0, kind=pb.Wait.NOT_ASSIGNED))
                        break
                remaining = give_up - c.clock()
                if remaining <= 0:
                    answer = pb.AssignmentMessage(wait=pb.Wait(reason="no round open for you",
                                                               retry_after_s=0.0,
                                                               kind=pb.Wait.NO_ROUND))
                    break
                changed = c.cond.waiter()
            await _wait(c.cond, changed, min(remaining, 1.0))
        if stopping:
            await self._refuse_finished(context)
        if answer is not None:
            yield answer
            return
        assert task is not None
        # Slicing and encoding happen outside the lock and off the event loop: the state of
        # an open round is never replaced (aggregation waits for the round to close), and
        # each worker's payload is built only when it asks, so payloads are not all held in
        # memory at once.
        task.counters_start = c.read_counters(task.peer)
        encoded, header = await asyncio.to_thread(self._prepare, state, task, wid, ticket)
        task.payload_down = encoded.total_bytes
        sent = message_bytes(header)
        yield header
        for chunk in encoded.chunks():
            task.last_progress = c.clock()  # the previous message has been taken by gRPC
            msg = pb.AssignmentMessage(chunk=chunk)
            size = message_bytes(msg)
            sent += size
            task.moved += size
            yield msg
        task.last_progress = c.clock()
        task.message_down = sent

    def _prepare(self, state: GlobalState, task: WorkerTask, wid: str, ticket: RoundTicket
                 ) -> tuple[Any, pb.AssignmentMessage]:
        c = self.c
        assignment = c.job.engine.assign(state, task.plan, copy=False)
        encoded = encode_assignment(assignment, wid, c.cfg.cluster.chunk_bytes)
        header = assignment_header(assignment, encoded, max(0.0, ticket.deadline - c.clock()),
                                   task.reason)
        return encoded, header

    # ------------------------------------------------------------------ updates

    async def _next(self, it: AsyncIterator[pb.UpdateMessage]) -> pb.UpdateMessage | None:
        """The stream's next message, None at its end; ``_Silent`` past the message timeout."""
        try:
            return await asyncio.wait_for(anext(it), self.c.cfg.cluster.message_timeout_s)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise _Silent from None

    async def SubmitUpdate(self, request_iterator: AsyncIterator[pb.UpdateMessage],
                           context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        async with self._counted(context):
            try:
                return await self._submit(request_iterator, context)
            except _Silent:
                self.c.reject("silent")
                await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no message within {self.c.cfg.cluster.message_timeout_s:g} s "
                             f"(cluster.message_timeout_s): stream ended")

    async def _submit(self, request_iterator: AsyncIterator[pb.UpdateMessage],
                      context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        c = self.c
        first = await self._next(request_iterator)
        if first is None:
            c.reject("empty")
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty update stream")
        if first.WhichOneof("body") != "header":
            c.reject("no-header")
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "an update stream must start with an UpdateHeader")
        h = first.header
        rec = await self._auth(h.worker_id, h.credential, context)
        start = c.clock()
        refusal: tuple[str, grpc.StatusCode, str] | None = None
        with c.cond:
            t = c.ticket
            task = t.tasks.get(rec.worker_id) if t is not None else None
            if t is None or t.closed or h.round != t.round:
                open_round = t.round if t is not None and not t.closed else None
                refusal = ("stale-round", grpc.StatusCode.FAILED_PRECONDITION,
                           f"stale round: update for round {h.round}, but "
                           + (f"round {open_round} is open" if open_round
                              else "no round is open"))
            elif task is None:
                refusal = ("not-assigned", grpc.StatusCode.FAILED_PRECONDITION,
                           f"worker {rec.worker_id} has no assignment in round {h.round}")
            elif task.answered() or task.receiving:
                refusal = ("duplicate", grpc.StatusCode.ALREADY_EXISTS,
                           f"duplicate update: worker {rec.worker_id} already submitted round "
                           f"{h.round}")
            elif task.sent_at is None:
                # computed for an earlier try of this round (a retry reuses the number): its
                # plan may differ from this try's; the worker fetches the new assignment
                refusal = ("earlier-try", grpc.StatusCode.ABORTED,
                           f"update for an earlier try of round {h.round}: fetch this try's "
                           f"assignment")
            else:
                task.receiving = True
        if refusal is not None:
            c.reject(refusal[0])
            await _abort(context, refusal[1], refusal[2])
        assert t is not None and task is not None
        try:
            update, assembler = await self._receive(h, task, request_iterator, t)
            with c.cond:
                state = c.state
            await asyncio.to_thread(c.job.engine.check_magnitude, state, task.plan, update)
            end = c.clock()
            counters = c.read_counters(context.peer())
            with c.cond:
                if t.closed:
                    raise _RoundClosed
                task.receiving = False
                task.update = update
                task.received_at = end
                task.upload_s = end - start
                task.receive_s = float(h.measurements.receive_s)
                task.payload_up = int(h.payload.total_bytes)
                if counters is not None and task.counters_start is not None:
                    task.wire = counters.minus(task.counters_start)
                c.cond.notify_all()
        except _RoundClosed:
            with c.cond:
                task.receiving = False
            c.reject("late")
            await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"late update: round {h.round} closed before it arrived")
        except UpdateRejected as exc:
            with c.cond:
                task.receiving = False
                task.refused = str(exc)
                c.cond.notify_all()
            c.reject("magnitude")
            log.warning("round %d: update of worker %s refused: %s", h.round, rec.worker_id,
                        exc)
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"update rejected: {exc}")
        except WireError as exc:
            with c.cond:
                task.receiving = False
            c.reject(exc.kind)
            code = (grpc.StatusCode.DATA_LOSS if exc.kind in ("checksum", "truncated")
                    else grpc.StatusCode.INVALID_ARGUMENT)
            await _abort(context, code, f"update rejected: {exc}")
        except BaseException:
            with c.cond:
                task.receiving = False
            raise
        c.registry.touch(rec.worker_id)
        return pb.SubmitReply(accepted=True, message=f"round {h.round} accepted "
                                                     f"({assembler.received} bytes)")

    async def _receive(self, h: pb.UpdateHeader, task: WorkerTask,
                       it: AsyncIterator[pb.UpdateMessage], ticket: RoundTicket
                       ) -> tuple[Update, Assembler]:
        cfg = self.c.cfg.cluster
        if h.client_id != task.plan.client_id:
            raise WireError(f"client id {h.client_id} does not match the assignment's "
                            f"{task.plan.client_id}", "client-id")
        if h.payload.round != h.round or h.payload.worker_id != h.worker_id:
            raise WireError("payload header round/worker id do not match the update header")
        check_header(h.payload, expected_update(task.plan), max_total_bytes=1 << 40)
        assembler = Assembler(h.payload, max_chunk_bytes=cfg.chunk_bytes)
        received = message_bytes(pb.UpdateMessage(header=h))
        while (msg := await self._next(it)) is not None:
            if msg.WhichOneof("body") != "chunk":
                raise WireError("only chunks may follow the update header", "chunk")
            if ticket.closed:  # stop reading at once
                raise _RoundClosed
            assembler.add(msg.chunk)
            size = message_bytes(msg)
            received += size
            task.moved += size
            task.last_progress = self.c.clock()
        tensors = await asyncio.to_thread(assembler.finish, check_finite=True)
        task.message_up = received
        return update_from_wire(h, tensors), assembler


# --------------------------------------------------------------------------- the rounds


class RoundDriver:
    """Runs the rounds; see the module docstring."""

    def __init__(self, coord: Coordinator, progress: Callable[[dict[str, Any]], None] | None
                 ) -> None:
        self.c = coord
        self.progress = progress
        self.retries = 0
        self.records: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.summary: dict[str, Any] = {}
        self.done = threading.Event()  # run() has returned: no more records or checkpoints
        self._save_lock = threading.Lock()

    def wait_for_workers(self) -> None:
        c = self.c
        want = c.cfg.cluster.workers or c.cfg.clients.count
        give_up = c.clock() + c.cfg.cluster.register_timeout_s
        with c.cond:
            while len(c.registry) < want and not c.finished:
                if c.clock() >= give_up:
                    have = len(c.registry)
                    if have >= c.cfg.cluster.min_workers:
                        log.warning("starting with %d of %d workers after %.0fs", have, want,
                                    c.cfg.cluster.register_timeout_s)
                        return
                    raise CoordinatorError(
                        f"only {have} of {want} workers registered within "
                        f"{c.cfg.cluster.register_timeout_s:.0f}s (cluster.min_workers = "
                        f"{c.cfg.cluster.min_workers})")
                c.cond.wait(0.5)
        log.info("%d workers registered; starting %d rounds", want, c.cfg.rounds)

    def open_round(self, q: int) -> RoundTicket:
        c = self.c
        live = c.registry.live()
        by_client = {w.client_id: w for w in live}
        participants = sample_participants(c.cfg.seed, q, list(by_client),
                                           c.cfg.clients.participation)
        now = c.clock()
        ticket = RoundTicket(q, now, now + c.cfg.cluster.round_deadline_s)
        for cid in participants:
            rec = by_client[cid]
            ratio, reason = c.job.ratio_for(cid, resources_of(rec.profile))
            if ratio is None:
                ticket.not_assigned[rec.worker_id] = f"not assigned: {reason}"
                log.warning("round %d: worker %s not assigned: %s", q, rec.worker_id, reason)
                continue
            plan = c.job.engine.plan(q, cid, ratio)
            ticket.tasks[rec.worker_id] = WorkerTask(rec.worker_id, plan, reason)
        with c.cond:
            c.ticket = ticket
            c.cond.notify_all()
        return ticket

    def wait_round(self, ticket: RoundTicket) -> None:
        """Until every assigned update is in, or every live worker's is, or the deadline has
        passed and no assigned transfer is making progress (see :meth:`_moving`), or
        ``round_grace_s`` past the deadline, whatever moves."""
        c = self.c
        with c.cond:
            if not ticket.tasks:
                # no one could be assigned (no ratio fits): give the heartbeats two intervals
                # to bring fresh profiles before the round is retried, instead of burning
                # every retry at once
                until = min(ticket.deadline, ticket.opened_at + 2 * c.cfg.cluster.heartbeat_s)
                while not c.finished and c.clock() < until:
                    c.cond.wait(min(until - c.clock(), 0.5))
            while not ticket.complete() and not c.finished:
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
        if c.out_dir:
            # rounds past the starting point are re-run: drop their old lines (all of them on
            # a fresh start in a used folder, e.g. a pod restarted before its first checkpoint)
            self.records = truncate_metrics(c.out_dir, c.state.round)
        if c.state.round:
            log.info("resuming after round %d", c.state.round)
        if c.state.round >= cfg.rounds:  # e.g. a restarted pod of a finished run
            self.summary = summarize(cfg, c.state, self.records, 0.0, {"transport": "grpc"})
            self.finish(f"the run was already complete ({c.state.round} rounds)",
                        complete=True)
            return
        self.wait_for_workers()
        writer = MetricsWriter(c.out_dir, append=True) if c.out_dir else None
        start = c.clock()
        try:
            for q in range(c.state.round + 1, cfg.rounds + 1):
                ticket, done = self._round_with_retries(q)
                if c.finished:
                    return  # stopped from outside mid-round: this round is not aggregated
                rec = self._aggregate(ticket, done, start)
                self.records.append(rec)
                if writer:
                    writer.write(rec)
                if c.monitor:
                    c.monitor.observe_round(rec, len(c.registry))
                if self.progress:
                    self.progress(rec)
                every = cfg.cluster.checkpoint_every
                if c.out_dir and every and q % every == 0 and q < cfg.rounds:
                    self.save_checkpoint()
        finally:
            if writer:
                writer.close()
        self.summary = summarize(cfg, c.state, self.records, c.clock() - start,
                                 {"transport": "grpc",
                                  "wire_bytes_total": wire_total(self.records),
                                  "rejected_messages": dict(c.rejected),
                                  "workers_left_out": sum(len(r.get("left_out", []))
                                                          for r in self.records),
                                  "round_retries": self.retries})
        if c.out_dir:
            self.save_checkpoint()
            checkpoint.save(c.out_dir, c.state, {"config": to_dict(cfg)})
            write_json(c.out_dir / "summary.json", self.summary)
        self.finish(f"all {cfg.rounds} rounds done", complete=True)

    def _round_with_retries(self, q: int) -> tuple[RoundTicket, list[WorkerTask]]:
        """Run round q; with fewer than ``cluster.min_workers`` updates the model stays as it
        is and the same round (same masks and batches) is run again, up to
        ``cluster.max_round_retries`` times: aggregating a thin round would let a few workers
        steer the model, and retrying keeps the run deterministic."""
        c, cfg = self.c, self.c.cfg
        for attempt in range(cfg.cluster.max_round_retries + 1):
            ticket = self.open_round(q)
            self.wait_round(ticket)
            done = [t for t in ticket.tasks.values() if t.update is not None]
            if len(done) >= cfg.cluster.min_workers or c.finished:
                return ticket, done
            self.retries += 1
            log.warning("round %d attempt %d: %d updates arrived, %d needed "
                        "(cluster.min_workers); the model is unchanged, retrying",
                        q, attempt + 1, len(done), cfg.cluster.min_workers)
            if not c.registry.live():
                self._wait_any_worker()
        raise CoordinatorError(f"round {q}: fewer than {cfg.cluster.min_workers} updates in "
                               f"{cfg.cluster.max_round_retries + 1} attempts")

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

    def _aggregate(self, ticket: RoundTicket, done: list[WorkerTask], start: float
                   ) -> dict[str, Any]:
        c = self.c
        results = [(t.plan, t.update) for t in done]
        new_state, stats = c.job.engine.server_step(c.state, results)  # type: ignore[arg-type]
        with c.cond:
            c.state = new_state
        done_at = c.clock()
        evaluation = evaluate_round(c.job, c.state) if due(c.cfg, ticket.round) else None
        now = c.clock()
        workers = [_worker_record(t) for t in sorted(ticket.tasks.values(),
                                                     key=lambda t: t.plan.client_id)]
        # round_s: open to aggregated (transfers, compute, aggregation); eval_s is apart
        refused = {t.plan.client_id: t.refused for t in ticket.tasks.values() if t.refused}
        return round_record(stats, c.state, now - start, done_at - ticket.opened_at, workers,
                            evaluation, refused, eval_s=now - done_at,
                            not_assigned=ticket.not_assigned)


def _worker_record(t: WorkerTask) -> WorkerRound:
    upd = t.update
    elapsed = ((t.received_at or 0.0) - (t.sent_at or 0.0)) if upd else 0.0
    compute = upd.compute_s if upd else 0.0
    return WorkerRound(
        t.worker_id, t.plan.client_id, t.plan.ratio, arrived=upd is not None, reason=t.reason,
        payload_down_bytes=t.payload_down, payload_up_bytes=t.payload_up,
        message_down_bytes=t.message_down, message_up_bytes=t.message_up, wire=t.wire,
        compute_s=compute, receive_s=t.receive_s, upload_s=t.upload_s,
        transfer_s=elapsed - compute, peak_mem_bytes=upd.peak_mem_bytes if upd else 0,
        samples=upd.samples if upd else 0, upper_loss=upd.upper_loss if upd else None)


# --------------------------------------------------------------------------- serving


@dataclass
class Security:
    tls: TlsFiles = field(default_factory=TlsFiles)
    tokens: list[bytes] = field(default_factory=list)


class EventLoop:
    """An asyncio loop on a thread of its own, for the gRPC server; the rest of the
    coordinator (the driver, the CLI, tests) is plain threads and calls in through
    :meth:`run`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="rabo-grpc", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@dataclass
class Server:
    grpc_server: grpc.aio.Server
    coord: Coordinator
    driver: RoundDriver
    thread: threading.Thread
    port: int
    health: health.aio.HealthServicer
    loop: EventLoop
    health_server: grpc.aio.Server | None = None
    health_port: int = 0
    _stopped: bool = False

    def wait(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def stop(self, grace: float = 2.0, checkpoint_now: bool = False) -> None:
        """Stop serving; ``checkpoint_now`` first saves the last completed round (SIGTERM).
        The driver is let finish the round it is recording (bounded), so that the checkpoint
        and metrics.jsonl end at the same round. A second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        early = not self.coord.finished
        if early:
            self.driver.finish("coordinator stopped")
        # let the driver leave torch code before the caller goes on (an interpreter that
        # exits under a daemon thread inside torch aborts: "terminate called ...")
        if self.thread.is_alive() and not self.driver.done.wait(STOP_DRAIN_S):
            log.warning("the round driver did not stop within %.0fs", STOP_DRAIN_S)
        if early and checkpoint_now:
            self.driver.save_checkpoint()
        self.loop.run(self._stop(grace))
        self.loop.close()

    async def _stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)


def _close_metrics(monitor: Monitor | None) -> None:
    if monitor is not None:
        monitor.close()


def grpc_options(cfg: Config) -> list[tuple[str, int]]:
    m = cfg.cluster.max_message_bytes
    # what the coordinator receives is never larger than a chunk and a header (registrations,
    # heartbeats, polls and update headers are small), so that is all gRPC buffers from a
    # peer, authenticated or not, before refusing (a 60 MiB message is refused unread)
    receive = min(m, cfg.cluster.chunk_bytes + RECEIVE_HEADROOM)
    return [("grpc.max_send_message_length", m), ("grpc.max_receive_message_length", receive),
            # workers ping every 20 s while idle (see worker/client.py); allow it
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # bounds the calls that never send a request (no handler counts those)
            ("grpc.max_concurrent_streams", cfg.cluster.max_streams_per_connection),
            # gRPC sets SO_REUSEPORT by default: a second coordinator on a busy port would
            # start without error and the kernel would split the workers between the two
            ("grpc.so_reuseport", 0)]


def serve(cfg: Config, out_dir: str | Path | None = None, bind: str | None = None,
          progress: Callable[[dict[str, Any]], None] | None = None,
          job: Job | None = None, linger_s: float = 3.0, security: Security | None = None,
          resume: GlobalState | None = None, health_port: int | None = None,
          metrics_port: int | None = None) -> Server:
    """Start the coordinator: the gRPC server and the round driver thread. Returns at once;
    ``Server.wait()`` blocks until the run is over. ``resume`` continues from a checkpointed
    state (its round is the last completed one)."""
    tune_allocator()
    security = security or Security()
    job = job or Job.from_config(cfg)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        checkpoint.lock_run_dir(out)  # one run per folder (a second gets an error naming the pid)
    monitor = None
    mport = cfg.cluster.metrics_port if metrics_port is None else metrics_port
    if mport:
        monitor = Monitor()
        try:
            monitor.serve(mport)
        except OSError as exc:
            raise CoordinatorError(f"--metrics-port {mport}: cannot listen: {exc.strerror} "
                                   f"(is another coordinator running?)") from None
    coord = Coordinator(cfg, job, out, state=resume, monitor=monitor)
    loop = EventLoop()
    try:
        server, health_servicer, port, health_server, hport = loop.run(
            _start_grpc(cfg, coord, security, bind or cfg.cluster.bind,
                        cfg.cluster.health_port if health_port is None else health_port))
    except BaseException:
        loop.close()
        _close_metrics(monitor)
        raise
    address = bind or cfg.cluster.bind
    driver = RoundDriver(coord, progress)

    def run() -> None:
        driver.run()
        # let polling workers hear "finished" before the server goes away
        time.sleep(linger_s)

    thread = threading.Thread(target=run, name="rabo-rounds", daemon=True)
    thread.start()
    log.info("coordinator listening on %s (port %d%s%s)", address, port,
             ", TLS" + (" with client certificates" if security.tls.ca else "")
             if security.tls.cert else "", ", token required" if security.tokens else "")
    return Server(server, coord, driver, thread, port, health_servicer, loop, health_server,
                  hport)


async def _start_grpc(cfg: Config, coord: Coordinator, security: Security, address: str,
                      hport: int) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int,
                                           grpc.aio.Server | None, int]:
    """On the event loop: the main server (coordinator and health services) and the
    optional plaintext health server, bound and started."""
    interceptors = [TokenInterceptor(security.tokens, lambda kind: coord.reject(f"auth-{kind}"))
                    ] if security.tokens else []
    server = grpc.aio.server(options=grpc_options(cfg), interceptors=interceptors)
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coord), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if security.tls.cert is not None:
            port = server.add_secure_port(address, server_credentials(security.tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise CoordinatorError(f"--bind {address}: cannot listen ({exc}; is another "
                               f"coordinator running?)") from None
    if port == 0:
        raise CoordinatorError(f"--bind {address}: cannot listen (the port is in use or the "
                               f"address is not this machine's; is another coordinator "
                               f"running?)")
    coord.port = port
    health_server = None
    if hport:
        # kubelet's gRPC probes cannot speak TLS: health alone on a plaintext port
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        host = address.rsplit(":", 1)[0]
        try:
            bound = health_server.add_insecure_port(f"{host}:{hport}")
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise CoordinatorError(f"--health-port {hport}: cannot listen on {host}:{hport} "
                                   f"(the port is in use; is another coordinator running?)")
        hport = bound
        await health_server.start()
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port, health_server, hport
