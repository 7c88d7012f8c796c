"""Helpers for tests that talk to a real coordinator over a real socket on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import torch

from rabo_proto import PROTOCOL_VERSION
from rabo_proto.codec import Encoded, WireTensor
from rabo_proto.stream import CoordinatorStub, parse, receive_payload
from rabo_proto.v1 import rabo_pb2 as pb


@dataclass
class Session:
    stub: CoordinatorStub
    channel: grpc.Channel
    worker_id: str
    credential: str
    client_id: int
    chunk_bytes: int

    def close(self) -> None:
        self.channel.close()


def connect(port: int, client_id: int = -1, budget: int = 1 << 34) -> Session:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = CoordinatorStub(channel)
    profile = pb.ResourceProfile(hostname="test", memory_budget_bytes=budget, device="cpu",
                                 flops_per_s=1e9)
    try:
        reply = stub.Register(pb.RegisterRequest(name="test", profile=profile,
                                                 client_id=client_id, protocol=PROTOCOL_VERSION),
                              timeout=30, wait_for_ready=True)
    except BaseException:
        channel.close()  # a refused registration must not leave a live channel behind
        raise
    return Session(stub, channel, reply.worker_id, reply.credential, reply.client_id,
                   reply.chunk_bytes)


def fetch(s: Session, after_round: int = 0, wait_s: float = 30.0
          ) -> tuple[pb.Assignment, list[WireTensor]]:
    call = s.stub.FetchAssignment(pb.FetchRequest(worker_id=s.worker_id, credential=s.credential,
                                                  after_round=after_round, wait_s=wait_s),
                                  timeout=wait_s + 10)
    first = parse(next(call), pb.AssignmentMessage, "answer")
    assert first.WhichOneof("body") == "assignment", first
    tensors, _ = receive_payload(first.assignment.payload, call, s.chunk_bytes,
                                 pb.AssignmentMessage)
    return first.assignment, tensors


def zero_update(tensors: list[WireTensor]) -> list[WireTensor]:
    """An update with the assignment's tensors (x: hypergradient, y/v: deltas), all zero."""
    return [WireTensor(t.part, t.name, torch.zeros_like(t.tensor)) for t in tensors]


def update_stream(s: Session, round_: int, client_id: int, tensors: list[WireTensor],
                  chunk_bytes: int | None = None, worker_id: str | None = None,
                  credential: str | None = None, mutate_chunks=None, mutate_header=None,
                  trailer: bool = True, crc32c: int | None = None, peak_mem_bytes: int = 0
                  ) -> Iterator[bytes | pb.UpdateMessage]:
    """The update stream: its header, raw chunks (``mutate_chunks`` edits the list of bytes),
    then the trailer (left out with ``trailer=False``; ``crc32c`` replaces its checksum)."""
    wid = worker_id if worker_id is not None else s.worker_id
    enc = Encoded(round_, wid, tensors, chunk_bytes or s.chunk_bytes)
    header = pb.UpdateHeader(worker_id=wid,
                             credential=credential if credential is not None else s.credential,
                             round=round_, client_id=client_id, payload=enc.header,
                             measurements=pb.Measurements(compute_s=0.1, samples=10,
                                                          upper_loss=1.0,
                                                          peak_mem_bytes=peak_mem_bytes))
    if mutate_header:
        mutate_header(header)
    chunks = list(enc.chunks())
    if mutate_chunks:
        chunks = mutate_chunks(chunks)
    yield pb.UpdateMessage(header=header)
    yield from chunks
    if trailer:
        t = enc.trailer()
        if crc32c is not None:
            t.crc32c = crc32c
        yield pb.UpdateMessage(trailer=t)




def first_message(call) -> pb.AssignmentMessage:
    """The first message of a FetchAssignment stream (an assignment, a wait or finished)."""
    return parse(next(call), pb.AssignmentMessage, "answer")
