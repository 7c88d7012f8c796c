"""A machine that changes during a run: a real worker in a memory cgroup this test creates,
whose limit is lowered and raised again while rounds go on. Its heartbeats carry the fresh
budget and the next rounds' ratio follows, without a lost round (issue: resources beyond
memory, section 3)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.local import WorkerProcess, stop_workers
from coordinator.server import serve
from rabo import config

GIB = 1 << 30


def _child_memory_cgroup() -> Path:
    """A new cgroup v1 memory group below this process's own; skips where none can be made."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        pytest.skip("no /proc/self/cgroup")
    paths = [line.split(":", 2)[2] for line in lines if line.split(":", 2)[1] == "memory"]
    base = Path("/sys/fs/cgroup/memory")
    if not paths or not (base / paths[0].lstrip("/")).is_dir():
        pytest.skip("no cgroup v1 memory controller to nest a group in")
    child = base / paths[0].lstrip("/") / f"rabo-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        child.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup here: {exc}")
    return child


def _remove_cgroup(cg: Path, timeout_s: float = 10.0) -> None:
    """Remove a group this test made, once its processes' exit has been accounted."""
    end = time.monotonic() + timeout_s
    while cg.exists() and time.monotonic() < end:
        try:
            cg.rmdir()
        except OSError:  # the worker's exit is still being accounted
            time.sleep(0.1)


def _usage(cg: Path) -> int:
    return int((cg / "memory.usage_in_bytes").read_text())


def _set_limit(cg: Path, limit: int) -> None:
    (cg / "memory.limit_in_bytes").write_text(str(limit))


def _wait(cond, what: str, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def test_a_worker_whose_memory_limit_drops_gets_a_smaller_ratio_and_later_a_larger_one(
        tmp_path: Path) -> None:
    cg = _child_memory_cgroup()
    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[2048, 2048]",
                             "clients.count=1", "data.batch_size=32", "inner.steps=1",
                             "rounds=200", "policy.ladder=[1, 0.5, 0.25, 0.125]",
                             "policy.safety=0.5", "policy.calibrate=true",
                             "cluster.heartbeat_s=0.2", "cluster.round_deadline_s=120"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0)
    log = tmp_path / "worker.log"
    worker = None
    try:
        _set_limit(cg, 4 * GIB)
        # the shell joins the group, then becomes the worker: every byte it uses is charged
        cmd = (f"echo $$ > {cg / 'cgroup.procs'} && exec {sys.executable} -m worker "
               f"--coordinator 127.0.0.1:{server.port} --threads 1 --poll-s 1 "
               f"--give-up-s 120 --step-delay-s 0.3")
        worker = WorkerProcess(0, None, subprocess.Popen(
            ["sh", "-c", cmd], stdout=log.open("wb"), stderr=subprocess.STDOUT,
            env=dict(os.environ, GRPC_VERBOSITY="ERROR")), log)
        records = server.driver.records

        def profile():
            live = server.coord.registry.live()
            return live[0].profile if live else None

        def ratio_one_measured() -> bool:
            return any(r["clients"][0]["ratio"] == 1.0 and r["clients"][0]["peak_mem_bytes"]
                       for r in records)

        _wait(ratio_one_measured, f"no round at ratio 1: {worker.tail()}")
        peak1 = max(r["clients"][0]["peak_mem_bytes"] for r in records
                    if r["clients"][0]["ratio"] == 1.0)
        p = profile()
        assert p is not None and "cgroup v1" in p.budget_source, p
        # what it holds above start-up counts back into its budget (budget = limit - usage
        # + held): lower the limit so that its budget is 1.8x its measured peak at ratio 1,
        # which ratio 1 no longer fits (policy.safety 0.5), while a ratio-1 step still in
        # flight has room to spare
        held = max(0, p.memory_budget_bytes - (p.memory_limit_bytes - _usage(cg)))
        lowered = _usage(cg) + int(1.8 * peak1) - held
        _set_limit(cg, lowered)
        _wait(lambda: (q := profile()) is not None and q.memory_limit_bytes < 4 * GIB,
              "no heartbeat brought the lowered limit")
        lowered_at = server.coord.ticket.round
        _wait(lambda: len(records) >= lowered_at + 2,
              f"rounds stopped: {worker.tail()} (peak {peak1}, held {held}, limit {lowered}, "
              f"usage {_usage(cg)})")
        after = [r["clients"][0]["ratio"] for r in records[lowered_at:lowered_at + 2]]
        assert min(after) < 1.0, (after, peak1, held, lowered, profile())
        # the pressure ends: the limit is raised, and a larger ratio follows
        _set_limit(cg, 4 * GIB)
        _wait(lambda: (q := profile()) is not None and q.memory_limit_bytes >= 4 * GIB,
              "no heartbeat brought the raised limit")
        raised_at = server.coord.ticket.round
        _wait(lambda: len(records) >= raised_at + 2, f"rounds stopped: {worker.tail()}")
        again = [r["clients"][0]["ratio"] for r in records[raised_at:raised_at + 2]]
        assert max(again) == 1.0, again
        # no round was lost on the way: every one aggregated the worker's update
        assert [r["round"] for r in records] == list(range(1, len(records) + 1))
        assert all(r["clients"][0]["arrived"] for r in records), \
            [r["clients"] for r in records if not r["clients"][0]["arrived"]]
        assert worker.proc.poll() is None, worker.tail()
    finally:
        server.stop(grace=0)
        if worker is not None:
            stop_workers([worker])
        _remove_cgroup(cg)
