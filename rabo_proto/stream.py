"""The gRPC service with raw payload messages: handlers for a servicer and a client stub.

The unary methods use their protobuf messages as generated. The two streaming methods carry
a payload's bytes as raw messages: ``FetchAssignment`` streams an ``AssignmentMessage`` (the
assignment, a wait or finished), then, after an assignment, its payload's raw chunks and an
``AssignmentMessage`` holding the trailer; ``SubmitUpdate`` streams an ``UpdateMessage`` with
the header, the raw chunks and an ``UpdateMessage`` with the trailer. Which message is
which follows from the stream's position (the header announces ``total_bytes``), so a chunk
needs no tag and no protobuf around it: the sender hands gRPC the bytes it made from the
tensors, the receiver copies what gRPC gives it once, into the payload's buffer.

Hence the codecs here: a stream item is ``bytes`` (a raw chunk, passed through) or a protobuf
message (serialized); a received streaming message is handed over as ``bytes`` and parsed by
:func:`parse` where the position says it is a protobuf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import Message

from rabo_proto.codec import (  # parse and parse_trailer: re-exported for stream readers
    Assembler,
    BufferPool,
    Encoded,
    WireTensor,
    check_header,
    parse,
    parse_trailer,
)
from rabo_proto.v1 import rabo_pb2 as pb

SERVICE = "rabo.v1.Coordinator"
__all__ = ["CoordinatorStub", "add_servicer", "parse", "parse_trailer", "payload_stream",
           "receive_payload", "serialize"]


def _raw(data: bytes) -> bytes:
    return data


def serialize(item: bytes | Message) -> bytes:
    """A stream item on the wire: raw bytes as they are, a protobuf message serialized."""
    if isinstance(item, bytes):
        return item
    return item.SerializeToString()


def add_servicer(servicer: Any, server: Any) -> None:
    """Register ``servicer`` (Register, Heartbeat, FetchAssignment, SubmitUpdate, Leave; sync
    or ``grpc.aio``) on ``server`` with the codecs above."""
    handlers = {
        "Register": grpc.unary_unary_rpc_method_handler(
            servicer.Register, request_deserializer=pb.RegisterRequest.FromString,
            response_serializer=pb.RegisterReply.SerializeToString),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(
            servicer.Heartbeat, request_deserializer=pb.HeartbeatRequest.FromString,
            response_serializer=pb.HeartbeatReply.SerializeToString),
        "FetchAssignment": grpc.unary_stream_rpc_method_handler(
            servicer.FetchAssignment, request_deserializer=pb.FetchRequest.FromString,
            response_serializer=serialize),
        "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.SubmitUpdate, request_deserializer=_raw,
            response_serializer=pb.SubmitReply.SerializeToString),
        "Leave": grpc.unary_unary_rpc_method_handler(
            servicer.Leave, request_deserializer=pb.LeaveRequest.FromString,
            response_serializer=pb.LeaveReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class CoordinatorStub:
    """The client side: ``FetchAssignment`` yields ``bytes`` (parse the first with
    :func:`parse`), ``SubmitUpdate`` takes an iterator of ``bytes`` and messages."""

    def __init__(self, channel: grpc.Channel) -> None:
        def unary(name: str, req: type[Message], rep: type[Message]) -> Callable[..., Any]:
            return channel.unary_unary(f"/{SERVICE}/{name}",
                                       request_serializer=req.SerializeToString,
                                       response_deserializer=rep.FromString)

        self.Register = unary("Register", pb.RegisterRequest, pb.RegisterReply)
        self.Heartbeat = unary("Heartbeat", pb.HeartbeatRequest, pb.HeartbeatReply)
        self.Leave = unary("Leave", pb.LeaveRequest, pb.LeaveReply)
        self.FetchAssignment = channel.unary_stream(
            f"/{SERVICE}/FetchAssignment", request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=_raw)
        self.SubmitUpdate = channel.stream_unary(
            f"/{SERVICE}/SubmitUpdate", request_serializer=serialize,
            response_deserializer=pb.SubmitReply.FromString)


def receive_payload(header: pb.PayloadHeader, messages: Iterator[bytes], max_chunk_bytes: int,
                    cls: type[pb.AssignmentMessage] | type[pb.UpdateMessage],
                    check_finite: bool = True, pool: BufferPool | None = None,
                    decode: bool = True) -> tuple[list[WireTensor], Assembler]:
    """Read a payload's raw chunks and trailer from a synchronous stream (the header has
    been read); the stream must end after the trailer. ``pool``: where the receive buffer
    comes from (``codec.BufferPool``). ``decode=False``: every check, but no tensors (for a
    process that moves bytes only)."""
    check_header(header, None, max_total_bytes=1 << 40)
    assembler = Assembler(header, max_chunk_bytes=max(max_chunk_bytes, 1), pool=pool)
    for data in messages:
        assembler.accept(data, cls)
    return assembler.finish(assembler.trailer, check_finite=check_finite,
                            decode=decode), assembler


def payload_stream(first: Message, encoded: Encoded,
                   cls: type[pb.AssignmentMessage] | type[pb.UpdateMessage]
                   ) -> Iterator[bytes | Message]:
    """``first`` (the header message), the payload's raw chunks, then its trailer."""
    yield first
    yield from encoded.chunks()
    yield cls(trailer=encoded.trailer())
