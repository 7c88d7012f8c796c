"""One run folder, one run: a second run into a folder in use is refused naming the holder,
and the first run's files stay whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rabo.checkpoint import lock_run_dir
from rabo.metrics import temporary_beside

SETS = ["data.dataset=digits", "model.hidden=[16]", "clients.count=2", "data.batch_size=32"]


def _simulate(out: Path, rounds: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rabo.cli", "simulate", "--rounds", str(rounds), "--out",
           str(out), *extra, *sum((["--set", s] for s in SETS), [])]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_stays_whole(
        tmp_path: Path) -> None:
    """The first run is a coordinator waiting for its workers (it holds the folder for as
    long as the test needs, with no timing luck); simulations and another coordinator into
    the same folder are refused, --overwrite or not."""
    out = tmp_path / "run"
    sets = sum((["--set", s] for s in [*SETS, "cluster.register_timeout_s=300"]), [])
    first = subprocess.Popen([sys.executable, "-m", "rabo.cli", "coordinator", "--bind",
                              "127.0.0.1:0", "--out", str(out), *sets],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, GRPC_VERBOSITY="NONE"))
    try:
        lock = out / ".rabo.lock"
        end = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < end:
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        assert lock.read_text().strip() == str(first.pid)
        attempts = [_simulate(out, 2), _simulate(out, 2, "--overwrite"),
                    subprocess.Popen([sys.executable, "-m", "rabo.cli", "coordinator", "--bind",
                                      "127.0.0.1:0", "--out", str(out), "--overwrite", *sets],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        for second in attempts:
            _, err = second.communicate(timeout=120)
            assert second.returncode != 0
            assert f"is in use by another run (pid {first.pid})" in err, err
            assert "Traceback" not in err
        assert first.poll() is None  # untouched by the refused ones
    finally:
        first.kill()
        first.wait()
    # the folder is free once its run has ended, and a run's files are whole
    rounds = 5
    again = _simulate(out, rounds, "--overwrite")
    assert again.wait(timeout=120) == 0, again.communicate()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert json.loads((out / "summary.json").read_text())["rounds"] == rounds
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_the_lock_is_per_process_and_temporary_names_are_unique(tmp_path: Path) -> None:
    lock_run_dir(tmp_path)
    lock_run_dir(tmp_path)  # this process again: fine
    code = ("import sys; from rabo.checkpoint import lock_run_dir\n"
            f"lock_run_dir({str(tmp_path)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and f"pid {os.getpid()}" in proc.stderr
    target = tmp_path / "summary.json"
    assert temporary_beside(target) != temporary_beside(target)
