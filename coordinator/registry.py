"""Who is registered: worker ids, session credentials, client slots, profiles and liveness.

Time is injected (``clock``) so expiry is tested without sleeping, as in Flower's state tests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator.untrusted import printable
from rabo.errors import RaboError
from rabo.metrics import write_json
from rabo_proto.v1 import rabo_pb2 as pb


class RegistryError(RaboError):
    """Base of registry refusals; ``code`` names the gRPC status the servicer answers with."""

    code = "INVALID_ARGUMENT"


class UnknownWorker(RegistryError):
    code = "UNAUTHENTICATED"


class BadCredential(RegistryError):
    code = "PERMISSION_DENIED"


class RegistryFull(RegistryError):
    code = "RESOURCE_EXHAUSTED"


@dataclass
class WorkerRecord:
    worker_id: str
    credential: str
    client_id: int
    name: str
    profile: pb.ResourceProfile
    registered_at: float
    last_seen: float
    peer: str = ""
    identity: str = ""  # fingerprint of the client certificate it registered with (mTLS)
    instance: str = ""  # sha256 of the worker's instance secret ("" if it sent none)


def _read_slots(path: Path) -> dict[str, int]:
    """The instance -> slot map a previous coordinator of this run folder kept (none: {})."""
    try:
        data = json.loads(path.read_text())
        return {str(k): int(v) for k, v in data["slots"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RegistryError(f"{path}: not a slot file ({exc}); remove it to start afresh"
                            ) from None


class Registry:
    """Thread-safe registry of workers; client slots are the data partitions 0..slots-1."""

    def __init__(self, slots: int, expire_after_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 slots_file: Path | None = None, stream_quiet_s: float = 15.0) -> None:
        """``slots_file``: where the slot of each worker instance is kept (in the run folder),
        so that a coordinator resumed from that folder gives every returning worker its slot
        back; read if it exists. ``stream_quiet_s``: how long an open transfer stream of a
        worker keeps it alive without moving a byte (see :meth:`streaming`)."""
        self.slots = slots
        self.expire_after_s = expire_after_s
        self.stream_quiet_s = stream_quiet_s
        # worker id -> (open transfer streams, when one of them last moved bytes)
        self._streams: dict[str, tuple[int, float]] = {}
        self.clock = clock
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerRecord] = {}
        self.expired_total = 0
        self._slots_file = slots_file
        # sha256 of a worker's instance secret -> its client slot (never the secret itself)
        self._bound: dict[str, int] = _read_slots(slots_file) if slots_file else {}

    def register(self, name: str, profile: pb.ResourceProfile, requested_client: int,
                 peer: str = "", identity: str = "", instance: str = "") -> WorkerRecord:
        key = hashlib.sha256(instance.encode()).hexdigest() if instance else ""
        with self._lock:
            self._expire_locked()
            if key and requested_client < 0 and key in self._bound:
                requested_client = self._bound[key]  # a returning worker: its own slot
                # its earlier session, if the coordinator still holds one, is over
                for wid in [w for w, r in self._workers.items() if r.instance == key]:
                    del self._workers[wid]
            taken = {w.client_id: w for w in self._workers.values()}
            if requested_client >= self.slots:
                raise RegistryError(f"client slot {requested_client} does not exist: this job "
                                    f"has {self.slots} (clients.count)")
            if requested_client >= 0:
                holder = taken.get(requested_client)
                if holder is not None:
                    age = self.clock() - holder.last_seen
                    raise RegistryFull(
                        f"client slot {requested_client} is taken by worker {holder.worker_id} "
                        f"(last seen {age:.1f}s ago; a silent worker expires after "
                        f"{self.expire_after_s:.0f}s)")
                client_id = requested_client
            else:
                free = [c for c in range(self.slots) if c not in taken]
                if not free:
                    raise RegistryFull(f"all {self.slots} client slots are taken "
                                       "(clients.count); no more workers are needed")
                # a slot that belongs to a known instance is given to a newcomer only when
                # no other is free (its worker may be on its way back after a restart)
                owned = set(self._bound.values())
                client_id = next((c for c in free if c not in owned), free[0])
            now = self.clock()
            rec = WorkerRecord(worker_id=secrets.token_hex(8),
                               credential=secrets.token_urlsafe(32), client_id=client_id,
                               name=printable(name or "worker", 64), profile=profile,
                               registered_at=now,
                               last_seen=now, peer=peer, identity=identity, instance=key)
            self._workers[rec.worker_id] = rec
            if key and self._bound.get(key) != client_id:
                for other in [k for k, c in self._bound.items() if c == client_id]:
                    del self._bound[other]  # the slot has a new owner
                self._bound[key] = client_id
                self._save_slots_locked()
            return rec

    def _save_slots_locked(self) -> None:
        if self._slots_file is not None:
            write_json(self._slots_file, {"slots": self._bound})

    def authenticate(self, worker_id: str, credential: str, identity: str = "") -> WorkerRecord:
        """The live record of ``worker_id`` if ``credential`` is its own (constant time) and,
        under mutual TLS, the call carries the certificate it registered with."""
        with self._lock:
            self._expire_locked()
            rec = self._workers.get(worker_id)
            if rec is None:
                raise UnknownWorker(f"unknown worker id {worker_id!r} (not registered, or "
                                    "expired after missed heartbeats): register again")
            if not hmac.compare_digest(rec.credential.encode(), credential.encode()):
                raise BadCredential(f"wrong credential for worker {worker_id}")
            if rec.identity and not hmac.compare_digest(rec.identity, identity):
                raise BadCredential(f"worker {worker_id} registered with another client "
                                    "certificate")
            return rec

    def touch(self, worker_id: str, profile: pb.ResourceProfile | None = None,
              peer: str | None = None) -> None:
        with self._lock:
            rec = self._workers.get(worker_id)
            if rec is None:
                return
            rec.last_seen = self.clock()
            if profile is not None and profile.ByteSize():
                if profile.loading and not rec.profile.loading:
                    # ready once, ready for this registration: a heartbeat the worker built
                    # while it was still loading can arrive after its ready one
                    fresh = pb.ResourceProfile()
                    fresh.CopyFrom(profile)
                    fresh.loading = False
                    profile = fresh
                rec.profile = profile
            if peer:
                rec.peer = peer

    def streaming(self, worker_id: str, delta: int = 0) -> None:
        """A transfer stream of ``worker_id`` opened (``delta`` 1), closed (-1) or moved bytes
        (0). While one is open and has moved bytes within ``stream_quiet_s``, the worker is
        not expired for missed heartbeats: on a slow link its heartbeats' answers queue behind
        its own assignment on the one HTTP/2 connection (seconds of data sit in the send
        buffer at 1 Mbit/s), so silence there is not a sign of death while the transfer
        lives. A worker gone mid-transfer stops moving bytes: its last sign of life is then
        the last byte moved, and it expires ``stream_quiet_s`` plus the usual expiry time
        after it. A stream that closes is no sign of life (gRPC may end a dead peer's stream
        late)."""
        with self._lock:
            n, moved_at = self._streams.get(worker_id, (0, 0.0))
            n += delta
            now = self.clock()
            if delta <= 0 and n > 0:
                self._streams[worker_id] = (n, now if delta == 0 else moved_at)
            elif delta > 0:
                self._streams[worker_id] = (n, now)
            else:
                self._streams.pop(worker_id, None)
            rec = self._workers.get(worker_id)
            if rec is not None and delta >= 0 and worker_id in self._streams:
                rec.last_seen = max(rec.last_seen, now)

    def remove(self, worker_id: str) -> bool:
        with self._lock:
            self._streams.pop(worker_id, None)
            return self._workers.pop(worker_id, None) is not None

    def live(self) -> list[WorkerRecord]:
        with self._lock:
            self._expire_locked()
            return sorted(self._workers.values(), key=lambda w: w.client_id)

    def ready(self) -> list[WorkerRecord]:
        """The live workers that have built their job (``ResourceProfile.loading`` false: a
        loading worker's budget does not count its data yet)."""
        return [w for w in self.live() if not w.profile.loading]

    def get(self, worker_id: str) -> WorkerRecord | None:
        with self._lock:
            return self._workers.get(worker_id)

    def __len__(self) -> int:
        with self._lock:
            self._expire_locked()
            return len(self._workers)

    def _expire_locked(self) -> None:
        now = self.clock()
        for wid, (_, moved_at) in self._streams.items():
            rec = self._workers.get(wid)
            if rec is not None and now - moved_at < self.stream_quiet_s:
                rec.last_seen = max(rec.last_seen, now)  # its transfer lives (streaming)
        cutoff = now - self.expire_after_s
        dead = [wid for wid, w in self._workers.items() if w.last_seen < cutoff]
        for wid in [w for w in self._streams if w not in self._workers or w in dead]:
            del self._streams[wid]  # streams of a worker gone count for nobody
        for wid in dead:
            del self._workers[wid]
        self.expired_total += len(dead)
