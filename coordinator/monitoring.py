"""Prometheus metrics of the coordinator (``cluster.metrics_port`` / ``--metrics-port``).

prometheus-client is an optional dependency (``pip install 'rabo[metrics]'``): it is imported
only when a :class:`Monitor` is made, which the coordinator does only for a metrics port, so
a coordinator without one (and every worker) runs without the package.
"""

from __future__ import annotations

from typing import Any

from rabo.errors import RaboError
from rabo.extras import package_missing

INSTALL_HINT = "pip install 'rabo[metrics]'"


class MetricsUnavailable(RaboError):
    """A metrics port was asked for where prometheus-client is not installed."""


def prometheus_missing() -> str | None:
    """Why the metrics endpoint cannot be served here (None: prometheus-client is installed).
    Cheap: it looks the package up without importing it."""
    return package_missing("prometheus_client",
                           f"the prometheus-client package is not installed ({INSTALL_HINT})")


class Monitor:
    """The coordinator's Prometheus metrics. Raises :class:`MetricsUnavailable` without
    prometheus-client."""

    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as exc:
            raise MetricsUnavailable(prometheus_missing() or f"the prometheus-client package "
                                     f"does not import ({exc}); {INSTALL_HINT}") from None
        r = self.registry = CollectorRegistry()
        self.round = Gauge("rabo_round", "Last completed round", registry=r)
        self.workers = Gauge("rabo_workers_live", "Registered, non-expired workers", registry=r)
        self.test_acc = Gauge("rabo_test_accuracy", "Test accuracy after the last round",
                              registry=r)
        self.upper_loss = Gauge("rabo_upper_loss",
                                "Upper-level loss of the global model (validation)", registry=r)
        self.coverage_x = Gauge("rabo_coverage_x_min", "Minimum coverage of x, last round",
                                registry=r)
        self.payload = Counter("rabo_payload_bytes", "Tensor payload bytes", ["direction"],
                               registry=r)
        self.wire = Counter("rabo_wire_bytes", "Bytes on the workers' TCP connections",
                            ["direction"], registry=r)
        self.rejected = Counter("rabo_rejected_messages", "Refused calls and updates",
                                ["kind"], registry=r)
        self.registrations = Counter("rabo_registrations", "Accepted registrations",
                                     registry=r)
        self.left_out = Counter("rabo_left_out_workers",
                                "Assigned workers whose update missed the round", registry=r)
        self.round_seconds = Histogram("rabo_round_seconds", "Round wall time (open to "
                                       "aggregated)", registry=r,
                                       buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Listen on ``port``; OSError when it is taken."""
        from prometheus_client import start_http_server

        self._http: Any = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http[0].shutdown()
            http[0].server_close()
            self._http = None

    def observe_round(self, rec: dict[str, Any], live: int) -> None:
        self.round.set(rec["round"])
        self.workers.set(live)
        if rec.get("test_acc") is not None:
            self.test_acc.set(rec["test_acc"])
        if rec.get("upper_loss") is not None:
            self.upper_loss.set(rec["upper_loss"])
        self.coverage_x.set(rec["coverage_x_min"])
        self.round_seconds.observe(rec["round_s"])
        self.left_out.inc(len(rec.get("left_out", [])))
        for c in rec["clients"]:
            self.payload.labels("down").inc(c["payload_down_bytes"])
            self.payload.labels("up").inc(c["payload_up_bytes"])
            if c.get("wire_down_bytes") is not None:
                self.wire.labels("down").inc(c["wire_down_bytes"])
                self.wire.labels("up").inc(c["wire_up_bytes"])
