"""A worker that computes nothing: the transport benchmark's and the scale test's client.

It speaks the real protocol over a real channel (register, heartbeat, long-poll, receive and
checksum every chunk, stream an update back) but answers each assignment with zero-valued
tensors of the shapes the coordinator expects, so a run measures the system, not the model.
It imports neither torch nor rabo, so dozens of them fit on one machine.

    python -m worker.echo --coordinator HOST:PORT [--client-id N]
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

import grpc

from rabo.errors import ExitCode
from rabo_proto import PROTOCOL_VERSION
from rabo_proto.codec import BufferPool, WireError, crc32c
from rabo_proto.stream import CoordinatorStub, parse, receive_payload
from rabo_proto.v1 import rabo_pb2 as pb
from worker.backoff import Backoff

log = logging.getLogger("rabo.echo")
_ZEROS = bytes(1 << 20)


def _zero_payload(header: pb.UpdateHeader, chunk_bytes: int):
    """The update stream: the header, raw zero chunks, the trailer with their CRC-32C."""
    yield pb.UpdateMessage(header=header)
    total, offset, crc = header.payload.total_bytes, 0, 0
    while offset < total:
        n = min(chunk_bytes, total - offset)
        data = _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
        crc = crc32c(data, crc)
        yield data
        offset += n
    yield pb.UpdateMessage(trailer=pb.PayloadTrailer(crc32c=crc))


def run(target: str, client_id: int, name: str, max_message_bytes: int, poll_s: float) -> int:
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes)]
    buffers = BufferPool(2 << 30)  # as the worker's (worker.client.RECEIVE_POOL_BYTES)
    with grpc.insecure_channel(target, options=options) as channel:
        stub = CoordinatorStub(channel)
        profile = pb.ResourceProfile(hostname=name, logical_cpus=1, usable_cpus=1.0,
                                     memory_budget_bytes=1 << 40, device="cpu",
                                     budget_source="echo worker", flops_per_s=0.0)
        request = pb.RegisterRequest(name=name, profile=profile, client_id=client_id,
                                     protocol=PROTOCOL_VERSION)
        backoff = Backoff(initial=0.2, cap=5.0)
        while True:
            try:
                reply = stub.Register(request, timeout=60.0, wait_for_ready=True)
                break
            except grpc.RpcError as exc:
                # registrations are rate limited per peer: back off and retry, as the real
                # worker does (worker.client)
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # type: ignore[attr-defined]
                    raise
                time.sleep(backoff.next_delay())
        wid, cred = reply.worker_id, reply.credential
        stop = threading.Event()

        def heartbeats() -> None:
            while not stop.wait(reply.heartbeat_s):
                try:
                    if stub.Heartbeat(pb.HeartbeatRequest(worker_id=wid, credential=cred),
                                      timeout=10.0).finished:
                        return
                except grpc.RpcError:
                    pass

        threading.Thread(target=heartbeats, daemon=True).start()
        last = 0
        try:
            while True:
                call = stub.FetchAssignment(pb.FetchRequest(worker_id=wid, credential=cred,
                                                            after_round=last, wait_s=poll_s))
                first = parse(next(call), pb.AssignmentMessage, "the coordinator's answer")
                kind = first.WhichOneof("body")
                if kind == "finished":
                    return 0
                if kind != "assignment":
                    continue
                a = first.assignment
                start = time.perf_counter()
                try:  # received and checked as a worker receives it, but not decoded
                    receive_payload(a.payload, call, reply.chunk_bytes, pb.AssignmentMessage,
                                    check_finite=False, pool=buffers, decode=False)
                except WireError as exc:
                    log.error("round %d: bad assignment payload: %s", a.round, exc)
                    return ExitCode.PROTOCOL
                receive_s = time.perf_counter() - start
                # the update holds the same tensors as the assignment: x, y and v slices
                payload = pb.PayloadHeader(round=a.round, worker_id=wid,
                                           tensors=a.payload.tensors,
                                           total_bytes=a.payload.total_bytes)
                header = pb.UpdateHeader(
                    worker_id=wid, credential=cred, round=a.round, client_id=a.client_id,
                    payload=payload, measurements=pb.Measurements(samples=1,
                                                                  receive_s=receive_s))
                stub.SubmitUpdate(_zero_payload(header, reply.chunk_bytes),
                                  timeout=max(60.0, a.deadline_s))
                last = a.round
        finally:
            stop.set()


def _die_with_parent() -> None:
    """rabo.runtime.die_with_parent without importing rabo (and so torch)."""
    import ctypes
    import os
    import signal

    expected = os.environ.get("RABO_DIE_WITH_PARENT")
    if not expected or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    p = argparse.ArgumentParser(prog="python -m worker.echo")
    p.add_argument("--coordinator", required=True)
    p.add_argument("--client-id", type=int, default=-1)
    p.add_argument("--name", default="echo")
    p.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--poll-s", type=float, default=5.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    try:
        return run(args.coordinator, args.client_id, args.name, args.max_message_bytes,
                   args.poll_s)
    except grpc.RpcError as exc:
        log.error("coordinator: %s: %s", exc.code().name, exc.details())  # type: ignore[attr-defined]
        return 3


if __name__ == "__main__":
    sys.exit(main())
