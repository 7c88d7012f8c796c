"""Encode once, send many: assignments that several workers of a round receive are encoded
once, streamed from the same chunks, and never held past their last receiver."""

from __future__ import annotations

import threading

import torch

from coordinator.payloads import SharedPayloads, full_payload_bytes, payload_bytes
from coordinator.wire import encode_assignment
from rabo import config
from rabo.job import Job
from rabo_proto.codec import Assembler

BASE = ["data.dataset=digits", "model.hidden=[32, 16]", "clients.count=5"]


def _rig(policy: str, top: float = 1.0):
    job = Job.from_config(config.load(None, [*BASE, f"mask.policy={policy}"]))
    state = job.engine.init_state()
    ratios = {"w0": top, "w1": top, "w2": top, "w3": 0.5, "w4": 0.25}
    plans = {w: job.engine.plan(3, cid, r) for cid, (w, r) in enumerate(ratios.items())}
    return job, state, plans


def _encoder(job, state, plans, wid, calls):
    def encode():
        calls.append(wid)
        return encode_assignment(job.engine.assign(state, plans[wid], copy=False), wid, 256)
    return encode


def _decoded(encoded):
    asm = Assembler(encoded.header, 256)
    for c in encoded.chunks():
        asm.add(c)
    return [t.tensor for t in asm.finish(encoded.trailer())]


def test_workers_with_the_same_slices_share_one_encoding() -> None:
    job, state, plans = _rig("static")
    shared = SharedPayloads(job.engine, state, plans.items(), full_payload_bytes(job))
    assert shared.kept == 1  # the three ratio-1 workers; 0.5 and 0.25 are alone
    calls: list[str] = []
    got = {w: shared.get(w, _encoder(job, state, plans, w, calls)) for w in plans}
    assert calls == ["w0", "w3", "w4"]  # w1 and w2 streamed w0's chunks
    assert got["w0"] is got["w1"] is got["w2"] and got["w3"] is not got["w0"]
    assert shared.encodings == 1 and shared.kept == 0  # dropped after its last receiver
    # each receiver gets its own header, the same bytes, and the values of its plan
    assert got["w1"].header_for("w1").worker_id == "w1"
    want = job.engine.assign(state, plans["w2"])
    assert all(torch.equal(a, b) for a, b in zip(
        _decoded(got["w2"]), [*want.x.values(), *want.y.values(), *want.v.values()],
        strict=True))


def test_per_client_masks_share_nothing_and_the_budget_bounds_what_is_kept() -> None:
    # a mask per client: below ratio 1 no two payloads are equal (at ratio 1 all keep all)
    job, state, plans = _rig("random", top=0.5)
    assert SharedPayloads(job.engine, state, plans.items(), full_payload_bytes(job)).kept == 0
    job, state, plans = _rig("random")
    assert SharedPayloads(job.engine, state, plans.items(), full_payload_bytes(job)).kept == 1
    job, state, plans = _rig("static")
    # less than one ratio-1 payload may be kept: the ratio-1 workers encode their own
    small = SharedPayloads(job.engine, state, plans.items(), payload_bytes(plans["w0"]) - 1)
    assert small.kept == 0
    calls: list[str] = []
    for w in plans:
        small.get(w, _encoder(job, state, plans, w, calls))
    assert calls == list(plans)


def test_concurrent_receivers_wait_for_one_encoding() -> None:
    job, state, plans = _rig("static")
    shared = SharedPayloads(job.engine, state, plans.items(), full_payload_bytes(job))
    calls: list[str] = []
    start = threading.Barrier(3)
    out: dict[str, object] = {}

    def fetch(w: str) -> None:
        start.wait()
        out[w] = shared.get(w, _encoder(job, state, plans, w, calls))

    threads = [threading.Thread(target=fetch, args=(w,)) for w in ("w0", "w1", "w2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and out["w0"] is out["w1"] is out["w2"]
