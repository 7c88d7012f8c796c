"""A second coordinator on a busy port is refused with one line naming the flag (gRPC's
default SO_REUSEPORT would otherwise let both listen and split the workers)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import free_port

from coordinator.server import serve
from coordinator.state import CoordinatorError
from rabo import config

CFG = ["data.dataset=digits", "model.hidden=[8]", "clients.count=1", "rounds=1",
       "cluster.register_timeout_s=60"]




@pytest.fixture()
def first():
    srv = serve(config.load(None, CFG), None, bind="127.0.0.1:0", linger_s=0.0,
                health_port=free_port(), metrics_port=free_port())
    yield srv
    srv.stop(grace=0)


def test_busy_main_health_and_metrics_ports_are_refused(first) -> None:
    cfg = config.load(None, CFG)
    with pytest.raises(CoordinatorError, match=r"--bind 127.0.0.1:\d+: cannot listen"):
        serve(cfg, None, bind=f"127.0.0.1:{first.port}", linger_s=0.0)
    with pytest.raises(CoordinatorError, match=r"--health-port \d+: cannot listen"):
        serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0, health_port=first.health_port)
    busy_metrics = first.coord.monitor
    assert busy_metrics is not None
    port = busy_metrics._http[0].server_port
    with pytest.raises(CoordinatorError, match=rf"--metrics-port {port}: cannot listen"):
        serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0, metrics_port=port)
    # the refused ones left nothing listening: the ports they tried are free again after
    # the first coordinator stops, and a third one starts on a fresh port
    other = serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0)
    assert other.port != first.port
    other.stop(grace=0)


def test_the_cli_says_one_line_naming_the_flag(first, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rabo.cli", "coordinator",
                           "--bind", f"127.0.0.1:{first.port}", "--set", "data.dataset=digits",
                           "--set", "clients.count=1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, GRPC_VERBOSITY="NONE"))
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert any(f"--bind 127.0.0.1:{first.port}: cannot listen" in ln for ln in err), err
    assert "Traceback" not in proc.stderr
