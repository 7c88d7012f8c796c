"""``rabo local``: a coordinator and N worker OS processes on 127.0.0.1.

The coordinator runs in this process; each worker is ``python -m worker`` with its own memory
budget, CPU threads and log file under ``OUT/logs/``. Workers die with this process (they ask
Linux for a parent-death signal, see ``rabo.runtime.die_with_parent``), and on any exit, Ctrl-C
included, every worker is terminated, waited for, and killed if it lingers: no process is left
behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Any

from coordinator.server import Server, serve
from rabo.config import Config
from rabo.runtime import PARENT_ENV

log = logging.getLogger("rabo.local")


@dataclass
class WorkerProcess:
    index: int
    memory_limit: str | None
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A launched worker's environment: it dies with this process (PARENT_ENV) and gRPC's C
    core logs only errors."""
    env = dict(env if env is not None else os.environ)
    env[PARENT_ENV] = str(os.getpid())
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    return env


def _start(index: int, cmd: list[str], log_path: Path, env: dict[str, str],
           memory_limit: str | None = None) -> WorkerProcess:
    """One worker OS process with stdout and stderr in ``log_path``."""
    with log_path.open("wb") as f:  # the child holds its own copy; close ours
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return WorkerProcess(index, memory_limit, proc, log_path)


def spawn_workers(target: str, count: int, out_dir: Path, memory_limits: Sequence[str] | None,
                  threads: int, extra_args: Sequence[str] = (), env: dict[str, str] | None = None
                  ) -> list[WorkerProcess]:
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = _child_env(env)
    limits: list[str | None] = (list(islice(cycle(memory_limits), count)) if memory_limits
                                else [None] * count)
    procs = []
    for i in range(count):
        cmd = [sys.executable, "-m", "worker", "--coordinator", target, "--name", f"worker-{i}",
               "--client-id", str(i), "--threads", str(threads), "--give-up-s", "60",
               *extra_args]
        if limits[i]:
            cmd += ["--memory-limit", str(limits[i])]
        procs.append(_start(i, cmd, logs / f"worker-{i}.log", env, limits[i]))
    return procs


def stop_workers(procs: Sequence[WorkerProcess], grace_s: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL whatever is left; reap everything."""
    for w in procs:
        if w.proc.poll() is None:
            w.proc.terminate()
    deadline = time.monotonic() + grace_s
    for w in procs:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            w.proc.wait(remaining)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


def run_local(cfg: Config, workers: int, out_dir: Path,
              memory_limits: Sequence[str] | None = None,
              progress: Callable[[dict[str, Any]], None] | None = None,
              threads: int = 0, worker_args: Sequence[str] = ()) -> Server:
    """Run a whole job; returns the finished server (its driver holds records and summary)."""
    threads = threads or max(1, (os.cpu_count() or 1) // max(workers, 1))
    server = serve(cfg, out_dir, bind="127.0.0.1:0", progress=progress, linger_s=2.0)
    procs = spawn_workers(f"127.0.0.1:{server.port}", workers, out_dir, memory_limits, threads,
                          worker_args)
    failed: set[int] = set()
    try:
        while not server.wait(0.5):
            for w in procs:
                code = w.proc.poll()
                if code not in (None, 0) and w.index not in failed:
                    failed.add(w.index)
                    log.error("worker-%d exited with status %s; its log ends:\n%s", w.index,
                              code, w.tail())
            started = server.coord.ticket is not None
            alive = sum(1 for w in procs if w.proc.poll() is None)
            if failed and (not started or alive < cfg.cluster.min_workers):
                why = ("a worker failed before the first round" if not started
                       else f"only {alive} worker processes left (cluster.min_workers = "
                            f"{cfg.cluster.min_workers})")
                server.driver.finish(why)
                raise RuntimeError(f"{why}; see {out_dir / 'logs'} for the workers' logs")
    finally:
        server.stop(grace=1.0)
        stop_workers(procs)
    if server.driver.error is not None:
        raise server.driver.error
    return server


def run_echo_workers(server: Server, count: int, logs: Path | None = None) -> None:
    """Drive ``server``'s job to its end with ``count`` echo worker processes
    (``python -m worker.echo``: the real protocol, no compute), for load and transport benches;
    stops the server and every worker however it ends, then raises the driver's error if any.
    The workers' logs go to ``logs``, or to a temporary folder that is removed when the job
    succeeds (and named in the error when it does not)."""
    temporary = logs is None
    logs = Path(tempfile.mkdtemp(prefix="rabo-echo-")) if logs is None else logs
    logs.mkdir(parents=True, exist_ok=True)
    env = _child_env()
    limit = server.coord.cfg.cluster.max_message_bytes
    procs = [_start(i, [sys.executable, "-m", "worker.echo", "--coordinator",
                        f"127.0.0.1:{server.port}", "--client-id", str(i),
                        "--max-message-bytes", str(limit)], logs / f"echo-{i}.log", env)
             for i in range(count)]
    try:
        while not server.wait(0.5):
            if all(w.proc.poll() not in (None, 0) for w in procs):
                raise RuntimeError(f"every echo worker failed; logs in {logs}")
    finally:
        server.stop(grace=1.0)
        stop_workers(procs)
    if server.driver.error is not None:
        log.error("the echo workers' logs are kept in %s", logs)
        raise server.driver.error
    if temporary:
        shutil.rmtree(logs, ignore_errors=True)
