"""Coordinator side of the wire: rabo types to and from rabo.v1 messages (the one place)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rabo.engine import Assignment, ClientPlan, Update
from rabo.masks import MaskSpec
from rabo.policy import Resources
from rabo.wireformat import FLOAT32, WireFormat, WireFormatError
from rabo_proto.codec import Encoded, WireError, WireTensor, tensor_meta
from rabo_proto.v1 import rabo_pb2 as pb


def mask_to_pb(mask: MaskSpec) -> pb.MaskSpec:
    return pb.MaskSpec(policy=mask.policy, ratio=mask.ratio, round=mask.round, seed=mask.seed,
                       stride=mask.stride, sweep_rounds=mask.sweep_rounds,
                       layer_shift=mask.layer_shift)


def encode_assignment(a: Assignment, worker_id: str, chunk_bytes: int) -> Encoded:
    tensors = ([WireTensor("x", k, t) for k, t in a.x.items()]
               + [WireTensor("y", k, t) for k, t in a.y.items()]
               + [WireTensor("v", k, t) for k, t in a.v.items()])
    return Encoded(a.round, worker_id, tensors, chunk_bytes)


def assignment_header(a: Assignment, payload: pb.PayloadHeader, deadline_s: float, reason: str
                      ) -> pb.AssignmentMessage:
    return pb.AssignmentMessage(assignment=pb.Assignment(
        round=a.round, client_id=a.client_id, mask=mask_to_pb(a.mask),
        payload=payload, deadline_s=deadline_s, reason=reason))


def expected_update(plan: ClientPlan, fmt: WireFormat = FLOAT32) -> list[pb.TensorMeta]:
    """The tensors (names, shapes, dtypes) an update for ``plan`` in ``fmt`` must hold, in
    order (int8: each tensor's codes followed by its block scales)."""
    return [tensor_meta(part, n, dtype, s)
            for part, shapes in (("x", plan.x.shapes), ("y", plan.y.shapes),
                                 ("v", plan.y.shapes))
            for n, dtype, s in fmt.layout(shapes)]


def update_from_wire(header: pb.UpdateHeader, tensors: Sequence[WireTensor],
                     fmt: WireFormat = FLOAT32) -> Update:
    """The update a header and its tensors (checked against :func:`expected_update`) hold, as
    the coordinator keeps it (int8 decoded to float32)."""
    m = header.measurements
    for name, value in (("compute_s", m.compute_s), ("upper_loss", m.upper_loss),
                        ("receive_s", m.receive_s)):
        if not math.isfinite(value) or (name != "upper_loss" and value < 0):
            raise WireError(f"measurement {name} = {value} is not a finite, non-negative "
                            f"number", "measurement")
    if m.samples < 0:
        raise WireError(f"measurement samples = {m.samples} is negative", "measurement")
    parts: dict[str, dict[str, torch.Tensor]] = {"x": {}, "y": {}, "v": {}}
    for t in tensors:
        parts[t.part][t.name] = t.tensor
    update = Update(round=header.round, client_id=header.client_id, x=parts["x"],
                    y=parts["y"], v=parts["v"], samples=int(m.samples),
                    upper_loss=float(m.upper_loss), compute_s=float(m.compute_s),
                    peak_mem_bytes=int(m.peak_mem_bytes))
    try:
        return update.received(fmt)
    except WireFormatError as exc:
        raise WireError(f"update: {exc}", "invalid-payload") from None


def resources_of(profile: pb.ResourceProfile) -> Resources:
    return Resources(memory_budget_bytes=int(profile.memory_budget_bytes),
                     flops_per_s=float(profile.flops_per_s))
