"""Dropouts, stragglers, restarts: real worker processes against a real coordinator."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import free_port
from grpc_util import connect, first_message

from coordinator.local import WorkerProcess, stop_workers
from coordinator.server import serve
from rabo import checkpoint, config
from rabo.params import max_abs_diff
from rabo_proto.status import RUN_COMPLETE, RUN_STOPPING, run_state
from rabo_proto.v1 import rabo_pb2 as pb

ENV = dict(os.environ, GRPC_VERBOSITY="ERROR")
BASE = ["data.dataset=digits", "model.hidden=[32]", "inner.steps=1", "data.batch_size=32",
        # a worker expires after 3 s of silence: short for the tests, long enough that a busy
        # machine does not expire live workers (1.2 s did)
        "outer.optimizer=sgd", "cluster.heartbeat_s=0.5", "cluster.heartbeat_misses=6",
        "cluster.register_timeout_s=60", "mask.policy=rolling"]


def _worker(server, out: Path, index: int, extra: tuple[str, ...] = (), pinned: bool = True,
            give_up_s: float = 60) -> WorkerProcess:
    """A worker process; ``pinned`` asks for client slot ``index`` (--client-id), else it
    takes the slot the coordinator gives it."""
    cmd = [sys.executable, "-m", "worker", "--coordinator", f"127.0.0.1:{server.port}",
           *(("--client-id", str(index)) if pinned else ()), "--threads", "1", "--poll-s", "1",
           "--give-up-s", f"{give_up_s:g}", *extra]
    path = out / f"worker-{index}-{time.monotonic_ns()}.log"
    return WorkerProcess(index, None, subprocess.Popen(cmd, stdout=path.open("wb"),
                                                       stderr=subprocess.STDOUT, env=ENV), path)


def _registered(w: WorkerProcess, timeout: float = 120) -> None:
    """Until worker ``w`` has registered (its job is built after: give it the time)."""
    end = time.monotonic() + timeout
    while "registered as" not in w.log_path.read_text():
        assert w.proc.poll() is None, w.tail()
        assert time.monotonic() < end, w.tail()
        time.sleep(0.05)


def _wait_rounds(server, n: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while len(server.driver.records) < n and time.monotonic() < end:
        if server.driver.error:
            raise server.driver.error
        time.sleep(0.1)
    assert len(server.driver.records) >= n, f"only {len(server.driver.records)} rounds"


@pytest.mark.slow
def test_killed_worker_is_left_out_expires_and_rejoins(tmp_path: Path) -> None:
    # more rounds than the test needs: it stops the run once the restarted worker is back
    cfg = config.load(None, [*BASE, "clients.count=3", "rounds=400", "cluster.min_workers=1",
                             "cluster.round_deadline_s=20"])
    server = serve(cfg, tmp_path, bind="127.0.0.1:0", linger_s=1.0)
    # rounds paced by the survivors' step delay (not by CPU), so that the run is still going
    # however long the restarted worker takes to start (torch) and rejoin on a busy machine
    procs = [_worker(server, tmp_path, i, ("--step-delay-s", "0.5")) for i in range(2)]
    procs.append(_worker(server, tmp_path, 2, ("--step-delay-s", "0.3")))
    try:
        _wait_rounds(server, 2)
        procs[2].proc.send_signal(signal.SIGKILL)  # mid-run, likely mid-round
        procs[2].proc.wait()
        killed_at = len(server.driver.records)
        end = time.monotonic() + 60
        while server.coord.registry.expired_total < 1:  # the coordinator noticed
            assert time.monotonic() < end, "the killed worker never expired"
            time.sleep(0.05)
        expired_at = len(server.driver.records)
        procs.append(_worker(server, tmp_path, 2, ("--step-delay-s", "0.3")))  # restarts
        end = time.monotonic() + 150
        while not any(any(c["client_id"] == 2 for c in r["clients"])
                      for r in server.driver.records[expired_at:]):
            assert time.monotonic() < end, "the restarted worker did not rejoin"
            assert not server.wait(0), "the run ended before the worker rejoined"
            time.sleep(0.2)
        _wait_rounds(server, len(server.driver.records) + 1)  # and one round after it
    finally:
        server.stop(0)
        stop_workers(procs)
    assert server.driver.error is None
    recs = server.driver.records
    assert [r["round"] for r in recs] == list(range(1, len(recs) + 1))
    with_2 = [r["round"] for r in recs if any(c["client_id"] == 2 for c in r["clients"])]
    without_2 = [r["round"] for r in recs if r["round"] not in with_2]
    assert without_2, "the killed worker never missed a round"
    assert killed_at >= 2 and any(r > expired_at for r in with_2), \
        "the restarted worker was not used again"
    assert any(r > without_2[0] for r in with_2)
    assert server.coord.registry.expired_total >= 1
    # coverage accounts for the missing worker: a round without it counts only those who
    # answered (not "fewer than some other round": under load another worker may miss a
    # round too, which failed this test on a busy 2-core machine)
    thin = next(r for r in recs if r["round"] in without_2)
    assert thin["participants"] == len(thin["clients"]) < 3
    assert all(c["client_id"] != 2 for c in thin["clients"])


@pytest.mark.slow
def test_random_kills_and_restarts_finish_every_round(tmp_path: Path) -> None:
    """Workers killed at random moments while rounds run (each restarted at once): every
    round completes, in order, with whoever is alive."""
    rng = random.Random(7)
    cfg = config.load(None, [*BASE, "clients.count=4", "rounds=16", "cluster.min_workers=1",
                             "cluster.round_deadline_s=15"])
    server = serve(cfg, tmp_path, bind="127.0.0.1:0", linger_s=1.0)
    # rounds paced by the step delay, so that the kills land while the run is going on
    delay = ("--step-delay-s", "0.4")
    procs = {i: _worker(server, tmp_path, i, delay) for i in range(4)}
    spawned = list(procs.values())
    kills: list[int] = []  # the round count when each kill landed
    try:
        _wait_rounds(server, 1)
        for _ in range(3):
            time.sleep(rng.uniform(0.3, 1.2))
            if server.wait(0):
                break
            i = rng.randrange(4)
            procs[i].proc.send_signal(signal.SIGKILL)
            procs[i].proc.wait()
            kills.append(len(server.driver.records))
            procs[i] = _worker(server, tmp_path, i, delay)
            spawned.append(procs[i])
        assert server.wait(240), "the run did not finish"
    finally:
        server.stop(0)
        stop_workers(spawned)
    assert server.driver.error is None, server.driver.error
    assert len(kills) == 3 and all(1 <= k < 16 for k in kills), kills  # all mid-run
    recs = server.driver.records
    assert [r["round"] for r in recs] == list(range(1, 17))
    assert any(r["participants"] < 4 for r in recs)  # a killed worker was missed
    assert (tmp_path / "checkpoint.pt").exists()


@pytest.mark.slow
def test_straggler_is_left_out_and_its_late_update_refused(tmp_path: Path) -> None:
    cfg = config.load(None, [*BASE, "clients.count=3", "rounds=3", "cluster.min_workers=2",
                             "cluster.round_deadline_s=5", "cluster.stall_timeout_s=0.5"])
    server = serve(cfg, tmp_path, bind="127.0.0.1:0", linger_s=1.0)
    # the straggler registers (and builds its job) before round 1 can open, and its step
    # takes longer than a round (5 s deadline + 0.5 s stall) by 1.5 s, so every update of
    # it is late, and the first comes well before the run's end (3 rounds, about 16 s)
    procs = [_worker(server, tmp_path, 2, ("--step-delay-s", "7"))]
    _registered(procs[0])
    procs += [_worker(server, tmp_path, i) for i in range(2)]
    try:
        assert server.wait(180)
        end = time.monotonic() + 60
        while "update not taken" not in procs[0].log_path.read_text():
            assert time.monotonic() < end, procs[0].tail()
            time.sleep(0.1)
        # the straggler dropped its refused update and stayed, ready for the next round (or
        # heard that the run is over and left)
        assert procs[0].proc.poll() in (None, 0), procs[0].tail()
    finally:
        server.stop(0)
        stop_workers(procs)
    assert server.driver.error is None
    recs = server.driver.records
    assert [r["round"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert {c["client_id"] for c in r["clients"]} == {0, 1}
        assert [w["client_id"] for w in r["left_out"]] == [2]
    assert server.driver.summary["workers_left_out"] == 3
    # its updates came after their rounds closed: refused, counted, never aggregated
    refused = server.coord.rejected.get("stale-round", 0) + server.coord.rejected.get("late", 0)
    assert refused >= 1


@pytest.mark.slow
def test_too_few_updates_retry_the_round(tmp_path: Path) -> None:
    # the deadline leaves worker 0 time to build its job (loading data) even on busy cores
    cfg = config.load(None, [*BASE, "clients.count=2", "rounds=2", "cluster.min_workers=2",
                             "cluster.round_deadline_s=8", "cluster.stall_timeout_s=0.3",
                             "cluster.max_round_retries=1"])
    server = serve(cfg, tmp_path, bind="127.0.0.1:0", linger_s=0.5)
    # worker 0 registers (and builds its job) before round 1 can open
    procs = [_worker(server, tmp_path, 0)]
    _registered(procs[0])
    procs.append(_worker(server, tmp_path, 1, ("--step-delay-s", "17")))
    try:
        assert server.wait(120)
        end = time.monotonic() + 40  # the slow worker's first-try update is still to come
        while time.monotonic() < end and "update not taken" not in procs[1].log_path.read_text():
            time.sleep(0.2)
    finally:
        server.stop(0)
        stop_workers(procs)
    assert server.driver.error is not None and "fewer than 2 updates in 2 attempts" in str(
        server.driver.error)
    assert server.driver.retries == 2 and server.driver.records == []
    assert server.coord.state.round == 0  # the model was never changed
    # a retry is open to everyone: the worker that answered the first try answered the second
    # too; the slow one's update, computed for the first try, was not taken, and it stayed
    assert procs[0].log_path.read_text().count("round 1 done") == 2, procs[0].tail()
    assert "update not taken" in procs[1].log_path.read_text(), procs[1].tail()
    assert all(p.proc.returncode == 0 for p in procs), [p.tail() for p in procs]


@pytest.mark.parametrize("complete", [False, True])
def test_only_a_complete_run_sends_the_workers_away(complete: bool) -> None:
    """A coordinator stopped mid-run (SIGTERM, error) answers UNAVAILABLE, so its workers keep
    retrying and find the resumed coordinator; only a complete run says "finished"."""
    # the test's session does not heartbeat: it must not expire between its calls
    cfg = config.load(None, [*BASE, "clients.count=2", "cluster.workers=2", "rounds=3",
                             "cluster.heartbeat_misses=200"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0)
    session = connect(server.port)
    try:
        server.driver.finish("coordinator stopped" if not complete else "all 3 rounds done",
                             complete=complete)
        call = session.stub.FetchAssignment(pb.FetchRequest(
            worker_id=session.worker_id, credential=session.credential, wait_s=1), timeout=10)
        beat = session.stub.Heartbeat(pb.HeartbeatRequest(
            worker_id=session.worker_id, credential=session.credential), timeout=10)
        assert beat.finished is complete
        if complete:
            assert first_message(call).finished.reason == "all 3 rounds done"
        else:
            with pytest.raises(grpc.RpcError) as err:
                next(call)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down (coordinator stopped)" in err.value.details()
            assert run_state(err.value) == RUN_STOPPING  # what the worker acts on
        with pytest.raises(grpc.RpcError) as err:
            connect(server.port)
        assert err.value.code() == (grpc.StatusCode.FAILED_PRECONDITION if complete
                                    else grpc.StatusCode.UNAVAILABLE)
        assert run_state(err.value) == (RUN_COMPLETE if complete else RUN_STOPPING)
    finally:
        session.close()
        server.stop(0)


def test_a_worker_leaves_a_complete_run_and_waits_out_a_stopped_one(tmp_path: Path) -> None:
    """The worker process acts on the run state the coordinator attaches to its refusal: exit 0
    once the run is complete; keep retrying while a coordinator is stopping."""
    cfg = config.load(None, [*BASE, "clients.count=2", "cluster.workers=2", "rounds=3"])
    servers = [serve(cfg, None, bind="127.0.0.1:0", linger_s=0) for _ in range(2)]
    servers[0].driver.finish("all 3 rounds done", complete=True)
    servers[1].driver.finish("coordinator stopped")
    procs = [_worker(s, tmp_path, 0) for s in servers]
    try:
        assert procs[0].proc.wait(60) == 0, procs[0].tail()
        assert "the run is over: all 3 rounds done" in procs[0].log_path.read_text()
        end = time.monotonic() + 60
        while time.monotonic() < end and "shutting down" not in procs[1].log_path.read_text():
            time.sleep(0.2)
        assert procs[1].proc.poll() is None, procs[1].tail()  # still retrying
        assert "retrying in" in procs[1].log_path.read_text()
    finally:
        stop_workers(procs)
        for s in servers:
            s.stop(0)


def _coordinator(out: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rabo.cli", "coordinator", *args],
                            stdout=(out.parent / f"coord-{time.monotonic_ns()}.log").open("wb"),
                            stderr=subprocess.STDOUT, env=ENV)


@pytest.mark.slow
def test_coordinator_restart_resumes_to_the_same_model(tmp_path: Path) -> None:
    """SIGTERM the coordinator mid-run, corrupt its newest checkpoint, resume: the workers
    reconnect by themselves and the final model equals an uninterrupted run's. The workers
    are not pinned to slots (no --client-id), and the one that had slot 1 comes back first:
    the resumed coordinator must give each its own slot back (it keeps them in slots.json),
    not the first free one."""
    # expiry (10 s) and registration wait (180 s) generous: this test is about resuming, and a
    # live worker that expired on a busy machine would register a third time
    sets = [*BASE, "clients.count=2", "rounds=8", "clients.ratios=[1, 0.5]",
            "cluster.checkpoint_every=1", "cluster.keep_checkpoints=3",
            "cluster.heartbeat_misses=20", "cluster.register_timeout_s=180"]
    args = sum((["--set", s] for s in sets), [])
    port = free_port()
    out = tmp_path / "run"
    coord = _coordinator(out, ["--bind", f"127.0.0.1:{port}", "--out", str(out), *args])

    class _S:
        pass

    server = _S()
    server.port = port
    workers = []
    try:
        for i in range(2):  # worker i registers (and gets slot i) before worker i+1 starts
            workers.append(_worker(server, tmp_path, i, ("--step-delay-s", "0.4"), False,
                                   give_up_s=180))
            end = time.monotonic() + 120
            while f"client {i}" not in workers[-1].log_path.read_text() and \
                    time.monotonic() < end:
                assert workers[-1].proc.poll() is None, workers[-1].tail()
                time.sleep(0.05)
            assert f"client {i}" in workers[-1].log_path.read_text(), workers[-1].tail()
        metrics = out / "metrics.jsonl"
        end = time.monotonic() + 120
        while time.monotonic() < end and (not metrics.exists()
                                          or len(metrics.read_text().splitlines()) < 4):
            time.sleep(0.1)
        coord.send_signal(signal.SIGTERM)
        assert coord.wait(30) == 0
        ckpts = sorted(out.glob("ckpt-*.pt"))
        assert len(ckpts) >= 2
        newest = ckpts[-1]
        # the driver recorded its last round before the SIGTERM checkpoint: they agree
        last_line = json.loads(metrics.read_text().splitlines()[-1])["round"]
        assert int(newest.stem.split("-")[1]) == last_line
        newest.write_bytes(newest.read_bytes()[:100])  # truncated on disk
        good_round = int(ckpts[-2].stem.split("-")[1])
        # worker 0 is held while the coordinator restarts, so worker 1 registers first
        workers[0].proc.send_signal(signal.SIGSTOP)
        coord = _coordinator(out, ["--bind", f"127.0.0.1:{port}", "--resume", str(out)])
        end = time.monotonic() + 120
        while workers[1].log_path.read_text().count("registered as") < 2 and \
                time.monotonic() < end:
            time.sleep(0.05)
        workers[0].proc.send_signal(signal.SIGCONT)
        assert coord.wait(180) == 0
        log = "".join(p.read_text() for p in tmp_path.glob("coord-*.log"))
        assert f"skipping {newest.name}" in log and "SHA-256" in log
        assert f"(round {good_round})" in log
        for w in workers:  # the same processes served both coordinators, each its own slot
            assert w.proc.poll() is None or w.proc.returncode == 0
            text = w.log_path.read_text()
            assert text.count("registered as") == 2, w.tail()
            assert text.count(f", client {w.index}\n") == 2, w.tail()
    finally:
        for p in (coord,):
            if p.poll() is None:
                p.kill()
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)
        stop_workers(workers)
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text()
              .splitlines()]
    assert rounds == list(range(1, 9))  # re-run rounds replaced, none counted twice
    resumed, _ = checkpoint.load(out / "checkpoint.pt")
    # the uninterrupted reference, same config and seed
    ref_out = tmp_path / "ref"
    from coordinator.local import run_local

    run_local(config.load(None, sets), 2, ref_out, threads=1)
    reference, _ = checkpoint.load(ref_out / "checkpoint.pt")
    assert resumed.round == reference.round == 8
    for part in ("x", "y", "v"):
        assert max_abs_diff(getattr(resumed, part), getattr(reference, part)) == 0.0


