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


def test_repeated_reads_look_the_socket_up_and_agree_with_a_dump(pair) -> None:
    port, peer, cli, conn = pair
    cached = TcpCounters()
    assert cached.read(port, peer) is not None  # first read: a dump, learns the local address
    _transfer(cli, conn, 250_000)
    again = cached.read(port, peer)  # a lookup of that one socket
    fresh = TcpCounters().read(port, peer)  # a dump
    assert again is not None and fresh is not None
    assert again.bytes_received == fresh.bytes_received
    assert again.bytes_received >= 250_000
    cli.close()
    conn.close()
    assert cached.read(port, peer) is None  # a closed connection is not served from memory


def test_a_port_filtered_dump_returns_only_that_connection() -> None:
    import rabo.netstat as ns

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(32)
    port = srv.getsockname()[1]
    socks = []
    try:
        for _ in range(10):
            socks.append(socket.create_connection(("127.0.0.1", port)))
            socks.append(srv.accept()[0])
        want = socks[6].getsockname()[1]
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, ns.NETLINK_SOCK_DIAG) as s:
            got = list(ns.sock_diag_dump(s, socket.AF_INET, 1 << ns.TCP_ESTABLISHED, 1,
                                         (port, want)))
            everything = list(ns.sock_diag_dump(s, socket.AF_INET, 1 << ns.TCP_ESTABLISHED, 2))
        assert [(e.sport, e.dport) for e in got] == [(port, want)]
        assert len(everything) >= 20
    finally:
        for s in socks + [srv]:
            s.close()


def test_ipv6_connections_are_read_too() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this namespace")
    srv = socket.socket(socket.AF_INET6)
    try:
        srv.bind(("::1", 0))
    except OSError as e:
        srv.close()
        pytest.skip(f"no ::1 here: {e}")
    srv.listen()
    cli = socket.create_connection(srv.getsockname()[:2])
    conn, peer = srv.accept()
    try:
        counters = TcpCounters()
        first = counters.read(srv.getsockname()[1], peer[:2])
        _transfer(cli, conn, 4321)
        second = counters.read(srv.getsockname()[1], peer[:2])
        assert first is not None and second is not None
        assert second.bytes_received - first.bytes_received == 4321
    finally:
        for s in (cli, conn, srv):
            s.close()


def test_a_lookup_whose_socket_cookie_no_longer_matches_falls_back_to_a_dump(pair) -> None:
    """The cookie a dump reported pins the lookup to that socket: a socket that is not it
    (here: the same addresses with a cookie the kernel never issued) is not answered from
    the lookup, and the dump finds the live one again."""
    port, peer, cli, conn = pair
    counters = TcpCounters()
    first = counters.read(port, peer)
    assert first is not None
    (key, known), = counters._known.items()
    counters._known[key] = (*known[:-1], b"\x01" * 8)
    _transfer(cli, conn, 1000)
    again = counters.read(port, peer)
    assert again is not None and again.bytes_received == first.bytes_received + 1000
    assert counters._known[key][-1] == known[-1]  # relearned from the dump
