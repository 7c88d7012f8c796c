"""Encode once, send many: the assignments that workers of one round share.

Workers whose plans keep the same entries of the same state (same ratio under static masks,
the common case; same window under rolling ones) receive the same bytes. Their payload is
sliced, copied into chunk messages and checksummed once, by the first of them to fetch, and
streamed from those chunks to each; it is dropped when the last of them has fetched it, or
with the round. A payload that no other worker of the round shares is encoded as it streams
(nothing kept). What is kept at once is bounded by the size of a full-width payload (one model
copy): the most-shared payloads first, the others streamed as if unshared.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from rabo.engine import ClientPlan, GlobalState, RoundEngine
from rabo_proto.codec import Encoded

BYTES_PER_ELEMENT = 4


def full_payload_bytes(job: Any) -> int:
    """Bytes of a full-width assignment: the whole x, y and v."""
    def numel(layout: Any) -> int:
        return sum(math.prod(lay.shape) for lay in layout.values())
    return BYTES_PER_ELEMENT * (numel(job.task.x_layout) + 2 * numel(job.task.y_layout))


def payload_bytes(plan: ClientPlan) -> int:
    """Bytes of the assignment of ``plan``: x, y and v (v has y's shape)."""
    return BYTES_PER_ELEMENT * (plan.x.numel() + 2 * plan.y.numel())


class _Entry:
    def __init__(self, remaining: int) -> None:
        self.remaining = remaining
        self.lock = threading.Lock()
        self.encoded: Encoded | None = None


class SharedPayloads:
    """The payloads of one round's tasks that more than one worker receives."""

    def __init__(self, engine: RoundEngine, state: GlobalState,
                 plans: Iterable[tuple[str, ClientPlan]], budget_bytes: int) -> None:
        self._keys: dict[str, Any] = {}
        sizes: dict[Any, int] = {}
        for wid, plan in plans:
            key = engine.payload_key(state, plan)
            self._keys[wid] = key
            sizes[key] = payload_bytes(plan)
        shared = Counter(self._keys.values())
        self._entries: dict[Any, _Entry] = {}
        left = budget_bytes
        for key, n in sorted(shared.items(), key=lambda kv: (-kv[1], -sizes[kv[0]])):
            if n >= 2 and sizes[key] <= left:
                self._entries[key] = _Entry(n)
                left -= sizes[key]
        self._lock = threading.Lock()
        self.encodings = 0  # payloads encoded for sharing (each once)

    @property
    def kept(self) -> int:
        return len(self._entries)

    def get(self, wid: str, encode: Callable[[], Encoded]) -> Encoded:
        """``wid``'s payload: frozen and shared when another worker receives the same bytes,
        else ``encode()`` as it is (streamed as it is made)."""
        with self._lock:
            entry = self._entries.get(self._keys.get(wid))
        if entry is None:
            return encode()
        with entry.lock:  # a second worker asking meanwhile waits for the first's encoding
            if entry.encoded is None:
                entry.encoded = encode().freeze()
                self.encodings += 1
            encoded = entry.encoded
            entry.remaining -= 1
            if entry.remaining <= 0:
                with self._lock:
                    self._entries.pop(self._keys[wid], None)
        return encoded

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
