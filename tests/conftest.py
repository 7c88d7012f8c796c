"""Shared test helpers (pytest loads this file first; test modules import the helpers from it
by name, as they import ``grpc_util``)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller binds it next; a
    process that binds its own port 0 and reports it is race-free, where a test can do that)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mnist_available() -> bool:
    """Whether the bundled MNIST test set can be found (a clone without ../shared lacks it)."""
    from rabo.data.sources import resolve_root
    from rabo.errors import DataError

    try:
        resolve_root("mnist", None)
    except DataError:
        return False
    return True
