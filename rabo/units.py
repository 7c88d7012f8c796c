"""Byte sizes as people write them (``512MiB``, ``2GiB``, ``1.5GB``, ``1048576``)."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """Parse a byte size; raises ValueError naming the text when it is not one."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"byte size {text} is negative")
        return text
    m = _PATTERN.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"{text!r} is not a byte size; write e.g. 512MiB, 2GiB, 1.5GB or a plain number"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_byte_list(text: str) -> list[int]:
    """A comma-separated list of byte sizes (``96MiB,40MiB``); ValueError names the bad item or
    says the list is empty."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError(f"{text!r} names no size; write e.g. 8GiB,2GiB,512MiB")
    return [parse_bytes(s) for s in items]


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
