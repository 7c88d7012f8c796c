"""Authentication and TLS: every refusal leaves the coordinator's state as it was."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from coordinator.server import Security, serve
from rabo import config
from rabo.auth import TlsFiles
from rabo.certs import _key_pem, issue, make_ca, write_bundle
from rabo_proto import PROTOCOL_VERSION
from rabo_proto.v1 import rabo_pb2 as pb
from rabo_proto.v1 import rabo_pb2_grpc as pb_grpc
from worker.security import open_channel

CFG = ["data.dataset=digits", "model.hidden=[16]", "clients.count=3", "cluster.workers=3",
       "rounds=1", "cluster.heartbeat_s=30", "cluster.register_rate_per_s=100"]


def _register(stub, client_id: int = -1) -> pb.RegisterReply:
    return stub.Register(pb.RegisterRequest(name="t", client_id=client_id,
                                            protocol=PROTOCOL_VERSION,
                                            profile=pb.ResourceProfile(memory_budget_bytes=1)),
                         timeout=30)


def _state(server) -> tuple[int, int, dict]:
    c = server.coord
    return (len(c.registry), c.state.round, {k: v.clone() for k, v in c.state.x.items()})


def _unchanged(before, after) -> bool:
    return before[:2] == after[:2] and all((before[2][k] == after[2][k]).all() for k in before[2])


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("pki"), workers=2)


# --------------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def token_server():
    server = serve(config.load(None, CFG), None, bind="127.0.0.1:0", linger_s=0,
                   security=Security(tokens=[b"s3cret-token", b"next-token"]))
    yield server
    server.stop(0)


@pytest.mark.parametrize(("token", "message"), [(None, "missing token"),
                                                 (b"guess", "wrong token")])
def test_token_refusals_change_nothing(token_server, token, message) -> None:
    before = _state(token_server)
    with open_channel(f"127.0.0.1:{token_server.port}", [], TlsFiles(), token) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _register(pb_grpc.CoordinatorStub(ch))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in err.value.details()
    assert _unchanged(before, _state(token_server))
    assert token_server.coord.rejected.get(f"auth-{message}", 0) >= 1


def test_worker_with_a_wrong_token_stops_with_the_reason(token_server, tmp_path) -> None:
    """A refused registration is about the worker's credentials: the worker process exits
    (status 3) naming the refusal, instead of registering again in a tight loop."""
    import os
    import subprocess
    import sys

    before = token_server.coord.rejected.get("auth-wrong token", 0)
    env = dict(os.environ, RABO_TOKEN="guess", GRPC_VERBOSITY="ERROR")
    env.pop("RABO_TOKEN_FILE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--coordinator", f"127.0.0.1:{token_server.port}",
         "--threads", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "refused the registration: UNAUTHENTICATED" in proc.stderr + proc.stdout
    assert token_server.coord.rejected.get("auth-wrong token", 0) - before == 1


def test_any_listed_token_is_accepted_and_health_needs_none(token_server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with open_channel(f"127.0.0.1:{token_server.port}", [], TlsFiles(), b"next-token") as ch:
        reply = _register(pb_grpc.CoordinatorStub(ch))
    assert reply.worker_id
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- mutual TLS


@pytest.fixture(scope="module")
def tls_server(pki):
    tls = TlsFiles((pki / "coordinator.crt").read_bytes(), (pki / "coordinator.key").read_bytes(),
                   (pki / "ca.crt").read_bytes())
    server = serve(config.load(None, CFG), None, bind="127.0.0.1:0", linger_s=0,
                   security=Security(tls=tls), health_port=0)
    yield server
    server.stop(0)


def _tls(pki: Path, who: str | None) -> TlsFiles:
    if who is None:
        return TlsFiles(ca=(pki / "ca.crt").read_bytes())
    return TlsFiles((pki / f"{who}.crt").read_bytes(), (pki / f"{who}.key").read_bytes(),
                    (pki / "ca.crt").read_bytes())


def test_mtls_worker_registers(tls_server, pki) -> None:
    with open_channel(f"127.0.0.1:{tls_server.port}", [], _tls(pki, "worker-0"), None,
                      "localhost") as ch:
        assert _register(pb_grpc.CoordinatorStub(ch)).worker_id


def test_plaintext_client_against_tls_server(tls_server) -> None:
    before = _state(tls_server)
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.port}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            _register(pb_grpc.CoordinatorStub(ch))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _unchanged(before, _state(tls_server))


def test_client_without_certificate_is_refused(tls_server, pki) -> None:
    before = _state(tls_server)
    with open_channel(f"127.0.0.1:{tls_server.port}", [], _tls(pki, None), None,
                      "localhost") as ch, pytest.raises(grpc.RpcError) as err:
        _register(pb_grpc.CoordinatorStub(ch))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _unchanged(before, _state(tls_server))


def _foreign_or_expired(pki: Path, tmp: Path, expired: bool) -> TlsFiles:
    if expired:  # signed by the right CA, but its validity ended yesterday
        ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
        start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
        cert, key = issue(ca_cert, ca_key, "worker-old", [], False, days=2, not_before=start)
    else:  # valid, but from a CA the coordinator does not trust
        other_ca, other_key = make_ca()
        cert, key = issue(other_ca, other_key, "worker-0", [], False, days=10)
    return TlsFiles(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key),
                    (pki / "ca.crt").read_bytes())


@pytest.mark.parametrize("expired", [True, False], ids=["expired", "wrong-ca"])
def test_bad_client_certificates_are_refused(tls_server, pki, tmp_path, expired) -> None:
    before = _state(tls_server)
    with open_channel(f"127.0.0.1:{tls_server.port}", [],
                      _foreign_or_expired(pki, tmp_path, expired), None, "localhost") as ch:
        with pytest.raises(grpc.RpcError) as err:
            _register(pb_grpc.CoordinatorStub(ch))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _unchanged(before, _state(tls_server))


def test_worker_cannot_act_as_another(tls_server, pki) -> None:
    """Worker 1, even holding worker 0's id and stolen credential, is refused: the id is
    bound to the certificate it registered with."""
    with open_channel(f"127.0.0.1:{tls_server.port}", [], _tls(pki, "worker-0"), None,
                      "localhost") as ch0:
        victim = _register(pb_grpc.CoordinatorStub(ch0))
    before = _state(tls_server)
    with open_channel(f"127.0.0.1:{tls_server.port}", [], _tls(pki, "worker-1"), None,
                      "localhost") as ch1:
        stub = pb_grpc.CoordinatorStub(ch1)
        with pytest.raises(grpc.RpcError) as err:
            stub.Heartbeat(pb.HeartbeatRequest(worker_id=victim.worker_id,
                                               credential=victim.credential), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "registered with another client certificate" in err.value.details()
        own = _register(stub)
        with pytest.raises(grpc.RpcError) as err:
            stub.Heartbeat(pb.HeartbeatRequest(worker_id=victim.worker_id,
                                               credential=own.credential), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "wrong credential" in err.value.details()
    assert _state(tls_server)[1] == before[1]


def test_wrong_server_certificate_is_refused_by_the_worker(tls_server, pki) -> None:
    """A worker verifying against another CA does not talk to this coordinator."""
    other_ca, _ = make_ca()
    tls = TlsFiles((pki / "worker-0.crt").read_bytes(), (pki / "worker-0.key").read_bytes(),
                   other_ca.public_bytes(serialization.Encoding.PEM))
    with open_channel(f"127.0.0.1:{tls_server.port}", [], tls, None, "localhost") as ch:
        with pytest.raises(grpc.RpcError) as err:
            _register(pb_grpc.CoordinatorStub(ch))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------- limits


def test_registration_rate_limit() -> None:
    cfg = config.load(None, [*CFG, "clients.count=50", "cluster.register_rate_per_s=1"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0)
    # time stands still for the limiter: on a slow machine the bucket would refill between
    # the registrations (1 a second) and none would be refused
    server.coord.register_limiter.clock = lambda: 0.0
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            codes = []
            for _ in range(8):
                try:
                    _register(stub)
                    codes.append("ok")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
                    assert "too many registrations from 127.0.0.1" in exc.details()
        assert codes == ["ok"] * 4 + ["RESOURCE_EXHAUSTED"] * 4
        assert len(server.coord.registry) == codes.count("ok")
    finally:
        server.stop(0)


def test_taken_client_slot_is_refused() -> None:
    server = serve(config.load(None, CFG), None, bind="127.0.0.1:0", linger_s=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            _register(stub, 1)
            with pytest.raises(grpc.RpcError) as err:
                _register(stub, 1)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "client slot 1 is taken" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                _register(stub, 7)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "client slot 7 does not exist" in err.value.details()
    finally:
        server.stop(0)


def test_refused_registrations_are_logged_once_then_rate_limited(token_server, caplog) -> None:
    import logging

    from coordinator.state import REFUSAL_LOG_EVERY_S

    caplog.set_level(logging.WARNING, logger="rabo.coordinator")
    token_server.coord._refusal_log.clear()  # other tests' refusals do not hold this one back
    for _ in range(5):
        with open_channel(f"127.0.0.1:{token_server.port}", [], TlsFiles(), b"guess") as ch:
            with pytest.raises(grpc.RpcError):
                _register(pb_grpc.CoordinatorStub(ch))
    said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(said) == 1, said  # five refusals within the window: one line
    assert "wrong token (the worker's token is not one this coordinator accepts)" in said[0]
    # after the window, the next line says how many were held back
    kind = "auth-wrong token"
    last, held = token_server.coord._refusal_log[kind]
    assert held == 4
    token_server.coord._refusal_log[kind] = (last - REFUSAL_LOG_EVERY_S, held)
    with open_channel(f"127.0.0.1:{token_server.port}", [], TlsFiles(), b"guess") as ch:
        with pytest.raises(grpc.RpcError):
            _register(pb_grpc.CoordinatorStub(ch))
    said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(said) == 2 and "(4 more refused like it since the last report)" in said[1], said
