"""A worker's free text cannot forge log lines or flood a refusal (a live coordinator on
127.0.0.1)."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_util import connect, fetch, update_stream, zero_update

from coordinator.server import STATUS_MESSAGE_LIMIT, serve
from coordinator.untrusted import printable
from rabo import config
from rabo_proto import PROTOCOL_VERSION
from rabo_proto.v1 import rabo_pb2 as pb

CFG = ["data.dataset=digits", "model.hidden=[8]", "clients.count=1", "cluster.workers=1",
       "rounds=1", "cluster.heartbeat_s=30", "cluster.round_deadline_s=60"]
FORGED = "\n2026-12-01 00:00:00,000 INFO rabo.coordinator: run complete, test_acc 0.99\x1b[2J"


def test_printable_escapes_controls_and_bounds_the_length() -> None:
    assert printable("a\nb\x1b[0m\tc") == "a\\nb\\x1b[0m\\tc"
    long = printable("n" * 65536, 64)
    assert long.startswith("n" * 64 + "...") and "65536 characters" in long
    assert len(long) < 100
    assert printable("plain name-1") == "plain name-1"


@pytest.fixture()
def server():
    srv = serve(config.load(None, CFG), None, bind="127.0.0.1:0", linger_s=0.0)
    yield srv
    srv.stop(grace=0)


def test_a_workers_name_and_leave_reason_cannot_forge_log_lines(server, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="rabo.coordinator"):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            from rabo_proto.v1 import rabo_pb2_grpc as pb_grpc

            stub = pb_grpc.CoordinatorStub(ch)
            reply = stub.Register(pb.RegisterRequest(
                name="w" + FORGED + "x" * 65536, client_id=-1, protocol=PROTOCOL_VERSION,
                profile=pb.ResourceProfile(memory_budget_bytes=1 << 30,
                                           budget_source="cgroup" + FORGED)), timeout=10)
            stub.Leave(pb.LeaveRequest(worker_id=reply.worker_id, credential=reply.credential,
                                       reason="bye" + FORGED), timeout=10)
    messages = [r.getMessage() for r in caplog.records if r.name == "rabo.coordinator"]
    mine = [m for m in messages if "registered worker" in m or "left:" in m]
    assert len(mine) == 2, messages
    for m in mine:
        assert "\n" not in m and "\x1b" not in m
        assert "\\n2026-12-01" in m  # escaped, still readable
        assert len(m) < 1000  # the 64 KiB name is cut
    assert server.coord.registry.get(reply.worker_id) is None  # it left


def test_a_refusal_quoting_a_huge_input_stays_readable(server) -> None:
    s = connect(server.port, 0)
    try:
        assignment, tensors = fetch(s)

        def huge_name(header: pb.UpdateHeader) -> None:
            header.payload.tensors[0].name = "t" * 65536 + FORGED

        with pytest.raises(grpc.RpcError) as err:
            s.stub.SubmitUpdate(update_stream(s, assignment.round, assignment.client_id,
                                              zero_update(tensors), mutate_header=huge_name),
                                timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details()
        assert len(details) <= STATUS_MESSAGE_LIMIT + 40 and "\n" not in details
        assert "characters)" in details
    finally:
        s.close()


def test_a_trickling_update_cannot_hold_a_round_past_its_deadline_and_grace() -> None:
    """One chunk a second of a valid update: before, every chunk counted as progress and the
    round stayed open until the last one (30 s against an 8 s deadline observed). Now it
    closes one stall window past the deadline, since the trickle is far below
    cluster.min_transfer_bytes_per_s."""
    import time

    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[64]", "clients.count=2",
                             "cluster.workers=2", "rounds=1", "cluster.heartbeat_s=30",
                             "cluster.round_deadline_s=2", "cluster.stall_timeout_s=2",
                             "cluster.chunk_bytes=1024"])
    srv = serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0)
    fast, slow = connect(srv.port, 0), connect(srv.port, 1)
    try:
        a0, t0 = fetch(fast)
        a1, t1 = fetch(slow)
        sent: list[float] = []

        def trickle():
            for msg in update_stream(slow, a1.round, a1.client_id, zero_update(t1)):
                sent.append(time.monotonic())
                yield msg
                time.sleep(1.0)

        fast.stub.SubmitUpdate(update_stream(fast, a0.round, a0.client_id, zero_update(t0)),
                               timeout=30)
        total = 1 + len(list(update_stream(slow, a1.round, a1.client_id, zero_update(t1))))
        assert total > 15  # the trickle alone would take that many seconds
        with pytest.raises(grpc.RpcError) as err:
            slow.stub.SubmitUpdate(trickle(), timeout=120)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        assert "closed before it arrived" in err.value.details()
        end = time.monotonic() + 60
        while not srv.driver.records and time.monotonic() < end:
            time.sleep(0.05)
        rec = srv.driver.records[0]
        assert [c["client_id"] for c in rec["clients"]] == [0]
        assert [w["client_id"] for w in rec["left_out"]] == [1]
        assert rec["round_s"] < total - 5  # closed long before the trickle would have ended
        assert len(sent) < total - 5  # and the coordinator stopped reading the trickle then
    finally:
        fast.close()
        slow.close()
        srv.stop(grace=0)


def test_oversized_messages_are_refused_before_they_are_buffered(tmp_path) -> None:
    """Eight parallel 200 MiB registrations without any credential, at a coordinator process:
    before, each was read in whole (8 x 60 MiB cost 320-570 MiB more resident memory); now
    gRPC refuses what is larger than a chunk plus its headroom, unread. What a connection
    still costs is its HTTP/2 flow-control window and read buffers, which do not grow with
    the message (measured: 30-125 MiB for 8 connections, on an idle or a loaded machine, at
    60 and at 200 MiB per message), so the bound is one message's size: reading even one
    of them would cross it."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    from rabo_proto.v1 import rabo_pb2_grpc as pb_grpc

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # a message limit above the attack's size: gRPC's own limit would refuse 200 MiB anyway,
    # what is tested is that the coordinator receives no more than a chunk from anyone
    sets = sum((["--set", s] for s in [*CFG, "cluster.register_timeout_s=120",
                                        f"cluster.max_message_bytes={1 << 30}"]), [])
    coord = subprocess.Popen([sys.executable, "-m", "rabo.cli", "coordinator", "--bind",
                              f"127.0.0.1:{port}", *sets], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ,
                                                                 GRPC_VERBOSITY="NONE"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=120)
        time.sleep(0.5)
        before = psutil.Process(coord.pid).memory_info().rss
        size = 200 << 20
        big = pb.RegisterRequest(name="x" * size, protocol=PROTOCOL_VERSION)

        def one(_: int) -> grpc.StatusCode:
            opts = [("grpc.max_send_message_length", 2 * size)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
                try:
                    pb_grpc.CoordinatorStub(ch).Register(big, timeout=120)
                except grpc.RpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(8)))
        grown = psutil.Process(coord.pid).memory_info().rss - before
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 8
        assert grown < size, f"the coordinator grew by {grown >> 20} MiB"
        assert coord.poll() is None  # still serving
    finally:
        coord.kill()
        coord.wait()


def test_silent_streams_cannot_starve_the_health_check() -> None:
    """200 calls from one peer that open an update stream and send nothing hold every RPC
    thread of the workers' pool; the health service answers from pools of its own, so it
    still says SERVING within 1 s (before, it shared the pool and timed out)."""
    import threading

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rabo_proto.v1 import rabo_pb2_grpc as pb_grpc

    srv = serve(config.load(None, CFG), None, bind="127.0.0.1:0", linger_s=0.0)
    hold = threading.Event()
    channels = [grpc.insecure_channel(f"127.0.0.1:{srv.port}") for _ in range(10)]
    calls = []
    try:
        def silent():
            hold.wait(120)
            return
            yield  # a generator that yields nothing until released

        for i in range(200):
            stub = pb_grpc.CoordinatorStub(channels[i % len(channels)])
            calls.append(stub.SubmitUpdate.future(silent(), timeout=120))
        # every pool thread is taken: a worker's own call waits (the pool is the bound here)
        probe = pb_grpc.CoordinatorStub(channels[0])
        with pytest.raises(grpc.RpcError) as err:
            probe.Heartbeat(pb.HeartbeatRequest(worker_id="x", credential="y"), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for _ in range(5):
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        hold.set()
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
        srv.stop(grace=0)
