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
