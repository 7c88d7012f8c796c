"""Run folders: ``metrics.jsonl`` (one JSON object per round) and ``summary.json``.

Every transport writes the same schema, documented in docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any, TextIO

from rabo.errors import RaboError
from rabo.tracking import RecordSink, configured_sink

log = logging.getLogger("rabo.metrics")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Appends one JSON line per round and flushes it, so a crashed run keeps its rounds; and
    hands each record to ``tracking`` (a :class:`rabo.tracking.RecordSink`, e.g. TensorBoard)
    when given. ``out_dir`` None: no ``metrics.jsonl``, the tracking only."""

    def __init__(self, out_dir: str | Path | None, append: bool = False,
                 tracking: RecordSink | None = None) -> None:
        self.dir: Path | None = None
        self.path: Path | None = None
        self.tracking = tracking
        self._file: TextIO | None = None
        if out_dir is not None:
            self.dir = Path(out_dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            self.path = self.dir / "metrics.jsonl"
            self._file = self.path.open("a" if append else "w")

    @classmethod
    def for_run(cls, out_dir: str | Path | None, append: bool = False) -> MetricsWriter | None:
        """The writer of a run: ``metrics.jsonl`` in ``out_dir`` (when given) and the tracking
        this process was told to use (``--tensorboard``, :func:`rabo.tracking.configured_sink`);
        None when there is neither. Every transport builds its writer here, so every command
        gets the same tracking. Raises :class:`rabo.tracking.TrackingUnavailable` when the
        tracker's package is missing."""
        sink = configured_sink()
        if out_dir is None and sink is None:
            return None
        return cls(out_dir, append, tracking=sink)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_clean(record), sort_keys=False) + "\n")
            self._file.flush()
        if self.tracking is not None:
            self.tracking.write(record)

    def close(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
        finally:
            if self.tracking is not None:
                self.tracking.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def temporary_beside(path: Path) -> Path:
    """A temporary name next to ``path``, unique to this process and call (two writers of
    one folder never share a temporary file)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = temporary_beside(path)
    with tmp.open("w") as f:
        json.dump(_clean(data), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _records(path: Path, strict: bool) -> list[dict[str, Any]]:
    """The records of ``path``. A last line cut short (a run stopped mid-write) is dropped
    with a warning. An unreadable line before the end is an error naming it when ``strict``;
    otherwise the records end there, with a warning."""
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            last = all(not rest.strip() for rest in lines[i:])
            if strict and not last:
                raise RaboError(f"{path}: line {i} is not a metrics record ({exc})") from None
            log.warning("%s: line %d is %s; the records end before it", path, i,
                        "cut short" if last else f"unreadable ({exc})")
            break
        out.append(rec)
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return _records(Path(run_dir) / "metrics.jsonl", strict=True)


def truncate_metrics(run_dir: str | Path, last_round: int) -> list[dict[str, Any]]:
    """Keep only the records of rounds <= ``last_round`` (resuming re-runs the later ones);
    returns the kept records."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    kept = [r for r in _records(path, strict=False) if r.get("round", 0) <= last_round]
    tmp = temporary_beside(path)
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept


def wire_total(records: list[dict[str, Any]]) -> int | None:
    """Bytes on the wire over the run; None when any round's could not be measured (a sum
    that leaves rounds out would read as a measurement)."""
    wires = [r.get("wire_bytes") for r in records]
    return None if any(w is None for w in wires) else int(sum(wires))  # type: ignore[arg-type]
