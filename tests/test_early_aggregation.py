"""Updates are averaged while the round's other transfers still run, in client-id order, and
the model comes out bit for bit as when everything is averaged at the end (issue: a data
plane near the wire's limit, "aggregate each update as it completes")."""

from __future__ import annotations

import time

import pytest
import torch
from grpc_util import connect, fetch, update_stream

from coordinator.server import serve
from rabo import config
from rabo.engine import GlobalState, Update
from rabo.job import Job
from rabo.rounds import EarlyAggregate, Task
from rabo_proto.codec import WireTensor

TINY = ["data.dataset=digits", "model.hidden=[16]", "clients.count=3",
        "clients.ratios=[1, 0.5, 0.25]", "data.batch_size=32", "inner.steps=1"]


def _round(over=()):
    job = Job.from_config(config.load(None, [*TINY, *over]))
    state = job.engine.init_state()
    results = []
    for cid, r in enumerate((1.0, 0.5, 0.25)):
        plan = job.engine.plan(1, cid, r)
        upd = job.engine.client_step(job.engine.assign(state, plan), job.data.clients[cid])
        results.append((plan, upd))
    return job, state, results


def _same(a: GlobalState, b: GlobalState) -> None:
    for part in ("x", "y", "v"):
        for name, t in getattr(a, part).items():
            assert torch.equal(t, getattr(b, part)[name]), (part, name)
    for cid, y in a.y_clients.items():
        assert all(torch.equal(t, b.y_clients[cid][n]) for n, t in y.items())


@pytest.mark.parametrize("over", [(), ("lower_level=personalized",),
                                  ("aggregation.weighting=samples", "mask.policy=random")])
def test_an_aggregate_filled_early_gives_the_same_bits_as_one_filled_at_the_end(over) -> None:
    job, state, results = _round(over)
    eng = job.engine
    whole, stats = eng.server_step(state, results)
    assert stats.early == 0
    for held in (1, 2, 3):
        agg = eng.aggregation(state, 1)
        for plan, upd in results[:held]:
            agg.add(plan, upd)
        early, stats = eng.server_step(state, list(reversed(results)), agg)
        _same(early, whole)
        assert stats.early == held
    # one that holds something else than the first updates in client-id order is not used
    agg = eng.aggregation(state, 1)
    agg.add(*results[1])
    other, stats = eng.server_step(state, results, agg)
    _same(other, whole)
    assert stats.early == 0
    with pytest.raises(ValueError, match="client 0 added after client 1"):
        agg.add(*results[0])


def test_early_aggregate_takes_an_update_only_after_every_task_before_it() -> None:
    job, state, results = _round()
    tasks = [Task(f"w{p.client_id}", p, "") for p, _ in results]
    early = EarlyAggregate(job.engine, state, 1, list(reversed(tasks)))
    upd = {p.client_id: u for p, u in results}
    assert early.offer({1: upd[1], 2: upd[2]}) == 0  # client 0 is still out
    assert early.aggregation is not None and early.aggregation.client_ids == []
    assert early.offer({0: None, 1: upd[1]}) == 1  # 0 was refused: 1 can go in, 2 not yet
    assert early.aggregation.client_ids == [1]
    assert early.offer({0: None, 1: upd[1], 2: upd[2]}) == 1
    assert early.aggregation.client_ids == [1, 2]
    # norm clipping needs the whole round's medians: nothing is taken early
    job_c, state_c, results_c = _round(("aggregation.clip_rms=3",))
    tasks_c = [Task(f"w{p.client_id}", p, "") for p, _ in results_c]
    clipped = EarlyAggregate(job_c.engine, state_c, 1, tasks_c)
    assert clipped.aggregation is None
    assert clipped.offer({p.client_id: u for p, u in results_c}) == 0


def _small(tensors: list[WireTensor], seed: int) -> list[WireTensor]:
    gen = torch.Generator().manual_seed(seed)
    return [WireTensor(t.part, t.name, 1e-3 * torch.randn(t.tensor.shape, generator=gen))
            for t in tensors]


def _as_update(round_: int, cid: int, tensors: list[WireTensor]) -> Update:
    parts: dict[str, dict[str, torch.Tensor]] = {"x": {}, "y": {}, "v": {}}
    for t in tensors:
        parts[t.part][t.name] = t.tensor
    return Update(round_, cid, parts["x"], parts["y"], parts["v"], 10, 1.0)


def _wait(cond, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def test_grpc_coordinator_averages_updates_while_a_later_one_is_still_out() -> None:
    cfg = config.load(None, [*TINY, "rounds=1", "cluster.workers=3", "cluster.heartbeat_s=30",
                             "cluster.round_deadline_s=120"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0)
    sessions = []
    try:
        sessions = [connect(server.port, cid) for cid in range(3)]
        _wait(lambda: server.coord.ticket is not None, "round 1 did not open")
        state0 = server.coord.state
        sent = {}
        for s in sessions:
            assignment, tensors = fetch(s, wait_s=60)
            assert assignment.round == 1
            sent[s.client_id] = _small(tensors, s.client_id)
        ticket = server.coord.ticket
        for s in sessions[:2]:
            s.stub.SubmitUpdate(update_stream(s, 1, s.client_id, sent[s.client_id]),
                                timeout=60)
        # the driver takes clients 0 and 1 in while client 2's update has not been sent
        _wait(lambda: ticket.early is not None and ticket.early.aggregation is not None
              and ticket.early.aggregation.client_ids == [0, 1],
              "the first two updates were not averaged before the third arrived")
        assert not server.driver.records
        s = sessions[2]
        s.stub.SubmitUpdate(update_stream(s, 1, 2, sent[2]), timeout=60)
        _wait(server.driver.done.is_set, "the run did not finish")
        assert server.driver.error is None, server.driver.error
        (rec,) = server.driver.records
        assert rec["aggregated_early"] == 2
        # the same bits as averaging all three at the end
        plans = {t.plan.client_id: t.plan for t in ticket.tasks.values()}
        expected, _ = server.coord.job.engine.server_step(
            state0, [(plans[c], _as_update(1, c, sent[c])) for c in range(3)])
        _same(server.coord.state, expected)
    finally:
        for s in sessions:
            s.close()
        server.stop(grace=0)
