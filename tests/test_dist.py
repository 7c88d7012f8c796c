"""The torch.distributed backend with real process groups (gloo) launched by torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import free_port

ENV = dict(os.environ, GRPC_VERBOSITY="ERROR")
JOB = ["--set", "data.dataset=digits", "--set", "model.hidden=[48, 32]",
       "--set", "clients.ratios=[1, 0.5, 0.25]", "--threads", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]




@pytest.mark.slow
def test_three_processes_with_gloo(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [*TORCHRUN, "--nproc-per-node", "3", "--master-port", str(free_port()), "-m",
         "rabo.dist", "--backend", "gloo", "--rounds", "3", "--out", str(out), *JOB],
        capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 workers over torch.distributed (gloo)" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    for rec in records:
        assert {c["worker_id"]: c["ratio"] for c in rec["clients"]} == {"rank1": 1.0,
                                                                          "rank2": 0.5}
        for c in rec["clients"]:
            # kernel counters of rank 0's gloo connections to that rank
            assert c["payload_down_bytes"] <= c["wire_down_bytes"] < c["payload_down_bytes"] \
                + 4096
            assert c["payload_up_bytes"] <= c["wire_up_bytes"] < c["payload_up_bytes"] + 4096
            assert c["compute_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["transport"] == "torch.distributed (gloo)" and summary["world_size"] == 3


@pytest.mark.slow
def test_two_node_launch_with_c10d_rendezvous(tmp_path: Path) -> None:
    """Two torchrun launchers (two "nodes" of 2 processes) meet at a c10d rendezvous on
    127.0.0.1 and run the job to the end."""
    port = free_port()
    out = tmp_path / "run"
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "rabo-test",
              "-m", "rabo.dist", "--backend", "gloo", "--rounds", "2", "--out", str(out), *JOB]
    nodes = [subprocess.Popen([*TORCHRUN, *common], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=ENV)
             for _ in range(2)]
    outputs = [n.communicate(timeout=240)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(outputs)
    assert any("3 workers over torch.distributed (gloo)" in o for o in outputs)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and len(records[-1]["clients"]) == 3


@pytest.mark.slow
def test_ranks_with_different_configs_stop_with_an_error(tmp_path: Path) -> None:
    """Each node reads its own --config; two that disagree (here: the seed) must stop at
    once with an error saying so, not train a wrong model or hang."""
    port = free_port()
    nodes = [subprocess.Popen(
        [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "rabo-cfg", "-m", "rabo.dist",
         "--backend", "gloo", "--rounds", "2", "--timeout-s", "60", *JOB, "--set",
         f"seed={seed}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        for seed in (1, 2)]
    outputs = [n.communicate(timeout=240)[0] for n in nodes]
    assert all(n.returncode != 0 for n in nodes), "\n".join(outputs)
    assert "resolved a different config than rank 0" in "".join(outputs), "\n".join(outputs)


def _rank_pid(launcher: psutil.Process, rank: int) -> int | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow
def test_killed_rank_ends_the_job_with_an_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*TORCHRUN, "--nproc-per-node", "3", "--master-port", str(free_port()), "-m",
         "rabo.dist", "--backend", "gloo", "--rounds", "100000", "--timeout-s", "20",
         "--out", str(out), *JOB],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.2)
    assert metrics.exists(), "no round finished"
    pid = _rank_pid(psutil.Process(proc.pid), 2)
    assert pid is not None
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    output = proc.communicate(timeout=150)[0]
    assert proc.returncode != 0
    # bounded by --timeout-s (20) plus torchrun's SIGTERM grace (30), with room for load
    assert time.monotonic() - started < 100, "the job did not stop in bounded time"
    assert "rabo dist: rank 0 (coordinator): error:" in output or "ChildFailedError" in output \
        or "failed" in output.lower(), output[-3000:]


def _dist_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
               args: list[str], gpus: int, local_rank: int) -> tuple[int, str]:
    """``rabo dist`` up to its start-up checks, in process, with ``gpus`` GPUs pretended (no
    GPU here: the checks run before any CUDA call or process group)."""
    import torch

    from rabo import dist as rabo_dist

    for key, value in {"RANK": str(local_rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(local_rank),
                       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    rc = rabo_dist.main([*args, "--set", "data.dataset=digits"])
    return rc, capsys.readouterr().err


def test_nccl_with_more_ranks_than_gpus_is_refused_up_front(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _dist_main(monkeypatch, capsys, ["--backend", "nccl"], gpus=1, local_rank=1)
    assert rc == 2
    assert "one GPU per rank" in err and "LOCAL_RANK 1" in err and "1 GPU(s)" in err
    rc, err = _dist_main(monkeypatch, capsys, ["--backend", "nccl"], gpus=0, local_rank=0)
    assert rc == 2 and "needs CUDA" in err


def test_bad_worker_memory_limits_name_the_flag(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _dist_main(monkeypatch, capsys,
                         ["--backend", "gloo", "--worker-memory-limits", "96MiB,12XB"],
                         gpus=0, local_rank=1)
    assert rc == 2
    assert "--worker-memory-limits" in err and "12XB" in err


def test_auto_backend_is_the_same_choice_on_every_rank_of_a_node() -> None:
    from rabo.dist import pick_backend

    assert pick_backend("auto", 2, "2") == "nccl"
    assert pick_backend("auto", 1, "2") == "gloo"  # fewer GPUs than ranks on the node
    assert pick_backend("auto", 0, "1") == "gloo"
    # no LOCAL_WORLD_SIZE: gloo on every rank, whatever its LOCAL_RANK
    assert pick_backend("auto", 8, None) == "gloo"
    assert pick_backend("gloo", 8, "2") == "gloo" and pick_backend("nccl", 0, None) == "nccl"


def test_a_ranks_clear_error_reaches_torchruns_error_file(tmp_path) -> None:
    """The elastic agent names an error file per rank (TORCHELASTIC_ERROR_FILE) and prints
    its message in torchrun's failure summary: a rank that stops on a clear error writes it."""
    err = tmp_path / "error.json"
    env = dict(os.environ, TORCHELASTIC_ERROR_FILE=str(err), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    proc = subprocess.run([sys.executable, "-m", "rabo.dist"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2
    assert "rabo dist: error: needs at least 2 processes" in proc.stderr
    assert "Traceback" not in proc.stderr
    message = json.loads(err.read_text())["message"]["message"]
    assert message == "RaboError: needs at least 2 processes (rank 0 coordinates)"


@pytest.mark.slow
def test_the_configs_memory_budgets_choose_the_ranks_ratios(tmp_path: Path) -> None:
    """As with rabo local: clients.memory_budgets, cycled over the worker ranks, are their
    budgets when no --worker-memory-limits is given, so one config gives the same ratios on
    every transport."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [*TORCHRUN, "--nproc-per-node", "3", "--master-port", str(free_port()), "-m",
         "rabo.dist", "--backend", "gloo", "--rounds", "2", "--out", str(out), "--threads", "1",
         "--set", "data.dataset=digits", "--set", "model.hidden=[48, 32]",
         "--set", "clients.memory_budgets=[8GiB, 1KiB]"],
        capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {c["worker_id"]: c["ratio"] for c in first["clients"]} == {"rank1": 1.0}
    assert "rank2" in first["not_assigned"]  # 1 KiB fits no ratio
    assert "smallest ratio" in first["not_assigned"]["rank2"]
