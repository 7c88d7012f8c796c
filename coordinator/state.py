"""What the coordinator's servicer and round driver share: one lock and condition
(:class:`Signal`), the worker registry, the global model between rounds and the open round's
ticket (:class:`RoundTicket`, one :class:`WorkerTask` per assigned worker).

The servicer (``coordinator.servicer``) answers RPCs as coroutines on gRPC's asyncio server
and never touches the global model: it hands out prepared assignments and files validated
updates. The round driver (``coordinator.rounds``) runs the round loop on its own thread and
is the only one that replaces the model, between rounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.monitoring import Monitor
from coordinator.payloads import SharedPayloads
from coordinator.registry import Registry
from coordinator.security import RateLimiter
from coordinator.untrusted import printable
from rabo import checkpoint
from rabo.config import Config, to_dict
from rabo.engine import ClientPlan, GlobalState, Update
from rabo.errors import RaboError
from rabo.job import Job
from rabo.netstat import SocketCounters, TcpCounters, parse_peer
from rabo.rounds import EarlyAggregate

log = logging.getLogger("rabo.coordinator")
# refusals of who may join, logged (rate-limited): tokens, credentials, registrations
LOGGED_REFUSALS = ("auth", "register")
REFUSAL_LOG_EVERY_S = 30.0


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
    payloads: SharedPayloads | None = None  # assignments that several workers receive
    early: EarlyAggregate | None = None  # the updates averaged so far (by the driver)

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
                                 out_dir / checkpoint.SLOTS if out_dir is not None else None,
                                 stream_quiet_s=c.stall_timeout_s)
        self.register_limiter = RateLimiter(c.register_rate_per_s, 4 * c.register_rate_per_s,
                                            clock)
        self.cond = Signal()
        self.state: GlobalState = state if state is not None else job.engine.init_state()
        self.monitor = monitor
        self.ticket: RoundTicket | None = None
        self.finished = False  # the round driver has stopped (completed, stopped or failed)
        self.complete = False  # ...because every round is done: workers may leave for good
        self.finish_reason = ""
        # workers whose fetch has been answered that the run is complete (a heartbeat's answer
        # says so too, but a worker's main loop hears it from its next fetch):
        # the server lingers until every live worker is among them (coordinator/server.py)
        self.told_finished: set[str] = set()
        self.config_json = json.dumps(to_dict(cfg))
        self.counters = TcpCounters()
        self.port = 0  # the bound port, for the wire counters
        self.rejected: dict[str, int] = {}
        self._refusal_log: dict[str, tuple[float, int]] = {}  # kind -> (last logged, held back)
        self.calls_open = 0  # coordinator calls in progress, all peers (the servicer counts)

    def reject(self, kind: str, why: str = "", peer: str = "") -> None:
        """Count a refused call; refusals of who may join (tokens, credentials, registrations)
        are also logged: the first of a kind at once, then at most one line per kind every
        ``REFUSAL_LOG_EVERY_S`` with the count held back, so a flood cannot fill the log."""
        now = time.monotonic()
        held = None
        with self.cond:
            self.rejected[kind] = self.rejected.get(kind, 0) + 1
            if kind.startswith(LOGGED_REFUSALS):
                last, quiet = self._refusal_log.get(kind, (-math.inf, 0))
                if now - last >= REFUSAL_LOG_EVERY_S:
                    held, self._refusal_log[kind] = quiet, (now, 0)
                else:
                    self._refusal_log[kind] = (last, quiet + 1)
        if self.monitor:
            self.monitor.rejected.labels(kind).inc()
        if held is not None:
            # a stale worker credential is what every worker presents once after a
            # coordinator restart (it then registers again): worth a note, not a warning
            log.log(logging.INFO if kind == "auth" else logging.WARNING, "refused %s%s: %s%s",
                    "a registration" if kind.startswith("register") else "a call",
                    f" from {printable(peer)}" if peer else "", printable(why or kind),
                    f" ({held} more refused like it since the last report)" if held else "")

    def read_counters(self, peer: str) -> SocketCounters | None:
        addr = parse_peer(peer)
        if addr is None or not self.port:
            return None
        return self.counters.read(self.port, addr)
