"""Hostile input: random and mutated messages at every RPC.

In process, hypothesis drives the servicer's coroutines directly: every call either returns
or ends with a gRPC status (never another exception), and the global model never changes.
Over a real socket, a bounded run of random bytes at every method of a live coordinator:
every call gets a status, and the coordinator stays healthy and unchanged.
"""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.rounds import RoundDriver
from coordinator.server import serve
from coordinator.servicer import CoordinatorServicer
from coordinator.state import Coordinator
from rabo import config
from rabo.job import Job
from rabo_proto import PROTOCOL_VERSION
from rabo_proto.codec import Encoded, WireTensor
from rabo_proto.v1 import rabo_pb2 as pb

CFG = ["data.dataset=digits", "model.hidden=[12]", "clients.count=2", "rounds=1",
       "clients.ratios=[0.5]", "cluster.chunk_bytes=1024", "cluster.register_rate_per_s=1000000"]
METHODS = ["Register", "Heartbeat", "FetchAssignment", "SubmitUpdate", "Leave"]


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details


class FakeContext:
    """What the servicer uses of ``grpc.aio.ServicerContext``."""

    async def abort(self, code: grpc.StatusCode, details: str, trailing=()) -> None:
        raise Aborted(code, details)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def auth_context(self) -> dict:
        return {}


def run(coro):
    return asyncio.run(coro)


async def _stream(messages: list):
    for m in messages:
        yield m


@pytest.fixture(scope="module")
def rig():
    cfg = config.load(None, CFG)
    coord = Coordinator(cfg, Job.from_config(cfg), None)
    servicer = CoordinatorServicer(coord)
    reg = run(servicer.Register(pb.RegisterRequest(name="w", client_id=0,
                                                   protocol=PROTOCOL_VERSION,
                                                   profile=pb.ResourceProfile()),
                                FakeContext()))
    ticket = RoundDriver(coord, None).open_round(1)
    task = ticket.tasks[reg.worker_id]
    a = coord.job.engine.assign(coord.state, task.plan)
    tensors = ([WireTensor("x", k, torch.zeros_like(t)) for k, t in a.x.items()]
               + [WireTensor("y", k, torch.zeros_like(t)) for k, t in a.y.items()]
               + [WireTensor("v", k, torch.zeros_like(t)) for k, t in a.v.items()])
    enc = Encoded(1, reg.worker_id, tensors, 1024)
    header = pb.UpdateHeader(worker_id=reg.worker_id, credential=reg.credential, round=1,
                             client_id=reg.client_id, payload=enc.header,
                             measurements=pb.Measurements(samples=1))
    # the stream as the wire carries it: the header, raw chunks, the trailer
    valid = [pb.UpdateMessage(header=header).SerializeToString(), *enc.chunks(),
             pb.UpdateMessage(trailer=enc.trailer()).SerializeToString()]
    snapshot = {k: t.clone() for k, t in coord.state.x.items()}
    return coord, servicer, reg, valid, snapshot


async def _call_async(servicer, method: str, messages: list) -> None:
    ctx = FakeContext()
    try:
        if method == "SubmitUpdate":
            await servicer.SubmitUpdate(_stream(messages), ctx)
        elif method == "FetchAssignment":
            async for _ in servicer.FetchAssignment(messages[0], ctx):
                pass
        else:
            await getattr(servicer, method)(messages[0], ctx)
    except Aborted as exc:
        assert isinstance(exc.code, grpc.StatusCode) and exc.details


def _call(servicer, method: str, messages: list) -> None:
    run(_call_async(servicer, method, messages))


def _parse(cls, data: bytes):
    try:
        return cls.FromString(data)
    except Exception:  # noqa: BLE001 - undecodable bytes never reach a servicer
        return None


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(3)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):][: rng.randint(1, 16)]
        else:
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(b)


REQUEST = {"Register": pb.RegisterRequest, "Heartbeat": pb.HeartbeatRequest,
           "FetchAssignment": pb.FetchRequest, "Leave": pb.LeaveRequest}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(METHODS), seed=st.integers(0, 2**32 - 1),
       raw=st.binary(max_size=200))
def test_servicer_survives_random_and_mutated_messages(rig, method, seed, raw) -> None:
    coord, servicer, reg, valid, snapshot = rig
    rng = random.Random(seed)
    if method == "SubmitUpdate":
        stream = [_mutate(m, rng) if rng.random() < 0.3 else m for m in valid]
        if rng.random() < 0.3:
            stream = stream[: rng.randrange(len(stream) + 1)]
        if rng.random() < 0.2:
            stream.insert(rng.randrange(len(stream) + 1), raw)
        messages = stream  # the servicer reads raw messages, garbage included
    else:
        base = {"Register": pb.RegisterRequest(name="x", protocol=PROTOCOL_VERSION, client_id=1),
                "Heartbeat": pb.HeartbeatRequest(worker_id=reg.worker_id,
                                                 credential=reg.credential),
                "FetchAssignment": pb.FetchRequest(worker_id=reg.worker_id,
                                                   credential=reg.credential, wait_s=0.0),
                "Leave": pb.LeaveRequest(worker_id="nobody")}[method].SerializeToString()
        data = _mutate(base, rng) if rng.random() < 0.7 else raw
        msg = _parse(REQUEST[method], data)
        if msg is None:
            return
        if method == "Leave" and msg.worker_id == reg.worker_id:
            return  # a real goodbye of our worker would change the rig for later examples
        if method == "FetchAssignment":
            msg.wait_s = 0.0  # do not long-poll in a fuzz loop
        messages = [msg]
    _call(servicer, method, messages)
    assert all(torch.equal(coord.state.x[k], snapshot[k]) for k in snapshot)
    assert coord.state.round == 0


@pytest.mark.slow
def test_live_server_answers_garbage_with_a_status() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = serve(config.load(None, CFG), None, bind="127.0.0.1:0", linger_s=0)
    rng = random.Random(1)
    codes: dict[str, int] = {}
    try:
        before = {k: t.clone() for k, t in server.coord.state.x.items()}
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            for i in range(400):
                method = METHODS[i % len(METHODS)]
                path = f"/rabo.v1.Coordinator/{method}"
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
                try:
                    if method == "SubmitUpdate":
                        call = ch.stream_unary(path)
                        call(iter([payload] * rng.randint(1, 3)), timeout=30)
                    elif method == "FetchAssignment":
                        for _ in ch.unary_stream(path)(payload, timeout=30):
                            pass
                    else:
                        ch.unary_unary(path)(payload, timeout=30)
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.RpcError as exc:
                    assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "no answer"
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        assert all(torch.equal(server.coord.state.x[k], before[k]) for k in before)
        assert sum(codes.values()) == 400
    finally:
        server.stop(0)
