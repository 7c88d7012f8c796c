"""Worker side of the wire: rabo.v1 messages to and from rabo types (the one place)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from rabo.engine import Assignment, ClientHyper, Update
from rabo.masks import MaskSpec
from rabo.wireformat import WireFormatError
from rabo_proto.codec import Encoded, WireError, WireTensor
from rabo_proto.stream import payload_stream
from rabo_proto.v1 import rabo_pb2 as pb


def assignment_from_wire(msg: pb.Assignment, tensors: Sequence[WireTensor],
                         hyper: ClientHyper) -> Assignment:
    """``hyper``: the client settings of the job (from the config received at registration;
    the assignment does not repeat them)."""
    m = msg.mask
    try:
        mask = MaskSpec(policy=m.policy, ratio=m.ratio, round=m.round, seed=m.seed,
                        stride=m.stride, sweep_rounds=m.sweep_rounds,
                        layer_shift=m.layer_shift)
    except ValueError as exc:
        raise WireError(f"assignment mask: {exc}", "mask") from None
    parts: dict[str, dict] = {"x": {}, "y": {}, "v": {}}
    for t in tensors:
        parts[t.part][t.name] = t.tensor
    try:  # int8 decoded here, so that a bad payload is a protocol error, not a crash
        parts = {p: hyper.wire.received(values) for p, values in parts.items()}
    except WireFormatError as exc:
        raise WireError(f"assignment: {exc}", "invalid-payload") from None
    return Assignment(round=msg.round, client_id=msg.client_id, mask=mask, hyper=hyper,
                      x=parts["x"], y=parts["y"], v=parts["v"])


def update_messages(update: Update, worker_id: str, credential: str, chunk_bytes: int,
                    receive_s: float) -> tuple[Encoded, Iterator[bytes | pb.UpdateMessage]]:
    tensors = ([WireTensor("x", k, t) for k, t in update.x.items()]
               + [WireTensor("y", k, t) for k, t in update.y.items()]
               + [WireTensor("v", k, t) for k, t in update.v.items()])
    encoded = Encoded(update.round, worker_id, tensors, chunk_bytes)
    header = pb.UpdateHeader(
        worker_id=worker_id, credential=credential, round=update.round,
        client_id=update.client_id, payload=encoded.header,
        measurements=pb.Measurements(compute_s=update.compute_s,
                                     peak_mem_bytes=update.peak_mem_bytes,
                                     samples=update.samples, upper_loss=update.upper_loss,
                                     receive_s=receive_s))
    return encoded, payload_stream(pb.UpdateMessage(header=header), encoded, pb.UpdateMessage)
