"""Checkpoints on disk: what counts as something to resume from, the fallback past a corrupt
one, and the metrics of a run restarted in a folder that holds an older attempt's lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.local import run_local
from rabo import checkpoint, config
from rabo.job import Job

CFG = ["data.dataset=digits", "model.hidden=[16]", "clients.count=2", "rounds=2",
       "inner.steps=1", "outer.optimizer=sgd"]


def _state(round_: int):
    state = Job.from_config(config.load(None, CFG)).engine.init_state()
    state.round = round_
    return state


def test_has_checkpoint_and_fallback_past_a_truncated_one(tmp_path: Path) -> None:
    assert not checkpoint.has_checkpoint(tmp_path / "missing")
    assert not checkpoint.has_checkpoint(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # other files are not checkpoints
    assert not checkpoint.has_checkpoint(tmp_path)
    checkpoint.save_rotating(tmp_path, _state(1))
    assert checkpoint.has_checkpoint(tmp_path)
    newest = checkpoint.save_rotating(tmp_path, _state(2))
    newest.write_bytes(newest.read_bytes()[:50])
    state, _, path, skipped = checkpoint.load_latest(tmp_path)
    assert state.round == 1 and path.name == "ckpt-000001.pt"
    assert [p.name for p, _ in skipped] == [newest.name] and "SHA-256" in skipped[0][1]


@pytest.mark.slow
def test_fresh_start_in_a_used_folder_replaces_the_old_metrics(tmp_path: Path) -> None:
    """A coordinator that finds no checkpoint (e.g. a pod restarted before its first one)
    starts at round 1; the lines an earlier attempt wrote must not stay beside the new ones."""
    out = tmp_path / "run"
    out.mkdir()
    stale = [{"round": 1, "test_acc": -1.0}, {"round": 2, "test_acc": -1.0},
             {"round": 3, "test_acc": -1.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    run_local(config.load(None, CFG), 2, out, threads=1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["test_acc"] >= 0 for r in rows)


def test_a_fresh_run_refuses_a_folder_that_holds_another_run(tmp_path: Path) -> None:
    """Starting from round 0 in a used folder would mix metrics and let checkpoint rotation
    keep the old run's higher-numbered files (a later --resume would continue the old run)."""
    assert checkpoint.claim_run_dir(tmp_path / "new") == tmp_path / "new"
    old = tmp_path / "old"
    old.mkdir()
    assert checkpoint.claim_run_dir(old) == old  # an empty folder is fine
    (old / "metrics.jsonl").write_text('{"round": 1}\n')
    (old / "notes.txt").write_text("mine")
    checkpoint.save_rotating(old, _state(20))
    with pytest.raises(checkpoint.CheckpointError, match="holds a run .*--resume .*--overwrite"):
        checkpoint.claim_run_dir(old)
    assert (old / "metrics.jsonl").exists() and checkpoint.has_checkpoint(old)  # untouched
    checkpoint.claim_run_dir(old, overwrite=True)
    assert not checkpoint.has_checkpoint(old) and not (old / "metrics.jsonl").exists()
    assert not list(old.glob("ckpt-*")) and (old / "notes.txt").read_text() == "mine"


def test_simulate_cli_refuses_a_used_out_folder(tmp_path: Path) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "rabo.cli", "simulate", *sum((["--set", s] for s in CFG), []),
           "--out", str(tmp_path / "run")]
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "holds a run" in again.stderr
    assert "Traceback" not in again.stderr
    assert subprocess.run([*cmd, "--overwrite"], capture_output=True, timeout=120
                          ).returncode == 0


def test_metrics_reader_survives_a_cut_last_line_and_names_a_bad_one(tmp_path: Path) -> None:
    from rabo.errors import RaboError
    from rabo.metrics import read_metrics, truncate_metrics, wire_total

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1, "wire_bytes": 10}\n{"round": 2, "wire_bytes": 5}\n{"round": 3')
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2]  # a crash mid-write
    assert wire_total(read_metrics(tmp_path)) == 15
    path.write_text('{"round": 1}\nnot json\n{"round": 3}\n')
    with pytest.raises(RaboError, match="metrics.jsonl: line 2 is not a metrics record"):
        read_metrics(tmp_path)
    assert [r["round"] for r in truncate_metrics(tmp_path, 5)] == [1]  # resume: keep the good
    assert wire_total([{"wire_bytes": 3}, {"wire_bytes": None}]) is None
