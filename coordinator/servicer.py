"""The coordinator's RPCs (``rabo.v1.Coordinator``): registration, heartbeats, assignments
by long poll, and updates, each validated before anything else sees it.

A rejected update (unknown worker, wrong credential, stale round, duplicate, wrong tensors,
bad chunk, truncated stream, checksum mismatch, NaN) ends its RPC with a status whose message
names the problem; since only the round driver changes the model, and only from accepted
updates, the model stays bit-identical and the coordinator keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from coordinator.payloads import full_payload_bytes
from coordinator.registry import RegistryError, WorkerRecord
from coordinator.security import peer_host, peer_identity
from coordinator.state import Coordinator, RoundTicket, Signal, WorkerTask
from coordinator.untrusted import printable
from coordinator.wire import assignment_header, encode_assignment, expected_update, update_from_wire
from rabo.engine import GlobalState, Update
from rabo.errors import UpdateRejected
from rabo_proto import PROTOCOL_VERSION
from rabo_proto.codec import (
    GRPC_FRAME_BYTES,
    Assembler,
    BufferPool,
    Encoded,
    WireError,
    check_header,
    message_bytes,
)
from rabo_proto.status import RUN_COMPLETE, RUN_STATE_KEY, RUN_STOPPING
from rabo_proto.stream import parse
from rabo_proto.v1 import rabo_pb2 as pb

log = logging.getLogger("rabo.coordinator")


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


class CoordinatorServicer:
    """The coordinator's RPCs, as coroutines on gRPC's asyncio server: a call that waits (a
    long poll, a silent stream) holds no thread, so no number of them can starve the rest.
    Work that takes CPU time for a whole model (slicing an assignment, checking an update)
    runs in a worker thread, so the event loop keeps answering meanwhile."""

    def __init__(self, coord: Coordinator) -> None:
        self.c = coord
        self._calls: dict[str, int] = {}  # host -> calls in progress (touched on the loop only)
        # updates land in buffers kept from earlier rounds (codec.BufferPool: no page faults
        # per round); at most what one round's updates take when every worker is at ratio 1
        cfg = coord.cfg
        self._buffers = BufferPool(full_payload_bytes(coord.job)
                                   * max(cfg.cluster.workers or cfg.clients.count, 1))

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
            self.c.reject("auth", f"worker credential: {exc}", context.peer())
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
            why = (f"too many registrations from {host}; at most "
                   f"{self.c.cfg.cluster.register_rate_per_s:g} per second")
            self.c.reject("register-rate", why, context.peer())
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        try:
            rec = self.c.registry.register(request.name, request.profile, request.client_id,
                                           context.peer(), peer_identity(context),
                                           request.instance)
        except RegistryError as exc:
            self.c.reject("register", str(exc), context.peer())
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
                    c.told_finished.add(wid)
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
        c.registry.streaming(task.worker_id, +1)
        try:
            yield header
            for chunk in encoded.chunks():  # raw messages: the bytes themselves
                self._progress(task)  # the previous message has been taken by gRPC
                size = len(chunk) + GRPC_FRAME_BYTES
                sent += size
                task.moved += size
                yield chunk
            trailer = pb.AssignmentMessage(trailer=encoded.trailer())
            sent += message_bytes(trailer)
            yield trailer
            self._progress(task)
        finally:
            c.registry.streaming(task.worker_id, -1)
        task.message_down = sent

    def _progress(self, task: WorkerTask) -> None:
        """Bytes of ``task`` moved: its transfer is alive, and so is its worker
        (:meth:`Registry.streaming`)."""
        task.last_progress = self.c.clock()
        self.c.registry.streaming(task.worker_id)

    def _prepare(self, state: GlobalState, task: WorkerTask, wid: str, ticket: RoundTicket
                 ) -> tuple[Any, pb.AssignmentMessage]:
        c = self.c
        assignment = c.job.engine.assign(state, task.plan, copy=False)

        def encode() -> Encoded:
            return encode_assignment(assignment, wid, c.cfg.cluster.chunk_bytes)

        encoded = ticket.payloads.get(wid, encode) if ticket.payloads is not None else encode()
        header = assignment_header(assignment, encoded.header_for(wid),
                                   max(0.0, ticket.deadline - c.clock()), task.reason)
        return encoded, header

    # ------------------------------------------------------------------ updates

    async def _next(self, it: AsyncIterator[bytes]) -> bytes | None:
        """The stream's next message, None at its end; ``_Silent`` past the message timeout."""
        try:
            return await asyncio.wait_for(anext(it), self.c.cfg.cluster.message_timeout_s)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise _Silent from None

    async def SubmitUpdate(self, request_iterator: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        async with self._counted(context):
            try:
                return await self._submit(request_iterator, context)
            except _Silent:
                self.c.reject("silent")
                await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no message within {self.c.cfg.cluster.message_timeout_s:g} s "
                             f"(cluster.message_timeout_s): stream ended")

    async def _submit(self, request_iterator: AsyncIterator[bytes],
                      context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        c = self.c
        raw = await self._next(request_iterator)
        if raw is None:
            c.reject("empty")
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty update stream")
        try:
            first = parse(raw, pb.UpdateMessage, "an update stream's first message")
        except WireError as exc:
            c.reject("no-header")
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
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
            c.registry.streaming(task.worker_id, +1)
            try:
                update, assembler = await self._receive(h, task, request_iterator, t)
            finally:
                c.registry.streaming(task.worker_id, -1)
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
                       it: AsyncIterator[bytes], ticket: RoundTicket
                       ) -> tuple[Update, Assembler]:
        cfg = self.c.cfg.cluster
        if h.client_id != task.plan.client_id:
            raise WireError(f"client id {h.client_id} does not match the assignment's "
                            f"{task.plan.client_id}", "client-id")
        if h.payload.round != h.round or h.payload.worker_id != h.worker_id:
            raise WireError("payload header round/worker id do not match the update header")
        check_header(h.payload, expected_update(task.plan, self.c.job.hyper.wire),
                     max_total_bytes=1 << 40)
        assembler = Assembler(h.payload, max_chunk_bytes=cfg.chunk_bytes, pool=self._buffers)
        received = message_bytes(pb.UpdateMessage(header=h))
        while (data := await self._next(it)) is not None:
            if ticket.closed:  # stop reading at once
                raise _RoundClosed
            assembler.accept(data, pb.UpdateMessage)
            size = len(data) + GRPC_FRAME_BYTES
            received += size
            task.moved += size
            self._progress(task)
        tensors = await asyncio.to_thread(assembler.finish, assembler.trailer,
                                          check_finite=True)
        task.message_up = received
        fmt = self.c.job.hyper.wire
        if fmt.quantized:  # decoding takes a pass over the payload: off the event loop
            return await asyncio.to_thread(update_from_wire, h, tensors, fmt), assembler
        return update_from_wire(h, tensors, fmt), assembler
