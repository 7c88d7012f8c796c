"""A worker that returns finite but absurd values cannot move the global model: its update is
refused before aggregation, the aggregate is checked to be finite, and norm clipping bounds
what a plausible-looking update can do (issue: finite poison)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_util import connect, fetch, update_stream

from coordinator.local import WorkerProcess, stop_workers
from coordinator.server import serve
from rabo import config
from rabo.engine import Update
from rabo.errors import UpdateRejected
from rabo.job import Job
from rabo_proto.codec import WireTensor

TINY = ["data.dataset=digits", "model.hidden=[16]", "clients.count=3",
        "clients.ratios=[1, 0.5, 0.5]", "data.batch_size=32", "inner.steps=1"]


def _round_of_updates(over=()):
    job = Job.from_config(config.load(None, [*TINY, *over]))
    state = job.engine.init_state()
    results = []
    for cid in range(3):
        plan = job.engine.plan(1, cid, [1.0, 0.5, 0.5][cid])
        upd = job.engine.client_step(job.engine.assign(state, plan), job.data.clients[cid])
        results.append((plan, upd))
    return job, state, results


def _scaled(upd: Update, value: float) -> Update:
    return Update(upd.round, upd.client_id,
                  {n: torch.full_like(t, value) for n, t in upd.x.items()},
                  {n: torch.full_like(t, value) for n, t in upd.y.items()},
                  {n: torch.full_like(t, value) for n, t in upd.v.items()},
                  upd.samples, upd.upper_loss)


def test_an_absurd_update_is_refused_and_an_honest_one_is_not() -> None:
    job, state, results = _round_of_updates()
    for plan, upd in results:
        job.engine.check_magnitude(state, plan, upd)  # honest: no error
        sizes = job.engine.magnitudes(state, plan, upd)
        assert all(rms < 0.1 for rms, _ in sizes.values()), sizes  # the documented margin
    plan, upd = results[1]
    with pytest.raises(UpdateRejected, match=r"update x of client 1: RMS 3e\+38 exceeds "
                                             r"aggregation.max_update_rms 100"):
        job.engine.check_magnitude(state, plan, _scaled(upd, 3e38))
    with pytest.raises(UpdateRejected, match="RMS nan"):
        job.engine.check_magnitude(state, plan, _scaled(upd, float("nan")))


def test_a_non_finite_aggregate_drops_the_largest_updates_and_keeps_the_model_finite() -> None:
    # with the magnitude bound switched off, two finite 3e38 updates overflow when summed
    job, state, results = _round_of_updates(["aggregation.max_update_rms=0"])
    poisoned = [results[0], (results[1][0], _scaled(results[1][1], 3e38)),
                (results[2][0], _scaled(results[2][1], 3e38))]
    assert not all(torch.isfinite(t).all()
                   for t in job.engine._aggregate(state, poisoned)[0].y.values())
    new, stats = job.engine.server_step(state, poisoned)
    assert stats.dropped == (1,)  # the first dropped one is enough for a finite sum
    for part in ("x", "y", "v"):
        assert all(torch.isfinite(t).all() for t in getattr(new, part).values())
    # nothing finite is left (NaN updates): the model stays as it was
    nan = [(p, _scaled(u, float("nan"))) for p, u in results[1:]]
    kept, stats = job.engine.server_step(state, nan)
    assert stats.dropped == (1, 2) and kept.round == 1
    assert all(torch.equal(kept.x[n], state.x[n]) for n in state.x)
    assert all(torch.equal(kept.y[n], state.y[n]) for n in state.y)


def test_norm_clipping_bounds_an_update_by_the_rounds_median() -> None:
    job, state, results = _round_of_updates(["aggregation.clip_rms=2"])
    plan, upd = results[2]
    big = Update(upd.round, upd.client_id, {n: 50 * t for n, t in upd.x.items()},
                 upd.y, upd.v, upd.samples, upd.upper_loss)
    clipped, n = job.engine._clipped(state, [*results[:2], (plan, big)])
    assert n >= 1
    med = sorted(job.engine.magnitudes(state, p, u)["x"][0] for p, u in results[:2]
                 + [(plan, big)])[1]
    got = job.engine.magnitudes(state, plan, clipped[2][1])["x"][0]
    assert got == pytest.approx(2 * med, rel=1e-6)
    _, stats = job.engine.server_step(state, [*results[:2], (plan, big)])
    assert stats.clipped >= 1


@pytest.mark.slow
def test_a_poisoning_worker_is_refused_while_the_honest_ones_finish_the_run(
        tmp_path: Path) -> None:
    """Two real worker processes and an attacker that answers every round with 3e38 in every
    element, against a live coordinator on 127.0.0.1."""
    rounds = 3
    cfg = config.load(None, [*TINY, "clients.ratios=[1, 0.5, 1]", f"rounds={rounds}",
                             "cluster.workers=3", "cluster.heartbeat_s=30",
                             "cluster.round_deadline_s=60"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0)
    env = dict(os.environ, GRPC_VERBOSITY="ERROR")
    workers = []
    attacker = connect(server.port, 2)
    try:
        for i in range(2):
            log = tmp_path / f"worker-{i}.log"
            cmd = [sys.executable, "-m", "worker", "--coordinator", f"127.0.0.1:{server.port}",
                   "--client-id", str(i), "--threads", "1", "--poll-s", "1",
                   "--give-up-s", "60"]
            workers.append(WorkerProcess(i, None, subprocess.Popen(
                cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env), log))
        refusals = []
        for q in range(1, rounds + 1):
            end = time.monotonic() + 180  # the workers start (torch) before round 1 opens
            while server.coord.ticket is None or server.coord.ticket.round < q:
                assert time.monotonic() < end, f"round {q} did not open"
                time.sleep(0.1)
            assignment, tensors = fetch(attacker, after_round=q - 1, wait_s=60)
            assert assignment.round == q
            poison = [WireTensor(t.part, t.name, torch.full_like(t.tensor, 3e38))
                      for t in tensors]
            with pytest.raises(grpc.RpcError) as err:
                attacker.stub.SubmitUpdate(update_stream(attacker, q, 2, poison), timeout=30)
            refusals.append((err.value.code(), err.value.details()))
        end = time.monotonic() + 120
        while not server.driver.done.is_set() and time.monotonic() < end:
            time.sleep(0.1)
        assert server.driver.error is None, server.driver.error
        assert len(server.driver.records) == rounds
        for code, details in refusals:
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_update_rms" in details and "update x of client 2" in details
        for rec in server.driver.records:
            assert "2" in rec["refused_updates"]
            assert sorted(c["client_id"] for c in rec["clients"]) == [0, 1]  # honest ones
        state = server.coord.state
        for part in (state.x, state.y, state.v):
            for t in part.values():
                assert torch.isfinite(t).all() and float(t.abs().max()) < 100
        # the honest workers trained it: the global validation loss fell every round
        losses = [r["upper_loss"] for r in server.driver.records]
        assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
        assert server.coord.rejected.get("magnitude") == rounds
        assert all(w.proc.poll() is None or w.proc.returncode == 0 for w in workers)
        assert math.isfinite(server.driver.records[-1]["upper_loss"])
    finally:
        attacker.close()
        stop_workers(workers)
        server.stop(grace=0)


@pytest.mark.slow
def test_a_worker_whose_update_is_refused_goes_on_with_the_next_try(tmp_path: Path) -> None:
    """An honest worker can produce a refused update (a diverging step): it drops it and
    answers the retry, instead of exiting. Here the bound is set so low that every update is
    refused, so the round is retried until the run stops."""
    cfg = config.load(None, [*TINY, "clients.count=1", "clients.ratios=[1]", "rounds=1",
                             "aggregation.max_update_rms=1e-12", "cluster.max_round_retries=2",
                             "cluster.heartbeat_s=30"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0)
    log = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "worker", "--coordinator", f"127.0.0.1:{server.port}",
           "--threads", "1", "--poll-s", "1", "--give-up-s", "20"]
    w = WorkerProcess(0, None, subprocess.Popen(cmd, stdout=log.open("wb"),
                                                stderr=subprocess.STDOUT,
                                                env=dict(os.environ, GRPC_VERBOSITY="ERROR")),
                      log)
    try:
        end = time.monotonic() + 120
        while not server.driver.done.is_set() and time.monotonic() < end:
            assert w.proc.poll() is None, w.tail()  # never exits on a refusal
            time.sleep(0.1)
        assert server.driver.error is not None  # fewer than min_workers updates, 3 tries
        assert server.coord.rejected.get("magnitude") == 3
        # the driver may stop before the worker has logged the third refusal: wait for it
        end = time.monotonic() + 30
        while log.read_text().count("update not taken (INVALID_ARGUMENT") < 3 and \
                time.monotonic() < end:
            time.sleep(0.1)
        assert log.read_text().count("update not taken (INVALID_ARGUMENT") == 3, w.tail()
    finally:
        stop_workers([w])
        server.stop(grace=0)
