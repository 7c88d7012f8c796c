"""A worker process leaves cleanly on SIGTERM; the coordinator exposes Prometheus metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import free_port

from coordinator.server import serve
from rabo import config
from rabo.runtime import peak_above_startup

ENV = dict(os.environ, GRPC_VERBOSITY="ERROR")




@pytest.mark.slow
def test_sigterm_worker_says_goodbye_and_exits_zero() -> None:
    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[16]", "clients.count=2",
                             "cluster.workers=2", "rounds=1", "cluster.heartbeat_s=30",
                             "cluster.register_timeout_s=60"])
    mport = free_port()
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0, metrics_port=mport)
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--coordinator",
                             f"127.0.0.1:{server.port}", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        end = time.monotonic() + 60
        while len(server.coord.registry) < 1 and time.monotonic() < end:
            time.sleep(0.1)
        assert len(server.coord.registry) == 1
        time.sleep(1.0)  # it is now long-polling for a round that never opens (needs 2)
        proc.send_signal(signal.SIGUSR1)  # prints its threads' stacks and carries on
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "signal 15" in out
        assert "most recent call first" in out and "worker/client.py" in out
        # Leave removed it: no waiting for heartbeats to expire (30 s x 5 here)
        end = time.monotonic() + 20
        while len(server.coord.registry) and time.monotonic() < end:
            time.sleep(0.05)
        assert len(server.coord.registry) == 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        assert b"rabo_registrations_total 1.0" in text
        assert b"rabo_round " in text
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop(0)


def test_start_up_baseline_is_measured_once_per_job() -> None:
    """Memory budgets count the worker's training state back in (``held``); a re-registration
    (a restarted coordinator, same job) must not re-measure the start-up footprint with the
    earlier rounds' state inside it, or the worker would look poorer after every restart."""
    import json

    import psutil
    import torch

    from rabo.config import to_dict
    from worker.client import Worker, WorkerOptions

    w = Worker(WorkerOptions(target="127.0.0.1:1", device="cpu"))
    job_json = json.dumps(to_dict(config.load(None, ["data.dataset=digits",
                                                     "model.hidden=[8]"])))
    w._job(job_json)
    base = w.baseline_rss
    ballast = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB of state, touched
    w._job(job_json)  # registering again for the same job
    assert w.baseline_rss == base
    assert psutil.Process().memory_info().rss - w.baseline_rss >= 60 << 20
    # CPU: the RSS peak it reports is above start-up
    assert peak_above_startup(base + (5 << 20), w.baseline_rss, w.device) == 5 << 20
    del ballast


def test_a_recovered_outage_restarts_the_give_up_clock() -> None:
    """``--give-up-s`` counts one outage, not the time since the first error of the run: a
    worker that was back in touch in between does not give up on the next short outage."""
    import grpc

    from worker import client as wc
    from worker.backoff import Backoff

    clock = [0.0]
    w = wc.Worker(wc.WorkerOptions(target="127.0.0.1:1", device="cpu", give_up_s=60),
                  sleep=lambda _s: None, clock=lambda: clock[0])

    class Down(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "connection refused"

        def trailing_metadata(self) -> tuple:
            return ()

    def at(t: float, contact: bool = False, stop: bool = False):
        def step(_stub) -> bool:
            clock[0] = t
            if contact:
                w._contact = t  # answers came before this error
            if stop:
                w.stop.set()
                return False
            raise Down()
        return step

    # an outage at t=1000, back in touch until 1100, a new outage from 1100 to 1130
    script = iter([at(1000), at(1100, contact=True), at(1130), at(1131, stop=True)])
    w._session = lambda stub: next(script)(stub)  # type: ignore[method-assign]
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        assert w._run_on(channel, Backoff(), None) == 0

    # without contact in between, the same timeline is one 130 s outage: give up
    w2 = wc.Worker(wc.WorkerOptions(target="127.0.0.1:1", device="cpu", give_up_s=60),
                   sleep=lambda _s: None, clock=lambda: clock[0])
    w = w2
    script = iter([at(1000), at(1100), at(1130)])
    w2._session = lambda stub: next(script)(stub)  # type: ignore[method-assign]
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        assert w2._run_on(channel, Backoff(), None) == 4
