"""Experiment tracking: each round record, as ``metrics.jsonl`` holds it, also sent to a
tracker (TensorBoard, through ``torch.utils.tensorboard.SummaryWriter``).

The run's :class:`rabo.metrics.MetricsWriter` is the one place every transport records a round
(the in-process runner, the gRPC round driver, torch.distributed's rank 0), so a tracker fed
there sees the same scalars whichever command ran. ``--tensorboard DIR`` (every run command,
:func:`rabo.cliargs.add_tracking_args`) chooses the tracker for the process through
:func:`use_tensorboard`; :meth:`rabo.metrics.MetricsWriter.for_run` asks :func:`configured_sink`
for it. TensorBoard is an optional dependency (``pip install 'rabo[tracking]'``), imported only
when a run asks for it.

Scalars, at step = round (``None`` and non-finite values are left out, as they are null in
``metrics.jsonl``): ``round/<name>`` for each of :data:`ROUND_SCALARS`, and
``client/<client id>/<name>`` for each of :data:`CLIENT_SCALARS`, per worker whose update
arrived. The per-worker series are keyed by client id (the data partition the worker trains):
it is the same on every transport and across a coordinator restart, where gRPC worker ids are
random per registration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from rabo.errors import RaboError
from rabo.extras import package_missing

log = logging.getLogger("rabo.tracking")

INSTALL_HINT = "pip install 'rabo[tracking]'"

#: ``round/<tag>``: (tag, metrics.jsonl key, scale)
ROUND_SCALARS: tuple[tuple[str, str, float], ...] = (
    ("test_acc_pct", "test_acc", 100.0),  # percent, as the progress line shows it
    ("test_loss", "test_loss", 1.0),
    ("upper_loss", "upper_loss", 1.0),
    ("client_upper_loss", "client_upper_loss", 1.0),
    ("hypergradient_norm", "hypergradient_norm", 1.0),
    ("round_s", "round_s", 1.0),
    ("compute_s", "compute_s", 1.0),  # the slowest worker's
    ("transfer_s", "transfer_s", 1.0),
    ("aggregation_s", "aggregation_s", 1.0),
    ("wire_bytes", "wire_bytes", 1.0),  # absent in-process (no wire)
    ("payload_bytes", "payload_bytes", 1.0),
    ("participants", "participants", 1.0),
    ("coverage_x_min", "coverage_x_min", 1.0),
    ("coverage_x_mean", "coverage_x_mean", 1.0),
    ("coverage_y_min", "coverage_y_min", 1.0),
    ("coverage_y_mean", "coverage_y_mean", 1.0),
)

#: ``client/<id>/<tag>``: (tag, the worker record's keys, summed)
CLIENT_SCALARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ratio", ("ratio",)),
    ("payload_bytes", ("payload_down_bytes", "payload_up_bytes")),
    ("wire_bytes", ("wire_down_bytes", "wire_up_bytes")),
    ("compute_s", ("compute_s",)),
    ("transfer_s", ("transfer_s",)),
    ("peak_mem_bytes", ("peak_mem_bytes",)),
)


class TrackingUnavailable(RaboError):
    """A tracker was asked for and its package is missing (or does not import)."""


class RecordSink(Protocol):
    """Where a run's round records go besides ``metrics.jsonl``."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _sum(values: list[Any]) -> float | None:
    """The sum, or None when any value is missing (an unmeasured direction)."""
    total = 0.0
    for v in values:
        n = _number(v)
        if n is None:
            return None
        total += n
    return total


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) of each scalar of one round record (see the module docstring)."""
    for tag, key, scale in ROUND_SCALARS:
        value = _number(record.get(key))
        if value is not None:
            yield f"round/{tag}", scale * value
    for client in record.get("clients", []):
        for tag, keys in CLIENT_SCALARS:
            value = _sum([client.get(k) for k in keys])
            if value is not None:
                yield f"client/{client['client_id']}/{tag}", value


def tensorboard_missing() -> str | None:
    """Why TensorBoard logging cannot work here (None: its package is installed). Cheap: it
    looks the package up without importing it (or torch)."""
    return package_missing("tensorboard",
                           f"the tensorboard package is not installed ({INSTALL_HINT})")


class TensorBoardSink:
    """Each round record as TensorBoard scalars at step = round, flushed after each round (a
    crashed run keeps its points, as it keeps its metrics.jsonl lines).

    The event file is opened at the first record; when that is a later round than 1 (a
    resumed run: ``rabo coordinator --resume``) with ``purge_step`` = its round, so the run
    continues the same TensorBoard run and the points an earlier process wrote for the rounds
    that are now re-run are dropped by TensorBoard's readers, as ``metrics.jsonl`` drops their
    lines. A run that starts at round 1 purges nothing: give each run its own DIR (TensorBoard
    shows the runs under a parent folder side by side).

    Raises :class:`TrackingUnavailable` when ``torch.utils.tensorboard`` does not import."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # noqa: BLE001 - missing, or a version clash (protobuf...)
            raise TrackingUnavailable(f"--tensorboard {self.log_dir}: TensorBoard does not "
                                      f"import ({exc}); {INSTALL_HINT}") from None
        self._summary_writer = SummaryWriter
        self._writer: Any = None
        self._failed = False

    def write(self, record: dict[str, Any]) -> None:
        if self._failed:
            return
        step = int(record["round"])
        try:
            if self._writer is None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self._writer = self._summary_writer(str(self.log_dir),
                                                    purge_step=step if step > 1 else None)
            for tag, value in scalars(record):
                self._writer.add_scalar(tag, value, global_step=step)
            self._writer.flush()
        except OSError as exc:  # metrics.jsonl is the record: a full disk here stops only this
            self._failed = True
            log.error("TensorBoard logging to %s stopped at round %d: %s", self.log_dir, step,
                      exc)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_tensorboard_dir: Path | None = None


def use_tensorboard(log_dir: str | Path | None) -> None:
    """Log this process's runs to TensorBoard in ``log_dir`` (None: not). Set by the
    command line's ``--tensorboard`` (or env RABO_TENSORBOARD) as it is parsed, so the flag
    reaches the run's metrics writer wherever the transport builds it."""
    global _tensorboard_dir
    _tensorboard_dir = Path(log_dir) if log_dir else None


def tensorboard_dir() -> Path | None:
    return _tensorboard_dir


def configured_sink() -> RecordSink | None:
    """A new sink for the tracker this process was told to use (None: none). Raises
    :class:`TrackingUnavailable` when its package is missing."""
    if _tensorboard_dir is None:
        return None
    return TensorBoardSink(_tensorboard_dir)
