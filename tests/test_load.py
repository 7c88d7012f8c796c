"""200 lightweight simulated workers against one coordinator on loopback (bounded)."""

from __future__ import annotations

import pytest

from bench.transport import run_load


@pytest.mark.slow
def test_200_workers_register_and_heartbeat_at_once() -> None:
    r = run_load(workers=200, heartbeats=3, timeout_s=90)
    assert r["registered"] == 200 and r["distinct_ids"] == 200  # no registration lost
    assert r["heartbeats"] == 600
    assert 0 < r["heartbeat_p50_ms"] <= r["heartbeat_p99_ms"]
