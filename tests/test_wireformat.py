"""Wire forms of the slices (rabo.wireformat): int8 block quantization, its validation, and
error feedback across changing masks; the byte layouts the transports move."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.wire import expected_update, update_from_wire
from rabo import config
from rabo.dist import pack, plan_layouts, plan_nbytes, unpack
from rabo.job import Job
from rabo.masks import MaskSpec
from rabo.wireformat import (
    SCALE,
    ClientResiduals,
    ErrorFeedback,
    WireFormat,
    WireFormatError,
    dequantize,
    quantize,
)
from rabo_proto.codec import WireError, WireTensor
from rabo_proto.v1 import rabo_pb2 as pb

INT8 = WireFormat("int8", block=64)


def test_int8_rounds_each_entry_to_within_half_its_blocks_step() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(7, 33, generator=g) * torch.logspace(-3, 2, 33)  # scales differ by 1e5
    codes, scales = quantize(t, 64)
    assert codes.dtype == torch.int8 and codes.shape == t.shape
    assert scales.shape == (math.ceil(t.numel() / 64),)
    back = dequantize(codes, scales, 64)
    step = scales.repeat_interleave(64)[:t.numel()].view(t.shape)
    assert bool(((back - t).abs() <= step / 2 + 1e-7).all())
    assert int(codes.abs().max()) == 127  # each block's largest entry is exact
    assert float((back - t).abs().max()) > 0  # and the others are rounded


def test_a_zero_or_empty_tensor_survives() -> None:
    for t in (torch.zeros(5, 3), torch.zeros(0, 4)):
        codes, scales = quantize(t, 8)
        assert torch.equal(dequantize(codes, scales, 8), t)


def test_int8_costs_about_a_quarter_of_float32() -> None:
    shapes = {"w": (256, 512), "b": (512,)}
    f32, i8 = WireFormat(), WireFormat("int8")  # block 256
    assert f32.nbytes(shapes) == 4 * (256 * 512 + 512)
    ratio = i8.nbytes(shapes) / f32.nbytes(shapes)
    assert ratio == pytest.approx((1 + 4 / 256) / 4, rel=1e-3)  # 0.254
    assert WireFormat("bfloat16").nbytes(shapes) * 2 == f32.nbytes(shapes)


@pytest.mark.parametrize("bad, message", [
    (lambda w: w.pop("a" + SCALE), "without their scales"),
    (lambda w: w.__setitem__("a" + SCALE, -w["a" + SCALE]), "negative"),
    (lambda w: w["a" + SCALE].__setitem__(0, float("nan")), "not finite"),
    (lambda w: w.__setitem__("a" + SCALE, w["a" + SCALE][:-1]), "block scales expected"),
    (lambda w: w.__setitem__("z" + SCALE, torch.ones(1)), "of no tensor"),
])
def test_a_bad_int8_payload_is_refused_with_what_is_wrong(bad, message: str) -> None:
    wire = INT8.encode({"a": torch.randn(200)})
    bad(wire)
    with pytest.raises(WireFormatError, match=message):
        INT8.decode(wire)


def test_error_feedback_delivers_what_rounding_alone_never_sends() -> None:
    """Entries far below their block's step are rounded to 0 every round without feedback;
    with it their residual grows until it is sent, so the sum of what arrived equals the sum of
    the updates less the final residual (exactly: nothing is lost, only delayed)."""
    job = Job.from_config(config.load(None, ["data.dataset=digits", "model.hidden=[8]"]))
    task = job.task
    xp = task.x_plan(MaskSpec("static", 1.0, 0), 0)
    shapes = xp.shapes
    update = {n: torch.full(s, 1e-3) for n, s in shapes.items()}
    for n in update:  # a large entry per block sets the block's step near 1/127
        update[n].view(-1)[::INT8.block] = 1.0
    fb, sent, plain = ErrorFeedback(), {n: torch.zeros(s) for n, s in shapes.items()}, {}
    rounds = 20
    for _ in range(rounds):
        arrived = INT8.decode(fb.encode(INT8, "x", update, xp))
        sent = {n: sent[n] + arrived[n] for n in sent}
        plain = INT8.decode(INT8.encode(update))
    total = {n: rounds * u for n, u in update.items()}
    for n in shapes:
        residual = fb.residuals["x"][n]
        assert torch.allclose(sent[n] + residual, total[n], atol=1e-5)
        is_small = torch.arange(update[n].numel()) % INT8.block != 0
        if bool(is_small.any()):
            assert float(plain[n].view(-1)[is_small].abs().max()) == 0.0  # rounding: nothing
            # feedback: most of it arrived
            assert float(sent[n].view(-1)[is_small].min()) > 0.5 * rounds * 1e-3
    assert fb.norm() > 0


def test_residuals_live_in_full_coordinates_across_rolling_masks() -> None:
    """A coordinate outside this round's slice keeps its residual until the client covers it
    again; the residual of a covered coordinate is what its last rounding left out."""
    job = Job.from_config(config.load(None, ["data.dataset=digits", "model.hidden=[32]"]))
    task = job.task
    fb = ErrorFeedback()
    g = torch.Generator().manual_seed(1)
    plans = [task.y_plan(MaskSpec("rolling", 0.25, r, stride=8)) for r in (1, 2)]
    for p in plans:
        assert any(not p.whole[n] for n in p.shapes)
    u1 = {n: torch.randn(s, generator=g) for n, s in plans[0].shapes.items()}
    wire1 = fb.encode(INT8, "y", u1, plans[0])
    after1 = {n: t.clone() for n, t in fb.residuals["y"].items()}
    u2 = {n: torch.randn(s, generator=g) for n, s in plans[1].shapes.items()}
    fb.encode(INT8, "y", u2, plans[1])
    from rabo.submodel import extract, scatter

    zeros = {n: torch.zeros(s) for n, s in plans[0].full_shapes.items()}
    r1 = scatter(zeros, plans[0], {n: u1[n] - INT8.decode(wire1)[n] for n in u1})
    for n in after1:
        assert torch.allclose(after1[n], r1[n], atol=1e-6)
    covered2 = scatter({n: torch.zeros_like(t) for n, t in zeros.items()}, plans[1],
                       {n: torch.ones(s) for n, s in plans[1].shapes.items()})
    for n, t in fb.residuals["y"].items():  # round 1's residual where round 2 did not reach
        outside = covered2[n] == 0
        assert torch.equal(t[outside], after1[n][outside])
    again = extract(fb.residuals["y"], plans[1])
    assert all(float(t.abs().max()) > 0 for t in again.values() if t.numel() > 1)


def test_residuals_exist_only_for_int8_with_feedback() -> None:
    store = ClientResiduals()
    assert store.of(WireFormat("bfloat16"), 0) is None
    assert store.of(WireFormat("int8", error_feedback=False), 0) is None
    fb = store.of(WireFormat("int8"), 3)
    assert fb is not None and store.of(WireFormat("int8"), 3) is fb
    store.clear()
    assert store.of(WireFormat("int8"), 3) is not fb


def test_pack_and_unpack_carry_int8_codes_and_misaligned_scales() -> None:
    """torch.distributed moves one byte buffer: int8 codes of odd length put the float32
    scales after them off their alignment, and they still come back bit for bit."""
    job = Job.from_config(config.load(None, ["data.dataset=digits", "model.hidden=[7]",
                                             "wire.dtype=int8", "wire.block=16"]))
    engine = job.engine
    plan = engine.plan(1, 0, 0.5)
    a = engine.assign(engine.init_state(), plan)
    fmt = engine.hyper.wire
    buf = pack([a.x, a.y, a.v], torch.device("cpu"))
    assert buf.dtype == torch.uint8 and buf.numel() == plan_nbytes(plan, fmt)
    for got, want in zip(unpack(buf, plan_layouts(plan, fmt)), (a.x, a.y, a.v), strict=True):
        assert list(got) == list(want)
        for n in want:
            assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n])


def test_the_coordinator_refuses_an_int8_update_with_negative_scales() -> None:
    job = Job.from_config(config.load(None, ["data.dataset=digits", "model.hidden=[8]",
                                             "wire.dtype=int8"]))
    engine = job.engine
    plan = engine.plan(1, 0, 1.0)
    fmt = engine.hyper.wire
    metas = expected_update(plan, fmt)
    assert [m.dtype for m in metas[:2]] == [pb.INT8, pb.FLOAT32]
    assert metas[1].name == metas[0].name + SCALE
    a = engine.assign(engine.init_state(), plan)
    tensors = [WireTensor(p, n, t) for p, part in (("x", a.x), ("y", a.y), ("v", a.v))
               for n, t in part.items()]
    header = pb.UpdateHeader(round=1, client_id=0, measurements=pb.Measurements(samples=1))
    upd = update_from_wire(header, tensors, fmt)
    assert all(t.dtype == torch.float32 for t in upd.x.values())
    assert SCALE not in "".join(upd.x)
    name = next(n for n in a.x if not n.endswith(SCALE))
    hostile = [WireTensor(t.part, t.name, -t.tensor) if t.name == name + SCALE and t.part == "x"
               else t for t in tensors]
    with pytest.raises(WireError, match="negative"):
        update_from_wire(header, hostile, fmt)
