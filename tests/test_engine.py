"""The round engine against an independent centralized bilevel step, and its invariants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from params_util import flat, unflat

from rabo import config
from rabo.engine import sample_participants
from rabo.job import Job
from rabo.params import max_abs_diff
from rabo.runner import simulate
from rabo.tasks import Batch

TINY = ["data.dataset=digits", "model.hidden=[16]", "clients.count=1", "clients.ratios=[1]",
        "data.batch_size=0", "inner.steps=1", "outer.optimizer=sgd", "rounds=1",
        "estimator.radius=0"]

@pytest.mark.parametrize("task_name", ["A", "B"])
def test_one_client_at_ratio_one_is_a_centralized_bilevel_step(task_name: str) -> None:
    cfg = config.load(None, [*TINY, f"task={task_name}", "estimator.name=exact",
                             "estimator.eta_v=0.3", "inner.lr=0.4", "outer.lr=0.7"])
    job = Job.from_config(cfg)
    state = job.engine.init_state()
    gen = torch.Generator().manual_seed(9)
    state.v = {k: 0.1 * torch.randn(t.shape, generator=gen) for k, t in state.y.items()}
    x0, y0, v0 = flat(state.x), flat(state.y), flat(state.v)

    plan = job.engine.plan(1, 0, 1.0)
    update = job.engine.client_step(job.engine.assign(state, plan), job.data.clients[0])
    new, _ = job.engine.server_step(state, [(plan, update)])

    # the same step, written independently with full Hessian blocks
    client = job.data.clients[0]
    tr = Batch(client.train.inputs, client.train.labels, torch.arange(len(client.train)))
    va = Batch(client.val.inputs, client.val.labels, torch.arange(len(client.val)))
    task = job.task

    def g(xv, yv):
        return task.g(unflat(xv, state.x), unflat(yv, state.y), tr)

    def f(xv, yv):
        return task.f(unflat(xv, state.x), unflat(yv, state.y), va)

    fx, fy = torch.autograd.functional.jacobian(f, (x0, y0))
    _, gy = torch.autograd.functional.jacobian(g, (x0, y0))
    hess = torch.autograd.functional.hessian(lambda yv: g(x0, yv), y0)
    cross = torch.autograd.functional.jacobian(
        lambda xv: torch.autograd.functional.jacobian(lambda yv: g(xv, yv), y0,
                                                      create_graph=True), x0)  # [ny, nx]
    h = fx - cross.T @ v0
    expect_x = x0 - 0.7 * h
    expect_y = y0 - 0.4 * gy
    expect_v = v0 - 0.3 * (hess @ v0 - fy)
    assert torch.allclose(flat(new.x), expect_x, rtol=1e-4, atol=1e-6)
    assert torch.allclose(flat(new.y), expect_y, rtol=1e-4, atol=1e-6)
    assert torch.allclose(flat(new.v), expect_v, rtol=1e-4, atol=1e-6)
    assert float(torch.linalg.norm(cross.T @ v0)) > 1e-4  # the second-order term mattered


def test_rafbo_with_one_local_step_equals_rabo_sgd() -> None:
    common = [*TINY, "rounds=3", "clients.count=3", "clients.ratios=[1, 0.5]"]
    rabo = simulate(config.load(None, [*common, "algorithm=rabo"])).state
    rafbo = simulate(config.load(None, [*common, "algorithm=rafbo", "outer.local_steps=1"])).state
    assert max_abs_diff(rabo.x, rafbo.x) < 1e-6
    assert max_abs_diff(rabo.y, rafbo.y) < 1e-6


def test_runs_are_deterministic_and_seeds_matter() -> None:
    over = [*TINY, "rounds=3", "clients.count=4", "clients.ratios=[1, 0.25]", "data.batch_size=32",
            "mask.policy=random", "clients.participation=0.5", "inner.steps=2"]
    a = simulate(config.load(None, over)).state
    b = simulate(config.load(None, over)).state
    c = simulate(config.load(None, [*over, "seed=5"])).state
    assert max_abs_diff(a.x, b.x) == 0.0 and max_abs_diff(a.v, b.v) == 0.0
    assert max_abs_diff(a.x, c.x) > 0.0


def test_coverage_and_payloads_in_records() -> None:
    over = [*TINY, "rounds=2", "clients.count=4", "clients.ratios=[1, 0.5, 0.25, 0.25]",
            "model.hidden=[32, 32]", "mask.policy=static"]
    res = simulate(config.load(None, over))
    rec = res.records[0]
    # static masks: every coordinate is covered by the ratio-1 client; the first 8 units by all
    assert rec["coverage_x_min"] == 1 and rec["coverage_x_zero"] == 0
    assert rec["coverage_y_min"] == 1
    assert res.summary["C_x_star"] == 1
    by_ratio = {c["ratio"]: c for c in rec["clients"]}
    full, half = by_ratio[1.0]["payload_down_elems"], by_ratio[0.5]["payload_down_elems"]
    assert half < 0.5 * full  # hidden-to-hidden weights shrink as r^2
    assert rec["clients"][0]["payload_up_elems"] == rec["clients"][0]["payload_down_elems"]


def test_personalized_lower_level_keeps_y_per_client() -> None:
    over = [*TINY, "rounds=2", "clients.count=3", "lower_level=personalized"]
    res = simulate(config.load(None, over))
    job = Job.from_config(config.load(None, over))
    init = job.engine.init_state()
    assert max_abs_diff(res.state.y, init.y) == 0.0  # the global y is never averaged
    assert sorted(res.state.y_clients) == [0, 1, 2]
    assert max_abs_diff(res.state.y_clients[0], res.state.y_clients[1]) > 0


def test_personalized_runs_report_their_clients_heads_and_leave_the_input_state() -> None:
    """The shared y never trains under lower_level: personalized, so accuracy is the mean of
    the clients' own heads; and the server step reads, never changes, the state it gets."""
    from rabo.evaluation import evaluate_round, score

    def evaluate(task, x, y, test):
        return score(task, x, y, test, job.data.num_classes, torch.device("cpu"))

    over = [*TINY, "rounds=12", "clients.count=3", "clients.ratios=[1]",
            "lower_level=personalized", "outer.lr=0.5", "inner.lr=0.5"]
    cfg = config.load(None, over)
    res = simulate(cfg)
    job = Job.from_config(cfg)
    heads = [evaluate(job.task, res.state.x, y, job.data.test)[0]
             for _, y in sorted(res.state.y_clients.items())]
    assert res.summary["test_acc"] == pytest.approx(sum(heads) / 3)
    assert evaluate_round(job, res.state).test_acc == pytest.approx(sum(heads) / 3)
    shared = evaluate(job.task, res.state.x, res.state.y, job.data.test)[0]
    assert res.summary["test_acc"] > shared + 0.2  # the untrained shared head is near chance
    # server_step on a fresh state: its (empty) per-client dicts stay empty
    state = job.engine.init_state()
    plan = job.engine.plan(1, 0, 1.0)
    upd = job.engine.client_step(job.engine.assign(state, plan), job.data.clients[0])
    new, _ = job.engine.server_step(state, [(plan, upd)])
    assert state.y_clients == {} and sorted(new.y_clients) == [0]


def test_full_batch_policy_sizes_the_whole_train_split() -> None:
    """data.batch_size 0 means full batch: the ratio policy must size memory for the client's
    whole train split, not for one sample."""
    from rabo.policy import Resources, estimate_memory

    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[512, 512]",
                             "clients.count=2", "data.batch_size=0"])
    job = Job.from_config(cfg)
    n = len(job.data.clients[0].train)
    assert job.step_batch(0) == n > 100
    one = estimate_memory(job.task, job.hyper, 1.0, 1)
    full = estimate_memory(job.task, job.hyper, 1.0, n)
    assert full > one
    # a budget that fits ratio 1 at one sample but not at the real batch
    budget = int((one + full) / 2 / cfg.policy.safety)
    ratio, _ = job.ratio_for(0, Resources(budget))
    assert ratio is not None and ratio < 1.0
    assert estimate_memory(job.task, job.hyper, ratio, n) <= budget * cfg.policy.safety


def test_task_c_hyper_cleaning_runs_and_moves_only_participants_weights() -> None:
    over = ["task=C", "data.dataset=digits", "model.hidden=[16]", "clients.count=4",
            "clients.participation=0.5", "rounds=2", "data.label_noise=0.3",
            "outer.optimizer=sgd", "outer.lr=5.0"]
    cfg = config.load(None, over)
    res = simulate(cfg)
    # round 1 starts from v = 0, where the hypergradient of sample weights is zero (f does not
    # depend on them); in round 2 the participants' weights move and nobody else's
    parts = res.records[1]["clients"]
    moved = {int(k[1:]) for k, t in res.state.x.items() if float(t.abs().sum()) > 0}
    assert moved == {c["client_id"] for c in parts}


def test_participant_sampling() -> None:
    assert sample_participants(0, 1, [3, 1, 2], 1.0) == [1, 2, 3]
    a = sample_participants(0, 1, list(range(10)), 0.3)
    assert len(a) == 3 and a == sorted(a)
    assert a == sample_participants(0, 1, list(range(10)), 0.3)
    picks = {tuple(sample_participants(0, q, list(range(10)), 0.3)) for q in range(1, 20)}
    assert len(picks) > 5  # rounds differ


def test_simulate_cli_writes_the_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rabo.cli", "simulate", "--rounds", "2", "--out", str(out),
           *sum((["--set", kv] for kv in [*TINY, "clients.count=2",
                                          "clients.ratios=[1, 0.5]"]), [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "round   2/2" in proc.stdout
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[-1])
    for key in ("round", "wall_s", "upper_loss", "test_acc", "coverage_x_min", "coverage_y_min"):
        assert key in rec
    assert {c["ratio"] for c in rec["clients"]} == {1.0, 0.5}
    assert all("payload_down_elems" in c and "payload_up_elems" in c for c in rec["clients"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] == rec["test_acc"] and summary["C_x_star"] >= 1
    assert summary["config"]["rounds"] == 2
    prov = summary["provenance"]
    import rabo
    assert prov["rabo_version"] == rabo.__version__ and prov["torch_version"] == torch.__version__
    assert prov["command"].split()[:2] == ["cli.py", "simulate"] and "--rounds 2" in prov["command"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    if head.returncode == 0:  # a checkout (CI clones one)
        assert prov["git_commit"] == head.stdout.strip()
        assert isinstance(prov["git_modified_files"], list)
    assert prov["started_at"].endswith("+00:00") and prov["host"]


def test_rabo_version_names_the_version_commit_and_torch_build() -> None:
    import rabo

    proc = subprocess.run([sys.executable, "-m", "rabo.cli", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"rabo {rabo.__version__} (")
    assert f"torch {torch.__version__}" in proc.stdout


def test_cli_bad_config_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("estimator:\n  name: newton\n")
    proc = subprocess.run([sys.executable, "-m", "rabo.cli", "simulate", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "estimator.name: 'newton' is not allowed" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "rabo.cli", "simulate", "--set",
                           "data.dataset=mnist-full", "--set", f"data.root={tmp_path}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and str(tmp_path) in proc.stderr


def test_report_table_and_plots(tmp_path: Path) -> None:
    from rabo.report import report

    simulate(config.load(None, [*TINY, "rounds=3", "clients.count=2",
                                "clients.ratios=[1, 0.5]"]), tmp_path)
    text = report(tmp_path)
    rows = [line.split() for line in text.splitlines()[2:5]]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    assert [float(r[1]) for r in rows] == [round(rec["test_acc"], 4) for rec in records]
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "bytes_per_ratio.png").stat().st_size > 1000


@pytest.mark.parametrize("batch", [7, 64, 0])
def test_the_reported_upper_loss_is_f_over_the_whole_validation_split(batch: int) -> None:
    """Evaluated in pieces of a batch (so a worker's memory does not grow with its data), the
    upper loss is still the mean of f over every validation sample."""
    from rabo.engine import _upper_loss
    from rabo.tasks.base import Batch

    job = Job.from_config(config.load(None, ["data.dataset=digits", "model.hidden=[32]",
                                             "clients.count=2"]))
    state = job.engine.init_state()
    val = job.data.clients[0].val
    assert len(val) > 64  # several pieces at batch 7 and 64
    whole = float(job.task.f(state.x, state.y, Batch(val.inputs, val.labels,
                                                     torch.arange(len(val)))))
    got = _upper_loss(job.task, state.x, state.y, val, batch, torch.device("cpu"))
    assert got == pytest.approx(whole, rel=1e-6)


def test_coordinates_no_submodel_covers_get_a_warning_once(caplog) -> None:
    """Two workers at ratio 0.5 under static masks leave half of x untrained: said once,
    with the fraction and the fix; rolling masks move over the model: silent (even at ratio
    1/4, whose sweep takes longer than the warning's window)."""
    import logging

    from rabo.rounds import UNCOVERED_ROUNDS
    from rabo.runner import simulate

    base = ["data.dataset=digits", "model.hidden=[16, 16]", "clients.count=2",
            "clients.ratios=[0.5, 0.5]", f"rounds={UNCOVERED_ROUNDS + 2}",
            f"eval_every={UNCOVERED_ROUNDS + 2}"]
    with caplog.at_level(logging.WARNING, logger="rabo.rounds"):
        simulate(config.load(None, [*base, "mask.policy=static"]))
    said = [r.getMessage() for r in caplog.records if "covered by no worker" in r.getMessage()]
    assert len(said) == 1, said
    assert f"in rounds 1-{UNCOVERED_ROUNDS}, so they were not trained" in said[0]
    assert "use mask.policy=rolling or random" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rabo.rounds"):
        simulate(config.load(None, [*base, "mask.policy=rolling"]))
        simulate(config.load(None, [*base, "mask.policy=rolling", "clients.ratios=[0.25]"]))
    assert not [r for r in caplog.records if "covered by no worker" in r.getMessage()]


def test_progress_lines_carry_the_pace_and_the_time_left() -> None:
    from rabo.runner import ProgressLine, format_duration

    assert [format_duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]
    now = [100.0]
    line = ProgressLine(10, clock=lambda: now[0])
    rec = {"round": 5, "round_s": 2.0, "clients": [], "coverage_x_min": 1,
           "coverage_x_mean": 1.0, "test_acc": None, "upper_loss": None}
    # resumed at round 5: its own 2 s are the first measured round
    assert line(rec).endswith("  2s/round, ETA 10s")
    now[0] += 2.0
    assert line({**rec, "round": 6}).endswith("  2s/round, ETA 8s")
    now[0] += 8.0  # rounds 7..10 together in 8 s: 0.5 rounds/s, done
    assert "ETA" not in line({**rec, "round": 10})
    # a log (not a terminal) keeps the plain line; a terminal gets a bar in front of it
    assert not line({**rec, "round": 10}).startswith("[")
    bar = ProgressLine(10, clock=lambda: now[0], bar=True)
    assert bar({**rec, "round": 5}).startswith("[##########----------] ")


def test_grid_progress_counts_only_the_runs_it_made_for_its_pace() -> None:
    from rabo.experiments.common import GridProgress

    now = [0.0]
    grid = GridProgress(clock=lambda: now[0], bar=False)
    run = {"labels": {"method": "rabo", "seed": 0}, "final": {"test_acc": 0.9}, "wall_s": 30.0}
    # a stored run takes no time: no pace to tell yet
    assert "ETA" not in grid.line(1, 5, {**run, "stored": True})
    now[0] = 60.0
    text = grid.line(2, 5, run)  # one run made in 60 s, three left
    assert "(30.0s)" in text and text.endswith("  1.0 runs/min, ETA 3m00s")
    now[0] = 90.0
    assert grid.line(3, 5, run).endswith("  1.3 runs/min, ETA 1m30s")  # 45 s per run
    assert "ETA" not in grid.line(5, 5, run)
    assert GridProgress(bar=True).line(1, 4, run).startswith("[#####---------------] ")
