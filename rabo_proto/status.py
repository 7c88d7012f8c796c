"""Machine-readable facts that ride along a refusal as gRPC trailing metadata, so that a client
acts on a key, never on the wording of the human-readable status message.

``RUN_STATE_KEY`` is set when the coordinator's round driver has stopped:

* ``RUN_COMPLETE``: every round is done; the worker leaves (status FAILED_PRECONDITION).
* ``RUN_STOPPING``: the coordinator is going away before the last round (SIGTERM, an error);
  the worker keeps retrying, so that a resumed coordinator finds it (status UNAVAILABLE).
"""

from __future__ import annotations

from typing import Any

RUN_STATE_KEY = "rabo-run-state"
RUN_COMPLETE = "complete"
RUN_STOPPING = "stopping"


def run_state(exc: Any) -> str:
    """The ``RUN_STATE_KEY`` value of a failed call (a ``grpc.RpcError``), or ""."""
    try:
        pairs = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - not a call error: no metadata
        return ""
    for key, value in pairs:
        if key == RUN_STATE_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""
