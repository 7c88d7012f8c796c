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
    out = tmp_path / "run"
    rounds = 400
    first = _simulate(out, rounds)
    try:
        metrics = out / "metrics.jsonl"
        end = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < end:
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        for extra in ((), ("--overwrite",)):  # not even --overwrite may take it over
            second = _simulate(out, 2, *extra)
            _, err = second.communicate(timeout=120)
            assert second.returncode != 0
            assert f"is in use by another run (pid {first.pid})" in err, err
            assert "Traceback" not in err
        assert first.wait(timeout=300) == 0, first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert json.loads((out / "summary.json").read_text())["rounds"] == rounds
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    # the folder is free again once its run has ended
    again = _simulate(out, 2, "--overwrite")
    assert again.wait(timeout=120) == 0


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
