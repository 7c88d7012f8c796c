"""The gRPC coordinator, started: the gRPC server (coordinator and health services, on one
asyncio event loop thread), the round driver's thread, and stopping them.

The parts: ``coordinator.state`` (what servicer and driver share), ``coordinator.servicer``
(the RPCs), ``coordinator.rounds`` (the round driver, the gRPC transport of
``rabo.rounds.RoundLoop``), ``coordinator.registry``, ``coordinator.wire`` (wire messages to
``rabo`` types), ``coordinator.security``, ``coordinator.monitoring``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.monitoring import MetricsUnavailable, Monitor
from coordinator.rounds import RoundDriver
from coordinator.security import TokenInterceptor, server_credentials
from coordinator.servicer import RECEIVE_HEADROOM, CoordinatorServicer
from coordinator.state import Coordinator, CoordinatorError
from rabo import checkpoint
from rabo.auth import TlsFiles
from rabo.config import Config
from rabo.engine import GlobalState
from rabo.job import Job
from rabo.runtime import tune_allocator
from rabo_proto.stream import add_servicer

log = logging.getLogger("rabo.coordinator")
STOP_DRAIN_S = 20.0  # SIGTERM: how long the driver may take to record its last round
SERVICE_NAME = "rabo.v1.Coordinator"


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
    mport = cfg.cluster.metrics_port if metrics_port is None else metrics_port
    monitor = None
    if mport:  # first: without its package (an extra) this fails before anything has started
        try:
            monitor = Monitor()
        except MetricsUnavailable as exc:
            key = "cluster.metrics_port" if metrics_port is None else "--metrics-port"
            raise CoordinatorError(f"{key} {mport}: {exc}") from None
    tune_allocator(arenas=1)  # before the gRPC server's threads start
    from rabo.provenance import provenance

    provenance()  # the checkout as the run starts (edits made while it runs do not count)
    security = security or Security()
    job = job or Job.from_config(cfg)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        checkpoint.lock_run_dir(out)  # one run per folder (a second gets an error naming the pid)
    if monitor is not None:
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
        # let polling workers hear "finished" before the server goes away: at least
        # linger_s, and after a complete run until every live worker has been told (a worker
        # that heard it stops polling; one that did not is polling or heartbeating, or expires
        # within heartbeat_s x heartbeat_misses), so that a run-to-completion worker (a
        # Kubernetes Job's pod) exits 0 instead of retrying a coordinator that is gone
        if linger_s <= 0:
            return
        start = time.monotonic()
        cap = max(linger_s, coord.registry.expire_after_s + 1.0)
        while time.monotonic() - start < cap:
            waited = time.monotonic() - start
            untold = {w.worker_id for w in coord.registry.live()} - coord.told_finished
            if waited >= linger_s and (not coord.complete or not untold):
                return
            time.sleep(0.1)

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
    def refused(kind: str) -> None:
        why = ("missing token (the worker sent none: start it with --token-file or "
               "RABO_TOKEN)" if kind.startswith("missing") else
               "wrong token (the worker's token is not one this coordinator accepts)")
        coord.reject(f"auth-{kind}", why)

    interceptors = [TokenInterceptor(security.tokens, refused)] if security.tokens else []
    server = grpc.aio.server(options=grpc_options(cfg), interceptors=interceptors)
    add_servicer(CoordinatorServicer(coord), server)
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
