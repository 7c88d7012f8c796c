"""The gRPC coordinator: registry, rounds, slice shipping, validation, aggregation, metrics.

Two halves share one lock and condition:

* :class:`CoordinatorServicer` answers RPCs on gRPC's thread pool. It never touches the global
  model: it hands out prepared assignments and files validated updates.
* :class:`RoundDriver` runs the rounds on its own thread: opens a round (participants, ratios,
  plans), waits until every assigned update arrived or the deadline passed, then calls the
  round engine's server step, evaluates, records metrics and checkpoints.

A rejected update (unknown worker, wrong credential, stale round, duplicate, wrong tensors,
bad chunk, truncated stream, checksum mismatch, NaN) ends its RPC with a status whose message
names the problem; since only the driver changes the model, and only from accepted updates,
the model stays bit-identical and the coordinator keeps serving everyone else.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.registry import Registry, RegistryError, WorkerRecord
from coordinator.wire import (
    assignment_header,
    encode_assignment,
    expected_update,
    resources_of,
    update_from_wire,
)
from rabo import checkpoint
from rabo.config import Config, to_dict
from rabo.engine import ClientPlan, GlobalState, Update, sample_participants
from rabo.job import Job, evaluate
from rabo.metrics import MetricsWriter, write_json
from rabo.netstat import SocketCounters, TcpCounters, parse_peer
from rabo.policy import choose_ratio
from rabo.runner import round_record, summarize
from rabo.runtime import tune_allocator
from rabo_proto.codec import Assembler, WireError, check_header, message_bytes
from rabo_proto.v1 import rabo_pb2 as pb
from rabo_proto.v1 import rabo_pb2_grpc as pb_grpc

log = logging.getLogger("rabo.coordinator")
PROTOCOL_VERSION = 1
SERVICE_NAME = "rabo.v1.Coordinator"


class CoordinatorError(Exception):
    """The run cannot go on (e.g. too few workers); the message says why."""


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
    receiving: bool = False
    update: Update | None = None
    received_at: float | None = None
    upload_s: float = 0.0
    receive_s: float = 0.0
    message_up: int = 0
    payload_up: int = 0
    wire: SocketCounters | None = None


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
        return all(t.update is not None for t in self.tasks.values())


# --------------------------------------------------------------------------- shared state


class Coordinator:
    """State shared by the servicer and the driver."""

    def __init__(self, cfg: Config, job: Job, out_dir: Path | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.job = job
        self.out_dir = out_dir
        self.clock = clock
        c = cfg.cluster
        self.registry = Registry(cfg.clients.count, c.heartbeat_s * c.heartbeat_misses, clock)
        self.cond = threading.Condition()
        self.state: GlobalState = job.engine.init_state()
        self.ticket: RoundTicket | None = None
        self.finished = False
        self.finish_reason = ""
        self.config_json = json.dumps(to_dict(cfg))
        self.counters = TcpCounters()
        self.port = 0  # the bound port, for the wire counters
        self.rejected: dict[str, int] = {}

    def reject(self, kind: str) -> None:
        with self.cond:
            self.rejected[kind] = self.rejected.get(kind, 0) + 1

    def read_counters(self, peer: str) -> SocketCounters | None:
        addr = parse_peer(peer)
        if addr is None or not self.port:
            return None
        return self.counters.read(self.port, addr)


# --------------------------------------------------------------------------- servicer


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    context.abort(code, message)


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, coord: Coordinator) -> None:
        self.c = coord

    def _auth(self, worker_id: str, credential: str, context: grpc.ServicerContext
              ) -> WorkerRecord:
        try:
            return self.c.registry.authenticate(worker_id, credential)
        except RegistryError as exc:
            self.c.reject("auth")
            _abort(context, getattr(grpc.StatusCode, exc.code), str(exc))
            raise  # unreachable: abort raises

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext
                 ) -> pb.RegisterReply:
        if request.protocol != PROTOCOL_VERSION:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                   f"wire protocol {request.protocol} is not supported; this coordinator "
                   f"speaks {PROTOCOL_VERSION}")
        if self.c.finished:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                   f"the run is over: {self.c.finish_reason}")
        try:
            rec = self.c.registry.register(request.name, request.profile, request.client_id,
                                           context.peer())
        except RegistryError as exc:
            _abort(context, getattr(grpc.StatusCode, exc.code), str(exc))
            raise
        log.info("registered worker %s (%s) as client %d: budget %d MiB (%s), %.1f GFLOP/s",
                 rec.worker_id, rec.name, rec.client_id,
                 rec.profile.memory_budget_bytes >> 20, rec.profile.budget_source,
                 rec.profile.flops_per_s / 1e9)
        with self.c.cond:
            self.c.cond.notify_all()
        return pb.RegisterReply(worker_id=rec.worker_id, credential=rec.credential,
                                client_id=rec.client_id, config_json=self.c.config_json,
                                heartbeat_s=self.c.cfg.cluster.heartbeat_s,
                                chunk_bytes=self.c.cfg.cluster.chunk_bytes)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
                  ) -> pb.HeartbeatReply:
        self._auth(request.worker_id, request.credential, context)
        self.c.registry.touch(request.worker_id, request.profile, context.peer())
        ticket = self.c.ticket
        return pb.HeartbeatReply(round=ticket.round if ticket else 0, finished=self.c.finished)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        self._auth(request.worker_id, request.credential, context)
        self.c.registry.remove(request.worker_id)
        log.info("worker %s left: %s", request.worker_id, request.reason or "no reason given")
        with self.c.cond:
            self.c.cond.notify_all()
        return pb.LeaveReply()

    # ------------------------------------------------------------------ assignments

    def FetchAssignment(self, request: pb.FetchRequest, context: grpc.ServicerContext
                        ) -> Iterator[pb.AssignmentMessage]:
        rec = self._auth(request.worker_id, request.credential, context)
        wid = rec.worker_id
        self.c.registry.touch(wid, peer=context.peer())
        wait_s = min(max(request.wait_s, 0.0), 60.0)
        give_up = self.c.clock() + wait_s
        c = self.c
        with c.cond:
            while True:
                if c.finished:
                    yield pb.AssignmentMessage(finished=pb.Finished(reason=c.finish_reason))
                    return
                t = c.ticket
                if t is not None and not t.closed and t.round > request.after_round:
                    task = t.tasks.get(wid)
                    if task is not None and task.update is None and not task.receiving:
                        break
                    if wid in t.not_assigned and wid not in t.told:
                        t.told.add(wid)
                        yield pb.AssignmentMessage(wait=pb.Wait(
                            reason=f"round {t.round}: {t.not_assigned[wid]}",
                            retry_after_s=0.0))
                        return
                remaining = give_up - c.clock()
                if remaining <= 0 or not context.is_active():
                    yield pb.AssignmentMessage(wait=pb.Wait(reason="no round open for you",
                                                            retry_after_s=0.0))
                    return
                c.cond.wait(min(remaining, 1.0))
            ticket, state = t, c.state
            assert task is not None
            task.peer = context.peer()
            task.sent_at = c.clock()
        # Slicing and encoding happen outside the lock: the state of an open round is never
        # replaced (aggregation waits for the round to close), and each worker's payload is
        # built only when it asks, so payloads are not all held in memory at once.
        task.counters_start = c.read_counters(task.peer)
        assignment = c.job.engine.assign(state, task.plan, copy=False)
        encoded = encode_assignment(assignment, wid, c.cfg.cluster.chunk_bytes)
        task.payload_down = encoded.total_bytes
        header = assignment_header(assignment, encoded, max(0.0, ticket.deadline - c.clock()),
                                   task.reason)
        sent = message_bytes(header)
        yield header
        for chunk in encoded.chunks():
            msg = pb.AssignmentMessage(chunk=chunk)
            sent += message_bytes(msg)
            yield msg
        task.message_down = sent

    # ------------------------------------------------------------------ updates

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdateMessage],
                     context: grpc.ServicerContext) -> pb.SubmitReply:
        c = self.c
        try:
            first = next(request_iterator)
        except StopIteration:
            c.reject("empty")
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty update stream")
            raise
        if first.WhichOneof("body") != "header":
            c.reject("no-header")
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   "an update stream must start with an UpdateHeader")
        h = first.header
        rec = self._auth(h.worker_id, h.credential, context)
        start = c.clock()
        with c.cond:
            t = c.ticket
            if t is None or t.closed or h.round != t.round:
                open_round = t.round if t is not None and not t.closed else None
                c.reject("stale-round")
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                       f"stale round: update for round {h.round}, but "
                       + (f"round {open_round} is open" if open_round else "no round is open"))
            task = t.tasks.get(rec.worker_id)
            if task is None:
                c.reject("not-assigned")
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                       f"worker {rec.worker_id} has no assignment in round {h.round}")
            if task.update is not None or task.receiving:
                c.reject("duplicate")
                _abort(context, grpc.StatusCode.ALREADY_EXISTS,
                       f"duplicate update: worker {rec.worker_id} already submitted round "
                       f"{h.round}")
            task.receiving = True
        try:
            update, assembler = self._receive(h, task, request_iterator, context)
        except WireError as exc:
            with c.cond:
                task.receiving = False
            kind = str(exc).split(":")[0]
            c.reject(kind)
            code = (grpc.StatusCode.DATA_LOSS if "checksum" in str(exc) or "truncated" in str(exc)
                    else grpc.StatusCode.INVALID_ARGUMENT)
            _abort(context, code, f"update rejected: {exc}")
            raise
        except BaseException:
            with c.cond:
                task.receiving = False
            raise
        end = c.clock()
        counters = c.read_counters(context.peer())
        with c.cond:
            task.receiving = False
            if t.closed:
                c.reject("late")
                _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                       f"late update: round {h.round} closed before it arrived")
            task.update = update
            task.received_at = end
            task.upload_s = end - start
            task.receive_s = float(h.measurements.receive_s)
            task.payload_up = int(h.payload.total_bytes)
            if counters is not None and task.counters_start is not None:
                task.wire = counters.minus(task.counters_start)
            c.cond.notify_all()
        c.registry.touch(rec.worker_id)
        return pb.SubmitReply(accepted=True, message=f"round {h.round} accepted "
                                                     f"({assembler.received} bytes)")

    def _receive(self, h: pb.UpdateHeader, task: WorkerTask,
                 it: Iterator[pb.UpdateMessage], context: grpc.ServicerContext
                 ) -> tuple[Update, Assembler]:
        cfg = self.c.cfg.cluster
        if h.client_id != task.plan.client_id:
            raise WireError(f"client id {h.client_id} does not match the assignment's "
                            f"{task.plan.client_id}")
        if h.payload.round != h.round or h.payload.worker_id != h.worker_id:
            raise WireError("payload header round/worker id do not match the update header")
        check_header(h.payload, expected_update(task.plan), max_total_bytes=1 << 40)
        assembler = Assembler(h.payload, max_chunk_bytes=cfg.chunk_bytes)
        received = message_bytes(pb.UpdateMessage(header=h))
        for msg in it:
            if msg.WhichOneof("body") != "chunk":
                raise WireError("only chunks may follow the update header")
            assembler.add(msg.chunk)
            received += message_bytes(msg)
        tensors = assembler.finish(check_finite=True)
        task.message_up = received
        return update_from_wire(h, tensors), assembler


# --------------------------------------------------------------------------- the rounds


class RoundDriver:
    """Runs the rounds; see the module docstring."""

    def __init__(self, coord: Coordinator, progress: Callable[[dict[str, Any]], None] | None,
                 max_round_retries: int = 3) -> None:
        self.c = coord
        self.progress = progress
        self.max_round_retries = max_round_retries
        self.records: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.summary: dict[str, Any] = {}

    def wait_for_workers(self) -> None:
        c = self.c
        want = c.cfg.cluster.workers or c.cfg.clients.count
        give_up = c.clock() + c.cfg.cluster.register_timeout_s
        with c.cond:
            while len(c.registry) < want:
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

    def _ratio_for(self, rec: WorkerRecord) -> tuple[float | None, str]:
        cfg = self.c.cfg
        if cfg.clients.ratios:
            r = list(islice(cycle(cfg.clients.ratios), rec.client_id + 1))[-1]
            return r, f"fixed ratio {r:g} (clients.ratios)"
        choice = choose_ratio(self.c.job.task, self.c.job.hyper, resources_of(rec.profile),
                              cfg.policy.ladder, cfg.policy.safety, cfg.policy.deadline_s,
                              cfg.data.batch_size or 1)
        return choice.ratio, choice.reason

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
            ratio, reason = self._ratio_for(rec)
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
        c = self.c
        with c.cond:
            while not ticket.complete():
                now = c.clock()
                if now >= ticket.deadline:
                    break
                live = {w.worker_id for w in c.registry.live()}
                if all(t.update is not None or t.worker_id not in live
                       for t in ticket.tasks.values()):
                    break  # everyone still alive has answered
                c.cond.wait(min(ticket.deadline - now, 0.5))
            ticket.closed = True
            c.cond.notify_all()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc
            log.error("coordinator stopped: %s", exc)
            self.finish(f"error: {exc}")

    def finish(self, reason: str) -> None:
        with self.c.cond:
            self.c.finished = True
            self.c.finish_reason = reason
            self.c.cond.notify_all()

    def _run(self) -> None:
        c = self.c
        cfg = c.cfg
        self.wait_for_workers()
        writer = MetricsWriter(c.out_dir) if c.out_dir else None
        start = c.clock()
        try:
            for q in range(c.state.round + 1, cfg.rounds + 1):
                for attempt in range(self.max_round_retries + 1):
                    ticket = self.open_round(q)
                    self.wait_round(ticket)
                    done = [t for t in ticket.tasks.values() if t.update is not None]
                    if len(done) >= cfg.cluster.min_workers:
                        break
                    log.warning("round %d attempt %d: %d updates arrived, %d needed "
                                "(cluster.min_workers); the model is unchanged, retrying",
                                q, attempt + 1, len(done), cfg.cluster.min_workers)
                    if not c.registry.live():
                        self._wait_any_worker()
                else:
                    raise CoordinatorError(
                        f"round {q}: fewer than {cfg.cluster.min_workers} updates in "
                        f"{self.max_round_retries + 1} attempts")
                rec = self._aggregate(ticket, done, start)
                self.records.append(rec)
                if writer:
                    writer.write(rec)
                if self.progress:
                    self.progress(rec)
        finally:
            if writer:
                writer.close()
        self.summary = summarize(cfg, c.state, self.records, c.clock() - start,
                                 {"transport": "grpc",
                                  "wire_bytes_total": sum(r["wire_bytes"] or 0
                                                          for r in self.records),
                                  "rejected_messages": dict(c.rejected)})
        if c.out_dir:
            checkpoint.save(c.out_dir, c.state, {"config": to_dict(cfg)})
            write_json(c.out_dir / "summary.json", self.summary)
        self.finish(f"all {cfg.rounds} rounds done")

    def _wait_any_worker(self) -> None:
        c = self.c
        give_up = c.clock() + c.cfg.cluster.register_timeout_s
        with c.cond:
            while not c.registry.live():
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
        test = None
        if ticket.round % c.cfg.eval_every == 0 or ticket.round == c.cfg.rounds:
            test = evaluate(c.job.task, c.state.x, c.state.y, c.job.data.test)
        now = c.clock()
        workers = []
        for t in sorted(ticket.tasks.values(), key=lambda t: t.plan.client_id):
            workers.append(self._worker_record(t))
        # round_s: open to aggregated (transfers, compute, aggregation); eval_s is apart
        rec = round_record(stats, c.state, now - start, done_at - ticket.opened_at,
                           [w for w in workers if w["arrived"]], test)
        rec["eval_s"] = round(now - done_at, 6)
        rec["left_out"] = [w for w in workers if not w["arrived"]]
        rec["not_assigned"] = dict(ticket.not_assigned)
        rec["compute_s"] = max((w["compute_s"] for w in rec["clients"]), default=0.0)
        rec["transfer_s"] = max((w["transfer_s"] for w in rec["clients"]), default=0.0)
        wire = [w["wire_down_bytes"] for w in rec["clients"]] + \
            [w["wire_up_bytes"] for w in rec["clients"]]
        rec["wire_bytes"] = sum(wire) if all(v is not None for v in wire) else None
        rec["payload_bytes"] = sum(w["payload_down_bytes"] + w["payload_up_bytes"]
                                   for w in rec["clients"])
        return rec

    def _worker_record(self, t: WorkerTask) -> dict[str, Any]:
        upd = t.update
        down_payload = t.payload_down
        elapsed = ((t.received_at or 0.0) - (t.sent_at or 0.0)) if upd else 0.0
        compute = upd.compute_s if upd else 0.0
        return {
            "worker_id": t.worker_id,
            "client_id": t.plan.client_id,
            "ratio": t.plan.ratio,
            "arrived": upd is not None,
            "reason": t.reason,
            "payload_down_elems": down_payload // 4,
            "payload_up_elems": t.payload_up // 4,
            "payload_down_bytes": down_payload,
            "payload_up_bytes": t.payload_up,
            "message_down_bytes": t.message_down,
            "message_up_bytes": t.message_up,
            "wire_down_bytes": t.wire.bytes_sent if t.wire else None,
            "wire_up_bytes": t.wire.bytes_received if t.wire else None,
            "wire_down_l2_bytes": t.wire.l2_sent() if t.wire else None,
            "wire_up_l2_bytes": t.wire.l2_received() if t.wire else None,
            "compute_s": round(compute, 6),
            "receive_s": round(t.receive_s, 6),
            "upload_s": round(t.upload_s, 6),
            "transfer_s": round(max(0.0, elapsed - compute), 6),
            "peak_mem_bytes": upd.peak_mem_bytes if upd else 0,
            "samples": upd.samples if upd else 0,
            "upper_loss": upd.upper_loss if upd else None,
        }


# --------------------------------------------------------------------------- serving


@dataclass
class Server:
    grpc_server: grpc.Server
    coord: Coordinator
    driver: RoundDriver
    thread: threading.Thread
    port: int
    health: health.HealthServicer

    def wait(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def stop(self, grace: float = 2.0) -> None:
        if not self.coord.finished:
            self.driver.finish("coordinator stopped")
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()


def grpc_options(cfg: Config) -> list[tuple[str, int]]:
    m = cfg.cluster.max_message_bytes
    return [("grpc.max_send_message_length", m), ("grpc.max_receive_message_length", m)]


def serve(cfg: Config, out_dir: str | Path | None = None, bind: str | None = None,
          progress: Callable[[dict[str, Any]], None] | None = None,
          job: Job | None = None, linger_s: float = 3.0) -> Server:
    """Start the coordinator: the gRPC server and the round driver thread. Returns at once;
    ``Server.wait()`` blocks until the run is over."""
    tune_allocator()
    job = job or Job.from_config(cfg)
    out = Path(out_dir) if out_dir is not None else None
    coord = Coordinator(cfg, job, out)
    n = cfg.cluster.workers or cfg.clients.count
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(16, 3 * n + 8),
                                                    thread_name_prefix="rabo-rpc"),
                         options=grpc_options(cfg))
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coord), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = bind or cfg.cluster.bind
    port = server.add_insecure_port(address)
    if port == 0:
        raise CoordinatorError(f"cannot bind {address}")
    coord.port = port
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    driver = RoundDriver(coord, progress)

    def run() -> None:
        driver.run()
        # let polling workers hear "finished" before the server goes away
        time.sleep(linger_s)

    thread = threading.Thread(target=run, name="rabo-rounds", daemon=True)
    thread.start()
    host = address.rsplit(":", 1)[0]
    log.info("coordinator listening on %s:%d", host, port)
    return Server(server, coord, driver, thread, port, health_servicer)
