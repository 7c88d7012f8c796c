"""``--tensorboard DIR``: every run command logs the same scalars as its metrics.jsonl holds,
read back with TensorBoard's own reader; a resumed coordinator continues the same TensorBoard
run at the right steps; without the package the flag is refused with the install hint and
everything else still works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import free_port

from rabo import tracking
from rabo.metrics import MetricsWriter, read_metrics, truncate_metrics

ENV = dict(os.environ, GRPC_VERBOSITY="ERROR")
ENV.pop("RABO_TENSORBOARD", None)
RABO = [sys.executable, "-m", "rabo.cli"]
# tiny: three clients of different widths on the bundled digits
JOB = ["--set", "data.dataset=digits", "--set", "model.hidden=[16]", "--set",
       "clients.count=3", "--set", "clients.ratios=[1, 0.5, 0.25]", "--set", "inner.steps=1"]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def _event_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: (step, value) per tag, after its purge of re-run steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_matches_metrics(log_dir: Path, run_dir: Path) -> list[dict]:
    """The event files hold exactly the scalars of run_dir's metrics.jsonl, one point per round
    at step = round; the headline figures checked against the records themselves."""
    records = read_metrics(run_dir)
    got = _event_scalars(log_dir)
    expected: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for rec in records:
        for tag, value in tracking.scalars(rec):
            expected[tag].append((rec["round"], value))
    assert sorted(got) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        # event files hold float32
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    rounds = [r["round"] for r in records]
    assert [s for s, _ in got["round/test_acc_pct"]] == rounds
    assert [v for _, v in got["round/test_acc_pct"]] == pytest.approx(
        [100 * r["test_acc"] for r in records], rel=1e-6)
    assert [v for _, v in got["round/upper_loss"]] == pytest.approx(
        [r["upper_loss"] for r in records], rel=1e-6)
    assert [v for _, v in got["round/payload_bytes"]] == [r["payload_bytes"] for r in records]
    for i, rec in enumerate(records):
        assert rec["clients"]
        for c in rec["clients"]:
            tag = f"client/{c['client_id']}"
            assert got[f"{tag}/ratio"][i] == (rec["round"], c["ratio"])
            assert got[f"{tag}/payload_bytes"][i][1] == \
                c["payload_down_bytes"] + c["payload_up_bytes"]
            assert got[f"{tag}/compute_s"][i][1] == pytest.approx(c["compute_s"], rel=1e-6)
    return records


# --------------------------------------------------------------------------- unit


# what every transport leaves in its run folder beside metrics.jsonl and summary.json
PLOTS = {"accuracy.png", "bytes_per_ratio.png"}


def _assert_plots(run: Path, stdout: str) -> None:
    """The run folder holds the same plots whichever command ran it, and says so."""
    made = {p.name for p in run.glob("*.png")}
    assert made == PLOTS, made
    assert all((run / name).stat().st_size > 1000 for name in made)
    assert "plots: " in stdout and "accuracy.png" in stdout, stdout[-2000:]


def test_a_record_becomes_round_and_client_scalars() -> None:
    rec = {"round": 4, "test_acc": 0.5, "upper_loss": float("nan"), "test_loss": None,
           "round_s": 1.5, "wire_bytes": None, "payload_bytes": 300, "participants": 2,
           "coverage_x_min": 1, "coverage_x_mean": 1.5, "aggregated_early": True,
           "clients": [
               {"client_id": 0, "ratio": 1.0, "payload_down_bytes": 100, "payload_up_bytes": 100,
                "wire_down_bytes": 150, "wire_up_bytes": 160, "compute_s": 0.2,
                "transfer_s": 0.1, "peak_mem_bytes": 1024},
               {"client_id": 3, "ratio": 0.5, "payload_down_bytes": 50, "payload_up_bytes": 50,
                "wire_down_bytes": 80, "wire_up_bytes": None, "compute_s": 0.1,
                "transfer_s": 0.0, "peak_mem_bytes": 512}]}
    got = dict(tracking.scalars(rec))
    assert got["round/test_acc_pct"] == 50.0
    # unmeasured (None) and non-finite figures are left out, as they are null in metrics.jsonl
    assert "round/upper_loss" not in got and "round/test_loss" not in got
    assert "round/wire_bytes" not in got and "round/aggregated_early" not in got
    assert got["round/payload_bytes"] == 300 and got["round/participants"] == 2
    assert got["round/coverage_x_mean"] == 1.5
    assert got["client/0/ratio"] == 1.0 and got["client/3/ratio"] == 0.5
    assert got["client/0/payload_bytes"] == 200 and got["client/0/wire_bytes"] == 310
    assert "client/3/wire_bytes" not in got  # one direction unmeasured: no sum
    assert got["client/3/peak_mem_bytes"] == 512 and got["client/0/compute_s"] == 0.2


def test_rounds_written_again_after_a_resume_replace_their_points(tmp_path: Path) -> None:
    """What a resumed coordinator does: metrics.jsonl is cut back to the checkpoint and the
    later rounds re-run; TensorBoard shows each round once, with the re-run's value."""
    run, tb = tmp_path / "run", tmp_path / "tb"

    def record(q: int, acc: float) -> dict:
        return {"round": q, "test_acc": acc, "clients": []}

    with MetricsWriter(run, tracking=tracking.TensorBoardSink(tb)) as w:
        for q in (1, 2, 3):
            w.write(record(q, 0.1 * q))
    truncate_metrics(run, 1)
    with MetricsWriter(run, append=True, tracking=tracking.TensorBoardSink(tb)) as w:
        for q in (2, 3, 4):
            w.write(record(q, 0.5 + 0.1 * q))
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2
    got = _event_scalars(tb)["round/test_acc_pct"]
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([10, 70, 80, 90], rel=1e-6)
    assert [r["round"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_a_fresh_run_in_a_used_folder_hides_nothing(tmp_path: Path) -> None:
    """Only a resumed run (starting past round 1) purges earlier points: a second fresh run
    logged to the same folder leaves the first one's points in place."""
    tb = tmp_path / "tb"
    for acc in (0.1, 0.2):
        sink = tracking.TensorBoardSink(tb)
        sink.write({"round": 1, "test_acc": acc, "clients": []})
        sink.close()
    assert sorted(v for _, v in _event_scalars(tb)["round/test_acc_pct"]) == \
        pytest.approx([10.0, 20.0])


def test_tracking_alone_without_a_run_folder(tmp_path: Path) -> None:
    tracking.use_tensorboard(tmp_path / "tb")
    try:
        writer = MetricsWriter.for_run(None)
        assert writer is not None and writer.path is None
        with writer:
            writer.write({"round": 1, "test_acc": 0.25, "clients": []})
    finally:
        tracking.use_tensorboard(None)
    assert MetricsWriter.for_run(None) is None
    assert _event_scalars(tmp_path / "tb")["round/test_acc_pct"] == [(1, 25.0)]


def test_a_tensorboard_that_does_not_import_is_a_named_error(tmp_path: Path,
                                                             monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(tracking.TrackingUnavailable, match=r"pip install 'rabo\[tracking\]'"):
        tracking.TensorBoardSink(tmp_path / "tb")


# --------------------------------------------------------------------------- commands


def test_simulate_logs_the_scalars_of_its_metrics(tmp_path: Path) -> None:
    run, tb = tmp_path / "run", tmp_path / "tb"
    proc = _run([*RABO, "simulate", "-q", "--rounds", "2", "--out", str(run), "--tensorboard",
                 str(tb), *JOB])
    assert f"tensorboard: tensorboard --logdir {tb}" in proc.stdout
    _assert_plots(run, proc.stdout)
    records = _assert_matches_metrics(tb, run)
    assert [r["round"] for r in records] == [1, 2]
    got = _event_scalars(tb)
    assert {t.split("/")[1] for t in got if t.startswith("client/")} == {"0", "1", "2"}
    assert [v for _, v in got["client/2/ratio"]] == [0.25, 0.25]
    assert "round/wire_bytes" not in got  # in-process: nothing moves on a wire


def test_local_then_a_resumed_coordinator_continue_one_tensorboard_run(tmp_path: Path) -> None:
    """``rabo local`` logs its rounds; ``rabo coordinator --resume`` from its round-1
    checkpoint (given --tensorboard by its environment variable) re-runs round 2 and runs
    round 3 into the same TensorBoard run: each round once, the re-run's values."""
    run, tb = tmp_path / "run", tmp_path / "tb"
    proc = _run([*RABO, "local", "-q", "--workers", "3", "--threads", "1", "--rounds", "2",
                 "--out", str(run), "--tensorboard", str(tb), *JOB, "--set",
                 "cluster.checkpoint_every=1"])
    assert f"tensorboard: tensorboard --logdir {tb}" in proc.stdout
    first = _assert_matches_metrics(tb, run)
    assert [r["round"] for r in first] == [1, 2]
    assert all(r["wire_bytes"] for r in first)  # measured at the sockets
    assert _event_scalars(tb)["round/wire_bytes"][-1][1] == first[-1]["wire_bytes"]

    for name in ("checkpoint.pt", "checkpoint.json", "ckpt-000002.pt", "ckpt-000002.json"):
        (run / name).unlink(missing_ok=True)  # the newest checkpoint is now round 1's
    port = free_port()
    coord = subprocess.Popen([*RABO, "coordinator", "-q", "--bind", f"127.0.0.1:{port}",
                              "--resume", str(run), "--rounds", "3"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(ENV, RABO_TENSORBOARD=str(tb)))
    workers = [subprocess.Popen([sys.executable, "-m", "worker", "--coordinator",
                                 f"127.0.0.1:{port}", "--client-id", str(i), "--threads", "1",
                                 "--poll-s", "1", "--give-up-s", "120"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
               for i in range(3)]
    try:
        out = coord.communicate(timeout=240)[0]
        assert coord.returncode == 0, out[-3000:]
        assert "resuming from" in out and "(round 1)" in out, out[-3000:]
        assert f"tensorboard: tensorboard --logdir {tb}" in out  # from RABO_TENSORBOARD
        _assert_plots(run, out)  # the coordinator writes them too
        for w in workers:
            w.wait(timeout=60)
    finally:
        for p in (coord, *workers):
            if p.poll() is None:
                p.kill()
                p.wait()
    resumed = _assert_matches_metrics(tb, run)  # TensorBoard dropped the first round 2
    assert [r["round"] for r in resumed] == [1, 2, 3]
    assert resumed[0] == first[0] and resumed[1]["wall_s"] != first[1]["wall_s"]
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2


@pytest.mark.slow
def test_dist_rank_0_logs_the_scalars_of_its_metrics(tmp_path: Path) -> None:
    run, tb = tmp_path / "run", tmp_path / "tb"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
                 "--master-port", str(free_port()), "-m", "rabo.dist", "--backend", "gloo",
                 "--rounds", "2", "--out", str(run), "--tensorboard", str(tb), "--threads", "1",
                 "-q", *JOB])
    _assert_plots(run, proc.stdout)
    records = _assert_matches_metrics(tb, run)
    assert [r["round"] for r in records] == [1, 2]
    assert {c["worker_id"] for c in records[0]["clients"]} == {"rank1", "rank2"}
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1  # rank 0 only


def test_without_tensorboard_the_flag_names_the_install_and_the_rest_works(
        tmp_path: Path) -> None:
    """TensorBoard made unimportable in a child (sys.modules), not uninstalled."""
    tb = tmp_path / "tb"
    code = (
        "import sys, json\n"
        "sys.modules['tensorboard'] = None\n"
        "from rabo.cli import main\n"
        "def rc(argv):\n"
        "    try:\n"
        "        return main(argv)\n"
        "    except SystemExit as exc:\n"
        "        return int(exc.code or 0)\n"
        f"job = {json.dumps(JOB)}\n"
        f"print('flag', rc(['simulate', '--rounds', '1', '--tensorboard', {str(tb)!r}, *job]))\n"
        "print('plain', rc(['simulate', '-q', '--rounds', '1', *job]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert "flag 2" in proc.stdout and "plain 0" in proc.stdout, proc.stdout + proc.stderr
    assert ("argument --tensorboard: the tensorboard package is not installed (pip install "
            "'rabo[tracking]') (flag or env RABO_TENSORBOARD)") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not tb.exists()
    via_env = subprocess.run([sys.executable, "-c", code.replace(
        f"'--tensorboard', {str(tb)!r}, ", "")], capture_output=True, text=True, timeout=120,
        env=dict(ENV, RABO_TENSORBOARD=str(tb)))
    # the variable is refused by the commands that read it, with the same hint
    assert "flag 2" in via_env.stdout and "plain 2" in via_env.stdout, via_env.stderr
    assert "pip install 'rabo[tracking]'" in via_env.stderr
