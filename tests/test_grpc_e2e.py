"""The real cluster: a coordinator and worker OS processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rabo import checkpoint

ROOT = Path(__file__).resolve().parents[1]
RABO = [sys.executable, "-m", "rabo.cli"]
ENV = dict(os.environ, GRPC_VERBOSITY="ERROR")


def _group_gone(pgid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_local_cluster_with_memory_budgets(tmp_path: Path) -> None:
    """Three workers with different budgets get different ratios; every round completes; the
    metrics carry the communication fields; nothing is left running."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*RABO, "local", "--config", str(ROOT / "configs" / "default.yaml"), "--workers", "3",
         "--worker-memory-limits", "64MiB,32MiB,24MiB", "--rounds", "3", "--set",
         "clients.count=3", "--set", "data.dataset=digits",
         "--set", "cluster.heartbeat_misses=30", "--out", str(out)],  # no expiry under load
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
        start_new_session=True)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert "round   3/3" in stdout and "client 0: ratio 1 " in stdout
    assert _group_gone(proc.pid), "worker processes were left behind"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    for rec in records:
        ratios = {c["client_id"]: c["ratio"] for c in rec["clients"]}
        assert ratios == {0: 1.0, 1: 0.5, 2: 0.25}
        for c in rec["clients"]:
            for key in ("worker_id", "ratio", "payload_down_bytes", "payload_up_bytes",
                        "wire_down_bytes", "wire_up_bytes", "compute_s", "message_down_bytes"):
                assert c[key] is not None, key
            assert c["payload_down_bytes"] <= c["message_down_bytes"] <= c["wire_down_bytes"]
            assert c["wire_up_bytes"] <= 1.03 * c["payload_up_bytes"] + 4096
            assert c["compute_s"] > 0
        for key in ("transfer_s", "compute_s", "aggregation_s"):
            assert rec[key] >= 0
        down = {c["ratio"]: c["payload_down_bytes"] for c in rec["clients"]}
        # the first layer shrinks as r, the hidden-to-hidden one as r^2
        assert down[0.5] < 0.3 * down[1.0] and down[0.25] < 0.1 * down[1.0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["transport"] == "grpc" and summary["rounds"] == 3
    state, meta = checkpoint.load(out / "checkpoint.pt")
    assert state.round == 3 and meta["round"] == 3
    assert (out / "accuracy.png").stat().st_size > 1000


@pytest.mark.slow
def test_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    # A shell without job control starts background commands with SIGINT ignored, and a Python
    # started that way never raises KeyboardInterrupt (as intended by POSIX); put back the
    # default disposition, as a terminal's Ctrl-C would find it, before exec'ing rabo.
    with_ctrl_c = [sys.executable, "-c", "import os, signal, sys; "
                   "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]
    proc = subprocess.Popen(
        [*with_ctrl_c, *RABO[1:], "local", "--config", str(ROOT / "configs" / "default.yaml"),
         "--workers", "2", "--rounds", "500", "--set", "clients.count=2",
         "--set", "data.dataset=digits", "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
        start_new_session=True)
    deadline = time.monotonic() + 120
    metrics = tmp_path / "run" / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.3)
    assert metrics.exists(), "no round finished"
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # every thread's stack (rabo.runtime.enable_stack_dumps)
        time.sleep(2)
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail("rabo local did not exit within 90 s of Ctrl-C; its output ends:\n"
                    + out[-12000:])
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    assert _group_gone(proc.pid), "worker processes were left behind after Ctrl-C"


@pytest.mark.slow
def test_killed_launcher_takes_its_workers_along(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*RABO, "local", "--config", str(ROOT / "configs" / "default.yaml"), "--workers", "2",
         "--rounds", "500", "--set", "clients.count=2", "--set", "data.dataset=digits",
         "--out", str(tmp_path / "run")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.3)
    assert metrics.exists(), "no round finished"
    proc.kill()  # SIGKILL: no cleanup code runs in the launcher
    proc.wait()
    assert _group_gone(proc.pid, timeout=20), "workers outlived a SIGKILLed launcher"


@pytest.mark.slow
def test_model_above_64_mib_with_small_message_limit(tmp_path: Path) -> None:
    """A 71 MB model crosses a coordinator whose gRPC message limit is 1 MiB."""
    out = tmp_path / "big"
    proc = subprocess.run(
        [*RABO, "local", "--workers", "1", "--rounds", "1", "--out", str(out),
         "--set", "data.dataset=digits", "--set", "model.hidden=[4200, 4200]",
         "--set", "clients.count=1", "--set", "clients.ratios=[1]",
         "--set", "cluster.chunk_bytes=262144", "--set", "cluster.max_message_bytes=1048576",
         "--set", "inner.steps=1", "--set", "outer.optimizer=sgd", "--set", "data.batch_size=16"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    (c,) = rec["clients"]
    assert c["payload_down_bytes"] > 64 * 2**20 and c["payload_up_bytes"] > 64 * 2**20


@pytest.mark.slow
def test_64_worker_processes_complete_rounds() -> None:
    """64 worker processes (the protocol's echo client: real processes and sockets, no
    compute) register and complete two rounds against one coordinator."""
    from bench.transport import run_transport

    result = run_transport(params=2e5, workers=64, rounds=2, ratios=[1.0, 0.5],
                           chunk_bytes=1 << 20)
    assert result["workers"] == 64 and result["rounds"] == 2
    assert result["wire_bytes"] is not None and result["wire_vs_payload"] < 1.1
