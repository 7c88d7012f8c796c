"""Bytes on the wire, read from the kernel's TCP counters below gRPC.

For each worker connection the coordinator asks Linux's sock_diag netlink interface (what
``ss -ti`` uses) for ``tcp_info`` of the established socket whose remote end is the worker's
address and port (gRPC's ``context.peer()``), and reads ``tcpi_bytes_acked`` (bytes sent to the
worker and acknowledged), ``tcpi_bytes_received`` (bytes from the worker) and the segment counts.
Sampling these at the start and end of a worker's share of a round gives its bytes on the wire
per direction: everything the connection carried, i.e. HTTP/2 frames, headers, gRPC framing,
TLS records, and also the worker's heartbeats in that interval; not TCP/IP headers. Those are
estimated from segment counts (``l2_bytes``: + 66 bytes per segment, Ethernet + IPv4 + TCP with
timestamps), which is what an interface counter such as a veth's sees.

Needs no privileges (the socket is in the caller's own network namespace). Where netlink is
not available (not Linux), :meth:`TcpCounters.read` returns None and wire bytes are reported
as unavailable.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
NLMSG_ERROR = 2
INET_DIAG_INFO = 2
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE, INET_DIAG_BC_D_GE, INET_DIAG_BC_D_LE = 2, 3, 4, 5
TCP_ESTABLISHED = 1
_KNOWN_MAX = 4096  # connections whose local address is remembered
HEADER_BYTES_PER_SEGMENT = 14 + 20 + 32  # Ethernet + IPv4 + TCP with timestamp option

# offsets in struct tcp_info (linux/tcp.h), stable since Linux 4.2 / 4.6
_BYTES_ACKED = 120
_BYTES_RECEIVED = 128
_SEGS_OUT = 136
_SEGS_IN = 140


@dataclass(frozen=True)
class SocketCounters:
    bytes_sent: int  # acknowledged by the peer
    bytes_received: int
    segs_out: int
    segs_in: int

    def minus(self, earlier: SocketCounters) -> SocketCounters:
        return SocketCounters(self.bytes_sent - earlier.bytes_sent,
                              self.bytes_received - earlier.bytes_received,
                              self.segs_out - earlier.segs_out, self.segs_in - earlier.segs_in)

    def l2_sent(self) -> int:
        return self.bytes_sent + HEADER_BYTES_PER_SEGMENT * self.segs_out

    def l2_received(self) -> int:
        return self.bytes_received + HEADER_BYTES_PER_SEGMENT * self.segs_in


@dataclass(frozen=True)
class Connection:
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    counters: SocketCounters


def parse_peer(peer: str) -> tuple[str, int] | None:
    """gRPC peer strings: 'ipv4:127.0.0.1:5000', 'ipv6:[::1]:5000'; None for others (unix)."""
    if peer.startswith("ipv4:"):
        host, _, port = peer[5:].rpartition(":")
        return host, int(port)
    if peer.startswith("ipv6:"):
        rest = peer[5:]
        host, _, port = rest.rpartition(":")
        return host.strip("[]").split("%")[0], int(port)
    return None


class TcpCounters:
    """Looks up the kernel's counters of one TCP connection by its remote address."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        # (local port, remote address, remote port) -> the socket's full address, once found
        self._known: dict[tuple[int, IPAddress, int],
                          tuple[int, IPAddress, int, IPAddress, int, int, bytes]] = {}

    def read(self, local_port: int, peer: tuple[str, int]) -> SocketCounters | None:
        """Counters of the established connection local_port <-> peer, or None.

        The first read of a connection dumps the sockets with these ports (the kernel walks
        its whole established-socket table for a dump: about 1 ms here, whatever the filter)
        and learns the connection's local address; later reads ask for that one socket by
        its addresses and ports, a hash lookup in the kernel."""
        host, port = peer
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        key = (local_port, addr, port)
        try:
            known = self._known.get(key)
            if known is not None:
                e = self._get(*known)
                if e is not None and e.state == TCP_ESTABLISHED:
                    return _decode(e.info)
                self._known.pop(key, None)
            targets = [(family, addr)]
            if family == socket.AF_INET:  # a dual-stack listener sees v4 peers as v6-mapped
                targets.append((socket.AF_INET6, ipaddress.IPv6Address(f"::ffff:{addr}")))
            for fam, dst in targets:
                for e in self._dump(fam, (local_port, port)):
                    if e.sport == local_port and e.dport == port and e.dst == dst:
                        if len(self._known) >= _KNOWN_MAX:
                            self._known.clear()
                        self._known[key] = (fam, e.src, local_port, dst, port, e.iface,
                                            e.cookie)
                        return _decode(e.info)
        except OSError:
            return None
        return None

    def _get(self, family: int, src: IPAddress, sport: int, dst: IPAddress, dport: int,
             iface: int, cookie: bytes) -> DiagEntry | None:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
            return sock_diag_get(s, family, src, sport, dst, dport, self._next_seq(), iface,
                                 cookie)

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def connections(self) -> list[Connection] | None:
        """Every established TCP connection of this process, with its counters."""
        inodes = _own_socket_inodes()
        if inodes is None:
            return None
        out = []
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                for e in self._dump(family):
                    c = _decode(e.info)
                    if e.inode in inodes and c is not None:
                        out.append(Connection(str(e.src), e.sport, str(e.dst), e.dport, c))
        except OSError:
            return None
        return out

    def process_totals(self, exclude_ports: frozenset[int] = frozenset()
                       ) -> SocketCounters | None:
        """Sum of the counters of every established TCP connection this process holds
        (matched by socket inode through /proc/self/fd), leaving out connections whose remote
        port is in ``exclude_ports`` (e.g. a rendezvous store). None where unavailable."""
        inodes = _own_socket_inodes()
        if inodes is None:
            return None
        total = SocketCounters(0, 0, 0, 0)
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                for e in self._dump(family):
                    if e.inode in inodes and e.dport not in exclude_ports:
                        c = _decode(e.info)
                        if c is not None:
                            total = SocketCounters(
                                total.bytes_sent + c.bytes_sent,
                                total.bytes_received + c.bytes_received,
                                total.segs_out + c.segs_out, total.segs_in + c.segs_in)
        except OSError:
            return None
        return total

    def _dump(self, family: int, ports: tuple[int, int] | None = None
              ) -> Iterator[DiagEntry]:
        seq = self._next_seq()
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
            yield from sock_diag_dump(s, family, 1 << TCP_ESTABLISHED, seq, ports)


class DiagEntry(NamedTuple):
    """One TCP socket from a sock_diag dump; ``info`` is its raw ``struct tcp_info``;
    ``iface`` and ``cookie`` (raw, 8 bytes) identify it in a later exact lookup."""

    state: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    dport: int
    inode: int
    info: bytes
    iface: int = 0
    cookie: bytes = b"\xff" * 8


def port_filter(local_port: int, remote_port: int) -> bytes:
    """An ``INET_DIAG_REQ_BYTECODE`` attribute that makes the kernel return only sockets with
    this local and remote port, so a lookup parses one entry instead of every connection in
    the namespace (on the coordinator a full dump per request cost more CPU than building the
    request's chunks). Each op compares and, on failure, jumps 4 bytes past the end, which the
    kernel's filter reads as "reject" (linux/inet_diag.h); no privileges are needed for port
    comparisons."""
    ops = [(INET_DIAG_BC_S_GE, local_port), (INET_DIAG_BC_S_LE, local_port),
           (INET_DIAG_BC_D_GE, remote_port), (INET_DIAG_BC_D_LE, remote_port)]
    total = 8 * len(ops)
    code = b"".join(struct.pack("=BBH", op, 8, total - 8 * i + 4) + struct.pack("=BBH", 0, 0, port)
                    for i, (op, port) in enumerate(ops))
    return struct.pack("=HH", 4 + len(code), INET_DIAG_REQ_BYTECODE) + code


def sock_diag_dump(sock: socket.socket, family: int, states: int, seq: int,
                   ports: tuple[int, int] | None = None) -> Iterator[DiagEntry]:
    """Every TCP socket of ``family`` whose state bit is set in ``states`` (``1 << state``)
    and that has a ``tcp_info``, from one SOCK_DIAG_BY_FAMILY dump on the netlink socket
    ``sock`` (which may have been opened in another network namespace). With ``ports``
    (local, remote) the kernel filters the dump down to sockets with those ports."""
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, states)
    req += b"\0" * 48  # inet_diag_sockid: match everything
    if ports is not None:
        req += port_filter(*ports)
    sock.sendto(struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY,
                            NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + req, (0, 0))
    while True:
        data = sock.recv(1 << 17)
        pos = 0
        while pos + 16 <= len(data):
            length, mtype, _, _, _ = struct.unpack_from("=IHHII", data, pos)
            if length < 16 or mtype == NLMSG_DONE:
                return
            if mtype == NLMSG_ERROR:
                raise OSError("sock_diag returned an error")
            entry = _parse_diag(data[pos + 16:pos + length], family)
            if entry is not None:
                yield entry
            pos += (length + 3) & ~3


def sock_diag_get(sock: socket.socket, family: int, src: IPAddress, sport: int,
                  dst: IPAddress, dport: int, seq: int, iface: int = 0,
                  cookie: bytes = b"\xff" * 8) -> DiagEntry | None:
    """The one TCP socket with local address ``src:sport`` and remote ``dst:dport`` (bound to
    ``iface``, for link-local peers), or None (a request without ``NLM_F_DUMP``: the kernel
    looks the socket up in its hash table). With the ``cookie`` a dump reported, a newer
    socket on the same addresses and ports is not taken for that one."""
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0,
                      0xFFFFFFFF)
    # inet_diag_sockid: ports, then 16-byte address fields (an IPv4 address in the first 4)
    req += struct.pack("!HH", sport, dport) + src.packed.ljust(16, b"\0")
    req += dst.packed.ljust(16, b"\0")
    req += struct.pack("=I", iface) + (cookie if len(cookie) == 8 else b"\xff" * 8)
    sock.sendto(struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0)
                + req, (0, 0))
    data = sock.recv(1 << 16)
    if len(data) < 16:
        return None
    length, mtype, _, _, _ = struct.unpack_from("=IHHII", data, 0)
    if mtype != SOCK_DIAG_BY_FAMILY or length > len(data):
        return None  # NLMSG_ERROR: no such socket (ENOENT)
    e = _parse_diag(data[16:length], family)
    if e is None or e.sport != sport or e.dport != dport or e.dst != dst:
        return None
    return e


def _own_socket_inodes() -> set[int] | None:
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    inodes = set()
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _parse_diag(body: bytes, family: int) -> DiagEntry | None:
    if len(body) < 72:
        return None
    sport, dport = struct.unpack_from("!HH", body, 4)
    (inode,) = struct.unpack_from("=I", body, 68)
    raw_src, raw_dst = body[8:24], body[24:40]
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == socket.AF_INET:
        src, dst = ipaddress.IPv4Address(raw_src[:4]), ipaddress.IPv4Address(raw_dst[:4])
    else:
        src, dst = ipaddress.IPv6Address(raw_src), ipaddress.IPv6Address(raw_dst)
    pos = 72
    while pos + 4 <= len(body):
        alen, atype = struct.unpack_from("=HH", body, pos)
        if alen < 4:
            break
        if atype == INET_DIAG_INFO:
            (iface,) = struct.unpack_from("=I", body, 40)
            return DiagEntry(body[1], src, sport, dst, dport, inode, body[pos + 4:pos + alen],
                             iface, body[44:52])
        pos += (alen + 3) & ~3
    return None


def _decode(info: bytes) -> SocketCounters | None:
    if len(info) < _SEGS_IN + 4:
        return None
    acked, received = struct.unpack_from("=QQ", info, _BYTES_ACKED)
    segs_out, segs_in = struct.unpack_from("=II", info, _SEGS_OUT)
    return SocketCounters(acked, received, segs_out, segs_in)
