"""Every bad update is refused with a status that names the problem; the model stays
bit-identical and the coordinator keeps serving (a real server on 127.0.0.1)."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_util import connect, fetch, first_message, update_stream, zero_update

from coordinator.server import serve
from rabo import config
from rabo_proto.codec import WireTensor
from rabo_proto.v1 import rabo_pb2 as pb

CFG = ["data.dataset=digits", "model.hidden=[24]", "clients.count=2", "cluster.workers=2",
       "clients.ratios=[0.5]", "rounds=1", "cluster.round_deadline_s=3600",
       "cluster.chunk_bytes=2048", "cluster.heartbeat_s=600"]  # one round open all along


@pytest.fixture(scope="module")
def cluster():
    cfg = config.load(None, CFG)
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0)
    a, b = connect(server.port, 0), connect(server.port, 1)
    assignment, tensors = fetch(a)
    yield server, a, b, assignment, tensors
    a.close()
    b.close()
    server.stop(grace=0)


def _snapshot(server):
    st = server.coord.state
    return {f"{p}.{k}": t.clone() for p, d in (("x", st.x), ("y", st.y), ("v", st.v))
            for k, t in d.items()}


def _submit(stub, stream):
    return stub.SubmitUpdate(stream, timeout=10)


def _expect(code, match, cluster, **kw):
    server, a, _, assignment, tensors = cluster
    before = _snapshot(server)
    with pytest.raises(grpc.RpcError) as err:
        _submit(a.stub, update_stream(a, assignment.round, assignment.client_id,
                                      kw.pop("tensors", zero_update(tensors)), **kw))
    assert err.value.code() == code, err.value.details()
    assert match in err.value.details()
    after = _snapshot(server)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert not server.coord.ticket.closed  # still serving this round


def test_unknown_worker(cluster) -> None:
    _expect(grpc.StatusCode.UNAUTHENTICATED, "unknown worker id 'nobody'", cluster,
            worker_id="nobody")


def test_wrong_credential(cluster) -> None:
    _expect(grpc.StatusCode.PERMISSION_DENIED, "wrong credential", cluster, credential="x" * 43)


def test_another_workers_credential(cluster) -> None:
    _, _, b, _, _ = cluster
    _expect(grpc.StatusCode.PERMISSION_DENIED, "wrong credential", cluster,
            credential=b.credential)


def test_stale_round(cluster) -> None:
    def stale(h):
        h.round = 0
        h.payload.round = 0
    _expect(grpc.StatusCode.FAILED_PRECONDITION, "stale round: update for round 0, but round 1 "
            "is open", cluster, mutate_header=stale)


def test_wrong_shape(cluster) -> None:
    _, _, _, _, tensors = cluster
    bad = zero_update(tensors)
    bad[0] = WireTensor(bad[0].part, bad[0].name, torch.zeros(bad[0].tensor.shape[0] + 1,
                                                              *bad[0].tensor.shape[1:]))
    _expect(grpc.StatusCode.INVALID_ARGUMENT, f"tensor x.{bad[0].name}: shape", cluster,
            tensors=bad)


def test_wrong_dtype(cluster) -> None:
    _, _, _, _, tensors = cluster
    bad = zero_update(tensors)
    bad[1] = WireTensor(bad[1].part, bad[1].name, bad[1].tensor.double())
    _expect(grpc.StatusCode.INVALID_ARGUMENT, "dtype FLOAT64, expected FLOAT32", cluster,
            tensors=bad)


def test_nan(cluster) -> None:
    _, _, _, _, tensors = cluster
    bad = zero_update(tensors)
    t = bad[-1].tensor.clone()
    t.view(-1)[0] = float("nan")
    bad[-1] = WireTensor(bad[-1].part, bad[-1].name, t)
    _expect(grpc.StatusCode.INVALID_ARGUMENT, "holds NaN or infinite values", cluster,
            tensors=bad)


def test_truncated_stream(cluster) -> None:
    _expect(grpc.StatusCode.DATA_LOSS, "truncated payload", cluster,
            mutate_chunks=lambda c: c[:-1], trailer=False)


def test_stream_ends_before_the_trailer(cluster) -> None:
    _expect(grpc.StatusCode.DATA_LOSS, "the stream ended before the trailer", cluster,
            trailer=False)


def test_more_bytes_than_announced(cluster) -> None:
    _expect(grpc.StatusCode.INVALID_ARGUMENT, "chunks carry more than the", cluster,
            mutate_chunks=lambda c: [*c[:-1], c[-1] + b"\0"])


def test_wrong_trailer_checksum(cluster) -> None:
    _expect(grpc.StatusCode.DATA_LOSS, "checksum mismatch", cluster, crc32c=12345)


def test_bad_checksum(cluster) -> None:
    def flip(chunks):
        return [bytes([chunks[0][0] ^ 0xFF]) + chunks[0][1:], *chunks[1:]]
    _expect(grpc.StatusCode.DATA_LOSS, "checksum mismatch", cluster, mutate_chunks=flip)


def test_oversize_chunk(cluster) -> None:
    _expect(grpc.StatusCode.INVALID_ARGUMENT, "chunk of 4096 bytes exceeds the limit of 2048",
            cluster, chunk_bytes=4096)


def test_header_must_come_first(cluster) -> None:
    server, a, _, _, _ = cluster
    with pytest.raises(grpc.RpcError) as err:
        _submit(a.stub, iter([pb.UpdateMessage(trailer=pb.PayloadTrailer(crc32c=0))]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must start with an UpdateHeader" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # raw bytes where the header must be
        _submit(a.stub, iter([b"\xff\xff\xff\xff"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid UpdateMessage" in err.value.details()


def test_unsupported_protocol_version(cluster) -> None:
    server, a, _, _, _ = cluster
    with pytest.raises(grpc.RpcError) as err:
        a.stub.Register(pb.RegisterRequest(name="old", protocol=0), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "wire protocol 0 is not supported" in err.value.details()


def test_zz_valid_update_then_duplicate(cluster) -> None:
    """After all the refusals a good update is accepted; sending it again is a duplicate."""
    server, a, _, assignment, tensors = cluster
    good = zero_update(tensors)
    reply = _submit(a.stub, update_stream(a, assignment.round, assignment.client_id, good))
    assert reply.accepted
    with pytest.raises(grpc.RpcError) as err:
        _submit(a.stub, update_stream(a, assignment.round, assignment.client_id, good))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "duplicate update" in err.value.details()
    assert server.coord.rejected.get("duplicate") == 1


def test_worker_that_fits_nothing_is_told_why() -> None:
    from grpc_util import connect

    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[64]", "clients.count=2",
                             "cluster.workers=2", "rounds=1", "cluster.round_deadline_s=30"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0)
    try:
        rich, poor = connect(server.port, 0), connect(server.port, 1, budget=1024)
        call = poor.stub.FetchAssignment(pb.FetchRequest(
            worker_id=poor.worker_id, credential=poor.credential, wait_s=20), timeout=30)
        first = first_message(call)
        assert first.WhichOneof("body") == "wait"
        assert "round 1: not assigned: the smallest ratio 0.0625 needs" in first.wait.reason
        assert poor.worker_id in server.coord.ticket.not_assigned
        assert rich.worker_id in server.coord.ticket.tasks
        rich.close()
        poor.close()
    finally:
        server.stop(grace=0)


def test_nan_poll_time_is_answered_at_once() -> None:
    """A NaN ``wait_s`` is treated as 0: answered at once, not a busy loop on the lock until
    the caller gives up."""
    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[8]", "clients.count=2",
                             "cluster.workers=2", "rounds=1"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0)
    try:
        s = connect(server.port, 0)  # the second worker never comes: no round opens
        call = s.stub.FetchAssignment(pb.FetchRequest(
            worker_id=s.worker_id, credential=s.credential, wait_s=float("nan")), timeout=5)
        first = first_message(call)
        assert first.WhichOneof("body") == "wait" and first.wait.kind == pb.Wait.NO_ROUND
        s.close()
    finally:
        server.stop(grace=0)


def test_no_one_assigned_waits_for_fresh_profiles_before_retrying() -> None:
    """When no worker fits any ratio, the round waits two heartbeat intervals for fresh
    profiles before it is retried, instead of spending every retry at once."""
    import time

    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[64]", "clients.count=1",
                             "cluster.workers=1", "rounds=1", "cluster.heartbeat_s=1",
                             "cluster.heartbeat_misses=30", "cluster.max_round_retries=2"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0)
    try:
        start = time.monotonic()  # the round opens when the worker registers
        poor = connect(server.port, 0, budget=1024)
        assert server.wait(60)
        took = time.monotonic() - start
        assert "fewer than 1 updates in 3 attempts" in str(server.driver.error)
        assert took >= 3 * 2 * 1.0 * 0.9, took  # three tries, two heartbeat intervals each
        poor.close()
    finally:
        server.stop(grace=0)
