"""A worker's free text cannot forge log lines or flood a refusal (a live coordinator on
127.0.0.1)."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_util import connect, fetch, update_stream, zero_update

from coordinator.server import serve
from coordinator.servicer import STATUS_MESSAGE_LIMIT
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

    # the deadline leaves a loaded machine time to fetch both assignments and submit the fast
    # update before it passes; the trickle (about 46 chunks, one a second) outlasts it by far
    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[128]", "clients.count=2",
                             "cluster.workers=2", "rounds=1", "cluster.heartbeat_s=30",
                             "cluster.round_deadline_s=10", "cluster.stall_timeout_s=2",
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
        assert total > 30  # the trickle alone would take that many seconds
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
    """Eight parallel 200 MiB registrations without any credential, at a coordinator process
    whose message limit (1 GiB) would let them through: before, each was read in whole (8 x
    60 MiB added 320-570 MiB to its resident memory); now gRPC refuses what is larger than
    a chunk plus its headroom from the message's length prefix. Counted by the kernel on
    each attacking connection (kept open after the refusal): the coordinator took in no more
    than the HTTP/2 flow-control window of each (a few MiB), never the message. (Resident
    memory is not the measure: the allocator keeps what those windows used, 40-270 MiB for
    8 connections whatever the message size, and it stops growing after a few rounds.)"""
    import os
    import socket
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from rabo.netstat import TcpCounters
    from rabo_proto.v1 import rabo_pb2_grpc as pb_grpc

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sets = sum((["--set", s] for s in [*CFG, "cluster.register_timeout_s=120",
                                        f"cluster.max_message_bytes={1 << 30}"]), [])
    coord = subprocess.Popen([sys.executable, "-m", "rabo.cli", "coordinator", "--bind",
                              f"127.0.0.1:{port}", *sets], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=tmp_path, env=dict(os.environ,
                                                                 GRPC_VERBOSITY="NONE"))
    size = 200 << 20
    big = pb.RegisterRequest(name="x" * size, protocol=PROTOCOL_VERSION)
    # a connection each (channels with equal options would share one)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}",
                                      options=[("grpc.max_send_message_length", 2 * size),
                                               ("grpc.use_local_subchannel_pool", 1)])
                for _ in range(8)]
    try:
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=120)

        def one(ch: grpc.Channel) -> tuple[grpc.StatusCode, str]:
            try:
                pb_grpc.CoordinatorStub(ch).Register(big, timeout=120)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
            return grpc.StatusCode.OK, ""

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, channels))
        assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in answers), answers
        assert all("larger than max" in details for _, details in answers), answers
        sent = [c.counters.bytes_sent for c in TcpCounters().connections() or []
                if c.remote_port == port]
        assert len(sent) == 8, sent  # the 8 connections, still open after their refusals
        assert max(sent) < 32 << 20, [n >> 20 for n in sent]  # MiB each, of 200
        assert coord.poll() is None  # still serving
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.CoordinatorStub(ch).Register(
                    pb.RegisterRequest(name="w", protocol=PROTOCOL_VERSION + 1), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # it answers
    finally:
        for ch in channels:
            ch.close()
        coord.kill()
        coord.wait()


def _silent_streams(port: int, count: int, channels: int, hold) -> tuple[list, list]:
    """``count`` update streams over ``channels`` connections that send nothing until
    ``hold`` is set."""
    from rabo_proto.v1 import rabo_pb2_grpc as pb_grpc

    def silent():
        hold.wait(300)
        return
        yield  # a generator that yields nothing until released

    # a connection each (channels with equal options would share one)
    chans = [grpc.insecure_channel(f"127.0.0.1:{port}",
                                   options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(channels)]
    calls = [pb_grpc.CoordinatorStub(chans[i % channels]).SubmitUpdate.future(silent(),
                                                                              timeout=300)
             for i in range(count)]
    return chans, calls


def _until(predicate, timeout: float = 60.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting for the coordinator"
        time.sleep(0.05)


@pytest.mark.slow
def test_silent_streams_hold_nothing_the_run_needs(tmp_path) -> None:
    """200 update streams that open and send nothing, from one host over 10 connections,
    all in progress at the coordinator at once: health still says SERVING within 1 s, and
    two real worker processes register and finish a 3-round run meanwhile (before, each
    silent stream held an RPC thread: two dozen stopped the rounds)."""
    import os
    import subprocess
    import sys
    import threading

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from coordinator.local import WorkerProcess, stop_workers

    cfg = config.load(None, [*CFG, "clients.count=2", "cluster.workers=2", "rounds=3",
                             "cluster.heartbeat_s=0.5", "cluster.heartbeat_misses=40",
                             "cluster.message_timeout_s=300"])
    srv = serve(cfg, None, bind="127.0.0.1:0", linger_s=1.0)
    hold = threading.Event()
    chans, calls = _silent_streams(srv.port, 200, 10, hold)
    workers = []
    try:
        _until(lambda: srv.coord.calls_open >= 200)
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            health.Check(health_pb2.HealthCheckRequest(), timeout=30, wait_for_ready=True)
            for _ in range(5):  # connected: each answer within 1 s
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        env = dict(os.environ, GRPC_VERBOSITY="ERROR")
        for i in range(2):
            log = tmp_path / f"worker-{i}.log"
            cmd = [sys.executable, "-m", "worker", "--coordinator", f"127.0.0.1:{srv.port}",
                   "--threads", "1", "--poll-s", "1", "--give-up-s", "60"]
            workers.append(WorkerProcess(i, None, subprocess.Popen(
                cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env), log))
        assert srv.wait(240), "the run did not finish"
        assert srv.driver.error is None, srv.driver.error
        assert len(srv.driver.records) == 3
        assert all(len(r["clients"]) == 2 for r in srv.driver.records)
        assert not any(c.done() for c in calls)  # every silent stream was open throughout
    finally:
        hold.set()
        for c in calls:
            c.cancel()
        for ch in chans:
            ch.close()
        stop_workers(workers)
        srv.stop(grace=0)


def test_a_silent_stream_ends_after_the_message_timeout() -> None:
    """A stream that sends no message within ``cluster.message_timeout_s`` is ended with
    DEADLINE_EXCEEDED naming the key; the coordinator holds no call of it after."""
    import threading

    srv = serve(config.load(None, [*CFG, "cluster.message_timeout_s=1.5"]), None,
                bind="127.0.0.1:0", linger_s=0.0)
    hold = threading.Event()
    chans, calls = _silent_streams(srv.port, 20, 2, hold)
    try:
        for c in calls:
            with pytest.raises(grpc.RpcError) as err:
                c.result(timeout=60)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "cluster.message_timeout_s" in err.value.details()
        _until(lambda: srv.coord.calls_open == 0)
        assert srv.coord.rejected.get("silent") == 20
    finally:
        hold.set()
        for ch in chans:
            ch.close()
        srv.stop(grace=0)


def test_calls_past_the_per_host_cap_are_refused_at_once() -> None:
    """With ``cluster.max_calls_per_host`` = 5 and 5 silent streams open from 127.0.0.1,
    a sixth call is refused with RESOURCE_EXHAUSTED naming the key (it does not wait)."""
    import threading

    srv = serve(config.load(None, [*CFG, "cluster.max_calls_per_host=5"]), None,
                bind="127.0.0.1:0", linger_s=0.0)
    hold = threading.Event()
    chans, calls = _silent_streams(srv.port, 5, 1, hold)
    try:
        _until(lambda: srv.coord.calls_open == 5)
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc_stub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Heartbeat(pb.HeartbeatRequest(worker_id="x", credential="y"), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cluster.max_calls_per_host" in err.value.details()
        hold.set()  # the streams end (empty): the host's calls are counted down
        _until(lambda: srv.coord.calls_open == 0)
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc_stub(ch).Heartbeat(pb.HeartbeatRequest(worker_id="x", credential="y"),
                                           timeout=30)
        # answered now: an unknown worker (the cap no longer applies)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    finally:
        hold.set()
        for ch in chans:
            ch.close()
        srv.stop(grace=0)


def pb_grpc_stub(channel: grpc.Channel):
    from rabo_proto.v1 import rabo_pb2_grpc as pb_grpc

    return pb_grpc.CoordinatorStub(channel)
