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
    import mmap

    import psutil

    from rabo.config import to_dict
    from worker.client import Worker, WorkerOptions

    w = Worker(WorkerOptions(target="127.0.0.1:1", device="cpu"))
    job_json = json.dumps(to_dict(config.load(None, ["data.dataset=digits",
                                                     "model.hidden=[8]"])))
    w._job(job_json)
    base = w.baseline_rss
    # 64 MiB of state, touched: fresh anonymous pages (a tensor could reuse heap pages this
    # test process freed earlier, which would not raise its resident set)
    ballast = mmap.mmap(-1, 64 << 20)
    for off in range(0, 64 << 20, 4096):
        ballast[off] = 1
    assert psutil.Process().memory_info().rss - base >= 60 << 20
    w._job(job_json)  # registering again for the same job
    assert w.baseline_rss == base
    # CPU: the RSS peak it reports is above start-up
    assert peak_above_startup(base + (5 << 20), w.baseline_rss, w.device) == 5 << 20
    ballast.close()


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


# what gRPC says (its status details, captured from real failures) and what the worker makes
# of it: the cause and the likely fix, with the target
@pytest.mark.parametrize("details, tls, expect", [
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to "
     "connect to remote host: Connection refused", False,
     "connection refused at HOST:1: is the coordinator started"),
    ("errors resolving nosuch.invalid:5000: [field:hostname lookup error:address lookup failed "
     "for nosuch.invalid:5000: Domain name not found]", False,
     "cannot resolve the coordinator's host in HOST:1 (DNS)"),
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:52909: Tls "
     "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: WRONG_VERSION_NUMBER", True,
     "TLS handshake with HOST:1 failed: is the coordinator started with --tls-cert"),
    ("Socket closed", False, "HOST:1 closed the connection: if it runs with TLS, give --tls-ca"),
    ("something new", False, "coordinator at HOST:1 unreachable (UNAVAILABLE: something new)"),
])
def test_connection_failures_are_explained(details: str, tls: bool, expect: str) -> None:
    from worker.client import explain_unreachable

    assert explain_unreachable("UNAVAILABLE", details, "HOST:1", tls).startswith(expect)


def test_a_worker_says_once_why_it_cannot_connect() -> None:
    port = free_port()  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "worker", "--coordinator", f"127.0.0.1:{port}",
                           "--give-up-s", "4"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, GRPC_VERBOSITY="NONE"))
    assert proc.returncode != 0
    said = [ln for ln in proc.stderr.splitlines() if "connection refused" in ln]
    assert len(said) == 1, proc.stderr  # the first failure, then quiet until a minute passes
    assert f"connection refused at 127.0.0.1:{port}: is the coordinator started" in said[0]
    assert "WARNING" in said[0]
    assert f"no coordinator at 127.0.0.1:{port} for" in proc.stderr  # and why it gave up


@pytest.mark.slow
def test_a_worker_late_for_the_last_round_still_hears_the_run_is_over() -> None:
    """Two workers, one round that closes (cluster.min_workers 1, a 1 s deadline) before the
    slow one's update arrives: the slow worker's update is refused after the run has ended.
    The coordinator stays up past its 1 s linger until that worker has been told the run is
    complete, so both exit 0 (a Kubernetes Job's pod would otherwise fail its index)."""
    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[16]", "clients.count=2",
                             "cluster.workers=2", "rounds=1", "cluster.min_workers=1",
                             "cluster.round_deadline_s=1", "cluster.stall_timeout_s=1",
                             "cluster.heartbeat_s=1", "cluster.heartbeat_misses=10",
                             "cluster.register_timeout_s=60"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=1.0)
    procs = [subprocess.Popen([sys.executable, "-m", "worker", "--coordinator",
                               f"127.0.0.1:{server.port}", "--threads", "1", "--poll-s", "1",
                               "--client-id", str(cid), "--give-up-s", "60",
                               *(["--step-delay-s", "4"] if cid == 1 else [])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=ENV) for cid in (0, 1)]
    try:
        server.thread.join(timeout=120)  # the rounds, then the linger
        assert not server.thread.is_alive()
        records = server.driver.records
        assert [c["client_id"] for c in records[-1]["clients"]] == [0], records[-1]
        server.stop(0)  # what `rabo coordinator` does once the thread is done
        outs = [p.communicate(timeout=60)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert "update not taken" in outs[1] and "run finished: all 1 rounds done" in outs[1], \
            outs[1]
        assert len(server.coord.told_finished) == 2  # both heard it from a fetch
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.stop(0)
