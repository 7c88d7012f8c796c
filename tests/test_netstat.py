"""Kernel TCP counters, read below any protocol, on real loopback sockets."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from rabo.netstat import TcpCounters, parse_peer


@pytest.fixture
def pair():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    conn, peer = srv.accept()
    yield srv.getsockname()[1], peer, cli, conn
    for s in (cli, conn, srv):
        s.close()


def _transfer(sender: socket.socket, receiver: socket.socket, n: int) -> None:
    got = [0]

    def read() -> None:
        while got[0] < n:
            got[0] += len(receiver.recv(1 << 20))

    t = threading.Thread(target=read)
    t.start()
    sender.sendall(b"z" * n)
    t.join()
    time.sleep(0.05)  # let the last ACK arrive


def test_per_connection_counters_match_what_was_sent(pair) -> None:
    port, peer, cli, conn = pair
    counters = TcpCounters()
    before = counters.read(port, peer)
    assert before is not None
    _transfer(conn, cli, 3_000_000)
    _transfer(cli, conn, 123_456)
    end = time.monotonic() + 5  # bytes_acked: the last ACK may still be on its way
    while (diff := counters.read(port, peer).minus(before)).bytes_sent < 3_000_000 and \
            time.monotonic() < end:
        time.sleep(0.01)
    assert diff.bytes_sent == 3_000_000 and diff.bytes_received == 123_456
    assert diff.segs_out > 0 and diff.l2_sent() > diff.bytes_sent


def test_process_totals_include_this_connection(pair) -> None:
    port, peer, cli, conn = pair
    counters = TcpCounters()
    before = counters.process_totals()
    _transfer(conn, cli, 1_000_000)
    after = counters.process_totals()
    # both ends live in this process: 1 MB sent by one socket, received by the other
    assert after.bytes_sent - before.bytes_sent >= 1_000_000
    assert after.bytes_received - before.bytes_received >= 1_000_000
    excluded = counters.process_totals(frozenset({port, peer[1]}))
    assert excluded.bytes_sent < after.bytes_sent


def test_parse_peer() -> None:
    assert parse_peer("ipv4:127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_peer("ipv6:[::1]:5001") == ("::1", 5001)
    assert parse_peer("unix:/tmp/x") is None


def test_connections_lists_both_ends(pair) -> None:
    port, peer, cli, conn = pair
    conns = TcpCounters().connections()
    ends = {(c.local_port, c.remote_port) for c in conns}
    assert (port, peer[1]) in ends and (peer[1], port) in ends
