"""The worker: register, heartbeat, fetch assignments, run the client step, stream updates.

Network failures are retried with capped exponential backoff and full jitter (the AWS
architecture blog's "Exponential Backoff and Jitter"); a coordinator that forgot this worker
(restart, expiry) is answered by registering again. SIGTERM / SIGINT finish the step in hand,
say goodbye (Leave) and exit 0; a second signal exits at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import torch

from rabo import config
from rabo.auth import TlsFiles
from rabo.engine import client_step
from rabo.errors import ConfigError, ExitCode, RaboError
from rabo.job import Job, resolve_device
from rabo.runtime import (
    peak_above_startup,
    prefer_low_memory,
    release_free_memory,
    settled_rss_bytes,
)
from rabo.wireformat import ClientResiduals
from rabo_proto import PROTOCOL_VERSION
from rabo_proto.codec import BufferPool, WireError
from rabo_proto.status import RUN_COMPLETE, RUN_STOPPING, run_state
from rabo_proto.stream import CoordinatorStub, parse, receive_payload
from rabo_proto.v1 import rabo_pb2 as pb
from worker.backoff import Backoff
from worker.profile import build_profile
from worker.security import open_channel
from worker.wire import assignment_from_wire, update_messages

log = logging.getLogger("rabo.worker")
# receive buffers kept between rounds: one assignment at a time, so normally one buffer
RECEIVE_POOL_BYTES = 2 << 30
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED,
             grpc.StatusCode.CANCELLED}
FORGOTTEN = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# an update the coordinator does not take (late, stale round, duplicate, earlier try of a
# retried round, or refused: its magnitude, a non-finite value, a damaged payload): dropped,
# and the worker fetches its next assignment (one bad step must not end an honest worker)
SUBMIT_REFUSED = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
                  grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED,
                  grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS}


class WorkerExit(RaboError):
    """The worker must stop; ``code`` is the process exit status (an :class:`ExitCode`)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class WorkerOptions:
    target: str
    name: str = "worker"
    memory_limit: int | None = None
    device: str = "auto"
    threads: int = 0
    client_id: int = -1
    poll_s: float = 5.0
    max_message_bytes: int = 64 * 1024 * 1024
    give_up_s: float = 0.0  # stop retrying after this long without the coordinator (0: never)
    tls: TlsFiles = field(default_factory=TlsFiles)
    token: bytes | None = None
    server_name: str | None = None
    step_delay_s: float = 0.0  # fault injection for tests: sleep before each submission
    # where the worker keeps its instance secret across restarts (None: new per process)
    state_file: str | None = None


HEARTBEATS_IN_FLIGHT = 4  # unanswered heartbeats a worker keeps sending beside


def instance_secret(state_file: str | None) -> str:
    """This worker's instance secret: read from ``state_file`` (created, mode 0600, on first
    use), or a new one for this process."""
    if state_file is None:
        return secrets.token_hex(16)
    path = Path(state_file)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise WorkerExit(f"--state-file {path}: cannot read: {exc.strerror}",
                         ExitCode.USAGE) from None
    if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
        return text
    if text:
        raise WorkerExit(f"--state-file {path}: not a worker state file (expected 32 hex "
                         f"digits)", ExitCode.USAGE)
    secret = secrets.token_hex(16)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
    except OSError as exc:
        raise WorkerExit(f"--state-file {path}: cannot write: {exc.strerror}",
                         ExitCode.USAGE) from None
    return secret


def pick_device(name: str) -> torch.device:
    """``--device``, read by ``rabo.job.resolve_device``; a bad one ends the worker (usage)."""
    try:
        return resolve_device(name)
    except ConfigError as exc:
        raise WorkerExit(f"--device: {exc}", ExitCode.USAGE) from None


def explain_unreachable(code: str, details: str, target: str, tls: bool) -> str:
    """A gRPC failure to reach ``target``, in words that name the likely fix."""
    d = details.lower()
    if "resolv" in d or "dns" in d or "name not found" in d or "lookup" in d:
        return f"cannot resolve the coordinator's host in {target} (DNS): check the name"
    if "handshake" in d or "ssl" in d or "tls" in d or "certificate" in d:
        if tls:
            return (f"TLS handshake with {target} failed: is the coordinator started with "
                    "--tls-cert, and does --tls-ca hold the CA that signed it?")
        return f"{target} closed the connection during set-up: does it expect TLS (--tls-ca)?"
    if "connection refused" in d:
        return (f"connection refused at {target}: is the coordinator started, listening on "
                "that address and port?")
    if "socket closed" in d or "connection reset" in d or "end of stream" in d:
        return (f"{target} closed the connection" + ("" if tls else
                                                     ": if it runs with TLS, give --tls-ca"))
    if "deadline" in d or "timeout" in d or "timed out" in d:
        return (f"no answer from {target} in time: a wrong address, or a firewall dropping "
                "the packets?")
    if code != "UNAVAILABLE":  # the coordinator answered, with a retryable failure
        return f"a call to the coordinator at {target} failed ({code}: {details})"
    return f"coordinator at {target} unreachable ({code}: {details})"


class Worker:
    def __init__(self, opts: WorkerOptions, sleep: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # a worker is memory-bound: freed tensors go back to the system (the coordinator, which
        # is not, keeps them for speed: rabo.runtime.tune_allocator)
        prefer_low_memory()
        self.opts = opts
        # backoff waits end early on SIGTERM/SIGINT (a plain time.sleep would sit out up to
        # the backoff cap, past a supervisor's grace period)
        self.sleep = sleep or self._pause
        self.clock = clock  # for the give-up and contact times (injectable for tests)
        self.stop = threading.Event()
        self.device = pick_device(opts.device)
        if opts.threads > 0:
            torch.set_num_threads(opts.threads)
        self.flops: float | None = None
        self.baseline_rss = psutil.Process().memory_info().rss
        self._jobs: dict[str, Job] = {}
        # the int8 error feedback of the clients this worker ran in its session (a new
        # registration is a new session: it starts from zero residuals)
        self.residuals = ClientResiduals()
        # from registering until the job is built: the profile's budget does not yet count
        # the data (ResourceProfile.loading)
        self._loading = True
        self._call: Any = None  # the in-flight long poll, cancelled on a signal
        self.rounds_done = 0
        # assignments land in buffers kept from earlier rounds (no page faults per round)
        self._buffers = BufferPool(RECEIVE_POOL_BYTES)
        self.finished = False  # the coordinator said the run is over
        self.heard_complete = False  # ... in a heartbeat's answer (the main loop may not yet)
        self._closed = threading.Event()  # the channel is gone: heartbeats stop
        self.worker_id = ""
        self.credential = ""
        self._contact = 0.0  # monotonic time of the last answer from the coordinator
        self._last_why, self._last_why_at, self._long_outage = "", -1e9, False
        # the same secret on every registration: a restarted coordinator gives our slot back
        self.instance = instance_secret(opts.state_file)

    # ------------------------------------------------------------------ lifecycle

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            if self.stop.is_set():
                raise SystemExit(128 + signum)
            log.info("signal %d: finishing the step in hand, then leaving", signum)
            self.stop.set()
            call = self._call
            if call is not None:
                call.cancel()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def profile(self) -> pb.ResourceProfile:
        """A fresh profile (cgroups and memory re-read; the step benchmark measured once)."""
        held = max(0, psutil.Process().memory_info().rss - self.baseline_rss)
        p = build_profile(self.device, self.opts.memory_limit, self.opts.threads, None,
                          self.flops, held_bytes=held)
        p.loading = self._loading
        self.flops = p.flops_per_s
        return p

    def run(self) -> int:
        """Work until the run is finished (0), a signal (0) or a fatal refusal (non-zero)."""
        opts = self.opts
        backoff = Backoff()
        lost_since: float | None = None
        options = [("grpc.max_send_message_length", opts.max_message_bytes),
                   ("grpc.max_receive_message_length", opts.max_message_bytes),
                   # a dead coordinator or a broken route shows up as a failed ping within
                   # ~30 s even in the middle of a long transfer; no transfer deadline needed
                   ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.max_pings_without_data", 0)]
        channel = open_channel(opts.target, options, opts.tls, opts.token, opts.server_name)
        try:
            return self._run_on(channel, backoff, lost_since)
        finally:
            self._closed.set()
            channel.close()

    def _run_on(self, channel: grpc.Channel, backoff: Backoff, lost_since: float | None) -> int:
        """The retry loop of :meth:`run` on one channel."""
        opts = self.opts
        stub = CoordinatorStub(channel)
        while not self.stop.is_set():
            try:
                finished = self._session(stub)
                if finished:
                    self.finished = True
                    return 0
                backoff.reset()
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if self.stop.is_set():
                    break
                details = exc.details() or ""  # type: ignore[attr-defined]
                now = self.clock()
                if lost_since is not None and self._contact > lost_since:
                    # answers came since the last outage began: this is a new one
                    lost_since = None
                    backoff.reset()
                    self._last_why = ""
                if code in FORGOTTEN:
                    if not self.worker_id:
                        # refused while registering: our token or certificate, not a session
                        # the coordinator forgot; retrying would only repeat the refusal
                        log.error("coordinator refused the registration: %s: %s", code.name,
                                  details)
                        return ExitCode.REFUSED
                    log.warning("coordinator does not know this worker (%s): registering "
                                "again", details)
                    self.worker_id = ""
                    continue
                if run_state(exc) == RUN_COMPLETE:
                    log.info("%s", details)
                    self.finished = True
                    return 0
                if self.heard_complete and code == grpc.StatusCode.UNAVAILABLE:
                    # a heartbeat's answer said every round is done; the coordinator has
                    # gone since, as it does at the end of a run
                    log.info("run finished (the coordinator said so in a heartbeat and is "
                             "gone now)")
                    self.finished = True
                    return 0
                admission = code == grpc.StatusCode.RESOURCE_EXHAUSTED and not self.worker_id
                if code not in RETRYABLE and not admission:
                    log.error("coordinator refused: %s: %s", code.name, details)
                    return ExitCode.REFUSED
                if lost_since is None:
                    lost_since = now
                if opts.give_up_s and now - lost_since > opts.give_up_s:
                    log.error("no %s at %s for %.0fs: giving up",
                              "admission" if admission else "coordinator", opts.target,
                              now - lost_since)
                    return ExitCode.GAVE_UP
                delay = backoff.next_delay()
                if admission:
                    # our slot is still held by our previous (expiring) self, or
                    # registrations are rate limited: wait and try again
                    log.info("registration refused (%s); retrying in %.1fs", details, delay)
                elif run_state(exc) == RUN_STOPPING:
                    log.info("coordinator unreachable (%s: %s); retrying in %.1fs", code.name,
                             details, delay)
                else:
                    self._unreachable(code, details, now - lost_since, delay)
                self.sleep(delay)
                continue
            except WorkerExit as exc:
                log.error("%s", exc)
                return exc.code
            lost_since = None
            self._last_why = ""  # in contact again: the next outage is reported afresh
        self._leave(stub)
        return 0

    def _unreachable(self, code: Any, details: str, for_s: float, delay: float) -> None:
        """Why the coordinator cannot be reached, said as a warning the first time (and when
        the reason changes), at most once a minute after that, and once more after a minute
        of failures; every retry in between goes to the debug log."""
        why = explain_unreachable(code.name, details, self.opts.target, self.opts.tls.enabled)
        now = self.clock()
        if why != self._last_why or now - self._last_why_at >= 60.0:
            log.warning("%s (retrying in %.1fs)", why, delay)
            self._last_why, self._last_why_at = why, now
        elif for_s >= 60.0 and not self._long_outage:
            log.warning("no coordinator for %.0fs (%s); still retrying%s", for_s, why,
                        f", giving up after {self.opts.give_up_s:.0f}s" if self.opts.give_up_s
                        else "")
            self._long_outage = True
        else:
            log.debug("%s (retrying in %.1fs)", why, delay)
        if for_s < 60.0:
            self._long_outage = False

    def _leave(self, stub: CoordinatorStub) -> None:
        if not self.worker_id:
            return
        with contextlib.suppress(grpc.RpcError):
            stub.Leave(pb.LeaveRequest(worker_id=self.worker_id, credential=self.credential,
                                       reason="worker stopped by a signal"), timeout=2.0)

    # ------------------------------------------------------------------ one session

    def _session(self, stub: CoordinatorStub) -> bool:
        """Register (if needed) and work; True when the coordinator says the run is over."""
        if not self.worker_id:
            self._loading = True
            reply = stub.Register(pb.RegisterRequest(
                name=self.opts.name, profile=self.profile(), client_id=self.opts.client_id,
                protocol=PROTOCOL_VERSION, instance=self.instance), timeout=30.0)
            self._contact = self.clock()
            self.worker_id, self.credential = reply.worker_id, reply.credential
            self.residuals.clear()
            self.client_id, self.chunk_bytes = reply.client_id, reply.chunk_bytes
            self.heartbeat_s = reply.heartbeat_s
            # heartbeats first: building the job (loading data) must not look like silence
            hb = threading.Thread(target=self._heartbeats, args=(stub, self.worker_id),
                                  daemon=True, name="rabo-heartbeat")
            hb.start()
            self.job = self._job(reply.config_json)
            self._loading = False
            self._ready(stub)
            log.info("registered as %s, client %d", self.worker_id, self.client_id)
        last_round = 0
        last_wait = ""
        while not self.stop.is_set():
            call = stub.FetchAssignment(pb.FetchRequest(
                worker_id=self.worker_id, credential=self.credential, after_round=last_round,
                wait_s=self.opts.poll_s))
            self._call = call
            try:
                try:
                    first = parse(next(call), pb.AssignmentMessage, "the coordinator's answer")
                except WireError as exc:
                    raise WorkerExit(f"bad answer from the coordinator: {exc}",
                                     ExitCode.PROTOCOL) from None
                self._contact = self.clock()
                kind = first.WhichOneof("body")
                if kind == "finished":
                    log.info("run finished: %s", first.finished.reason)
                    return True
                if kind == "wait":
                    if first.wait.reason != last_wait and first.wait.kind != pb.Wait.NO_ROUND:
                        log.warning("%s", first.wait.reason)
                    last_wait = first.wait.reason
                    continue
                if kind != "assignment":
                    raise WorkerExit(f"unexpected first message {kind!r}", ExitCode.PROTOCOL)
                start = time.perf_counter()
                assignment = self._receive(first.assignment, call)
                receive_s = time.perf_counter() - start
            finally:
                self._call = None
            data = self.job.data.clients[assignment.client_id]
            update = client_step(self.job.task, assignment, data, self.device,
                                 self.residuals.of(self.job.hyper.wire, assignment.client_id))
            # reported above the start-up footprint, as the budget is counted: the
            # coordinator calibrates this worker's memory figures with it (policy.calibrate)
            update = dataclasses.replace(update, peak_mem_bytes=peak_above_startup(
                update.peak_mem_bytes, self.baseline_rss, self.device))
            if self.opts.step_delay_s:
                time.sleep(self.opts.step_delay_s)
            _, messages = update_messages(update, self.worker_id, self.credential,
                                          self.chunk_bytes, receive_s)
            # no fixed deadline on the upload: a large update over a slow link may take long;
            # keepalive pings detect a dead peer, and the coordinator closes stalled rounds
            try:
                reply = stub.SubmitUpdate(messages)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code not in SUBMIT_REFUSED or run_state(exc):
                    raise
                # late, stale, duplicate, for an earlier try of the round or refused: this
                # update is not taken; the session goes on with the next assignment
                log.warning("round %d: update not taken (%s: %s)", assignment.round,
                            code.name, exc.details())  # type: ignore[attr-defined]
                reply = None
            self._contact = self.clock()
            last_round = assignment.round
            if reply is not None:
                self.rounds_done += 1
                log.info("round %d done: ratio %g, %.2fs compute, peak memory %d MiB above "
                         "start-up, %s", assignment.round, assignment.mask.ratio,
                         update.compute_s, update.peak_mem_bytes >> 20,
                         reply.message)
            # drop this round's payloads before the next one arrives, or the next round's
            # peak would carry them too
            del assignment, update, messages, first, call
            release_free_memory()
        return False

    def _pause(self, seconds: float) -> None:
        self.stop.wait(seconds)


    def _receive(self, msg: pb.Assignment, call: Any) -> Any:
        try:
            tensors, _ = receive_payload(msg.payload, call, self.chunk_bytes,
                                         pb.AssignmentMessage, pool=self._buffers)
            return assignment_from_wire(msg, tensors, self.job.hyper)
        except WireError as exc:
            raise WorkerExit(f"bad assignment from the coordinator: {exc}",
                             ExitCode.PROTOCOL) from None

    def _job(self, config_json: str) -> Job:
        job = self._jobs.get(config_json)
        if job is None:
            cfg = config.from_dict(json.loads(config_json))
            job = Job.from_config(cfg)
            self._jobs = {config_json: job}
            # the start-up footprint (runtime and data) that memory budgets are counted above;
            # measured once per job, so a re-registration (coordinator restart) does not count
            # the training state of earlier rounds as start-up. What building the job freed
            # goes back first: left in the heap, it inflated the footprint by a varying 4-6 MiB
            # that the first round's trim then released, so the same job's peaks read 4-6 MiB
            # apart from one worker process to the next
            self.baseline_rss = settled_rss_bytes()
        return job

    def _ready(self, stub: CoordinatorStub) -> None:
        """Tell the coordinator the job is built: a profile whose budget counts the data it
        holds now, before the first fetch, so that the first round's ratio is chosen from it
        (the registration's profile was taken before the data was loaded). A failure is left
        to the heartbeats, which carry the same profile."""
        try:
            stub.Heartbeat(pb.HeartbeatRequest(
                worker_id=self.worker_id, credential=self.credential, profile=self.profile()),
                timeout=max(2.0, self.heartbeat_s))
        except grpc.RpcError as exc:
            log.debug("ready heartbeat failed: %s", exc.code())  # type: ignore[attr-defined]

    def _heartbeats(self, stub: CoordinatorStub, worker_id: str) -> None:
        """A heartbeat every ``heartbeat_s``, whether or not the last one has been answered:
        on a slow link an answer can wait seconds behind this worker's own assignment on the
        one HTTP/2 connection, while the requests (the other direction) still arrive, and
        they are what keeps the worker registered. At most a few are in flight."""
        pending: list[Any] = []
        while not self.stop.wait(self.heartbeat_s):
            if worker_id != self.worker_id or self._closed.is_set():
                for f in pending:
                    f.cancel()
                return  # re-registered (a newer heartbeat thread took over) or shut down
            for f in [f for f in pending if f.done()]:
                pending.remove(f)
                try:
                    if f.result().finished:
                        self.heard_complete = True
                        return
                except grpc.RpcError as exc:
                    log.debug("heartbeat failed: %s", exc.code())  # type: ignore[attr-defined]
                except grpc.FutureCancelledError:
                    pass
            if len(pending) < HEARTBEATS_IN_FLIGHT:
                pending.append(stub.Heartbeat.future(pb.HeartbeatRequest(  # type: ignore[attr-defined]
                    worker_id=worker_id, credential=self.credential, profile=self.profile()),
                    timeout=max(2.0, HEARTBEATS_IN_FLIGHT * self.heartbeat_s)))
