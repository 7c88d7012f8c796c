"""Strings that come from a worker (its name, its leave reason, profile fields) as they may be
logged or recorded: control characters escaped, so that a newline cannot forge a log line,
and the length bounded, so that a 64 KiB name cannot flood a log or a status message."""

from __future__ import annotations

LIMIT = 120  # characters kept of one untrusted string


def printable(text: str, limit: int = LIMIT) -> str:
    """``text`` with every non-printable character escaped (\\n, \\x1b, ...) and cut to
    ``limit`` characters, saying how many were left out."""
    escaped = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                      for ch in text[:limit * 4])
    if len(escaped) > limit or len(text) > limit * 4:
        return f"{escaped[:limit]}... ({len(text)} characters)"
    return escaped
