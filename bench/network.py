"""``rabo bench network``: a real job across network namespaces, bytes checked against the kernel.

Each worker gets its own "host": a Linux network namespace connected to the coordinator's
namespace by its own veth pair and subnet, with a token-bucket (``tc ... tbf``) rate limit on
both ends of the link (the coordinator-side egress limits what the worker downloads, the
worker-side egress what it uploads)::

    coordinator ns                         worker ns i
    nb<tag>c<i>  10.231.<i>.1/24  <-veth->  nb<tag>w<i>  10.231.<i>.2/24
    tbf rate R_i (download)                 tbf rate R_i (upload)

The coordinator (``python -m rabo.cli coordinator``, bound to 0.0.0.0) runs in its namespace,
each worker (``python -m worker``) in its own, talking over real TCP through the veths. Per
worker the job's accounting (``metrics.jsonl``: the per-round ``wire_*_l2_bytes``, i.e. the
coordinator's tcp_info counters of that worker's connection plus 66 header bytes per segment)
is compared with the byte counters of the worker's veth (rx + tx, read in the worker's
namespace before the worker starts and after every process has exited), and with the whole
connection's tcp_info counters, sampled from inside the worker's namespace until the socket is
gone. See docs/multihost.md for the topology, what each side counts and measured numbers.

Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN), ``ip`` and ``tc`` with the tbf qdisc. Only
stdlib imports here: the module is cheap to import and runs without gRPC or torch in this
process (the coordinator and workers are subprocesses).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rabo import netstat
from rabo.errors import ExitCode, RaboError

ROOT = Path(__file__).resolve().parents[1]
PORT = 50051  # inside the coordinator's own namespace: never collides with anything
SUBNET = "10.231"  # 10.231.<i>.0/24 per worker link, only inside the namespaces made here
HEADER_BYTES = netstat.HEADER_BYTES_PER_SEGMENT  # one full frame's headers
MTU_FRAME = 1500 + 14
# tbf: a bucket of 2048 bytes holds one full frame (1514 B) but not two. tbf software-segments
# every GSO super-packet whose size exceeds what the bucket holds, so with this burst every TCP
# segment leaves the qdisc as its own frame and the veth counts 66 header bytes per segment, as
# a real wire would. With a bucket of 64 KiB, GSO packets of up to 44 segments pass whole and
# the veth counts one set of headers for all of them (measured in a 3-round job: the 66-byte
# per-segment accounting 1.9% and 3.1% above the veth counters; with no tbf at all, 4.4%).
# Finer-grained tokens cost timer wake-ups, not throughput (bulk TCP through these links:
# 94 Mbit/s of payload at 100 Mbit/s, 9.55 at 10).
DEFAULT_BURST = 2048
# tbf's queue limit is rate x latency + burst. 500 ms is deep enough that TCP's start-up
# overshoot is queued, not dropped, so no segment is sent twice. (With 20 ms the 10 Mbit/s link
# dropped 584 packets in a 3-round job and the worker retransmitted 93 KB; the per-round
# accounting still agreed within 0.05%, as the coordinator counts received bytes once and only
# segments that arrived, but dropped segments' headers and ACKs with SACK blocks blur the
# 66-byte model.)
DEFAULT_LATENCY_MS = 500.0


class NetbenchError(RaboError, RuntimeError):
    """The topology or the job failed; the message says what and where."""


class Unsupported(NetbenchError):
    """Namespaces, veths or tbf cannot be created here."""


# --------------------------------------------------------------------------- commands


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0
         ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise NetbenchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def check_support() -> str | None:
    """None where namespaces, veth pairs and tbf work here, else why not (tried, not guessed)."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"rabo-probe-{secrets.token_hex(3)}"
    try:
        proc = _run(["ip", "netns", "add", probe], check=False)
        if proc.returncode != 0:
            who = "" if os.geteuid() == 0 else " (not root: needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
            return f"cannot create a network namespace{who}: " \
                   f"`ip netns add` said: {proc.stderr.strip() or proc.returncode}"
        steps = [
            ["ip", "link", "add", "rbprobe0", "netns", probe, "type", "veth",
             "peer", "name", "rbprobe1", "netns", probe],
            ["tc", "-n", probe, "qdisc", "add", "dev", "rbprobe0", "root", "tbf", "rate",
             "10mbit", "burst", str(DEFAULT_BURST), "latency", "500ms"],
        ]
        for cmd in steps:
            proc = _run(cmd, check=False)
            if proc.returncode != 0:
                what = "a veth pair" if cmd[0] == "ip" else "a tbf qdisc"
                return f"cannot create {what}: `{' '.join(cmd)}` said: " \
                       f"{proc.stderr.strip() or proc.returncode}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run iproute2: {exc}"
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run(["ip", "netns", "del", probe], check=False)


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Link:
    index: int
    ns: str  # the worker's namespace
    coord_if: str  # veth end in the coordinator's namespace
    worker_if: str  # veth end in the worker's namespace
    coord_addr: str
    worker_addr: str
    mbit: float


@dataclass
class Topology:
    tag: str
    coord_ns: str
    links: list[Link]
    burst: int
    latency_ms: float
    shaped: bool = True
    namespaces: list[str] = field(default_factory=list)  # every one created, for cleanup
    ns_inodes: dict[str, int] = field(default_factory=dict)
    cleanup_errors: list[str] = field(default_factory=list)


def netns_names() -> set[str]:
    proc = _run(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}


def processes_in(inodes: Sequence[int]) -> list[int]:
    """PIDs of processes whose network namespace is one of ``inodes``."""
    wanted = {f"net:[{i}]" for i in inodes}
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{name}/ns/net") in wanted:
                    pids.append(int(name))
    return pids


def _ns_sysctl(ns: str, *settings: str) -> None:
    # best effort: no IPv6 (no router solicitations / MLD / DAD frames on the links)
    _run(["ip", "netns", "exec", ns, "sysctl", "-qw", *settings], check=False)


@contextlib.contextmanager
def topology(bandwidths_mbit: Sequence[float], *, burst: int = DEFAULT_BURST,
             latency_ms: float = DEFAULT_LATENCY_MS, shape: bool = True) -> Iterator[Topology]:
    """A coordinator namespace and one namespace per worker, each linked to the coordinator's
    by its own rate-limited veth pair (``shape=False``: no tbf, the links run as fast as the
    CPUs go and GSO packets reach the veths whole). Everything it created is removed on the way
    out, whatever the way out (exception, KeyboardInterrupt); a second Ctrl-C during the
    clean-up is held until the clean-up is done."""
    if not bandwidths_mbit:
        raise ValueError("at least one worker link")
    if len(bandwidths_mbit) > 250:
        raise ValueError("at most 250 worker links (one /24 each)")
    if shape and burst < MTU_FRAME:
        raise ValueError(f"burst {burst} B is less than one full frame ({MTU_FRAME} B): tbf "
                         "would drop every full-size packet")
    tag = secrets.token_hex(3)
    topo = Topology(tag=tag, coord_ns=f"rabo-nb-{tag}-c", links=[], burst=burst,
                    latency_ms=latency_ms, shaped=shape)
    try:
        _build(topo, bandwidths_mbit)
        yield topo
    finally:
        _teardown(topo)


def _add_ns(topo: Topology, ns: str) -> None:
    _run(["ip", "netns", "add", ns])
    topo.namespaces.append(ns)
    with contextlib.suppress(OSError):
        topo.ns_inodes[ns] = os.stat(f"/run/netns/{ns}").st_ino
    _ns_sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    _run(["ip", "-n", ns, "link", "set", "lo", "up"])


def _build(topo: Topology, bandwidths_mbit: Sequence[float]) -> None:
    _add_ns(topo, topo.coord_ns)
    for i, mbit in enumerate(bandwidths_mbit):
        if not mbit > 0:
            raise ValueError(f"bandwidth {mbit} Mbit/s: must be > 0")
        link = Link(index=i, ns=f"rabo-nb-{topo.tag}-w{i}", coord_if=f"nb{topo.tag}c{i}",
                    worker_if=f"nb{topo.tag}w{i}", coord_addr=f"{SUBNET}.{i}.1",
                    worker_addr=f"{SUBNET}.{i}.2", mbit=float(mbit))
        _add_ns(topo, link.ns)
        # both ends are created directly in their namespaces: nothing ever appears in the
        # caller's namespace, so names cannot collide with its interfaces
        _run(["ip", "link", "add", link.coord_if, "netns", topo.coord_ns, "type", "veth",
              "peer", "name", link.worker_if, "netns", link.ns])
        topo.links.append(link)
        for ns, dev, addr in ((topo.coord_ns, link.coord_if, link.coord_addr),
                              (link.ns, link.worker_if, link.worker_addr)):
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            if topo.shaped:
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                      "rate", f"{mbit:g}mbit", "burst", str(topo.burst),
                      "latency", f"{topo.latency_ms:g}ms"])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])


def _teardown(topo: Topology) -> None:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        inodes = [topo.ns_inodes[n] for n in topo.namespaces if n in topo.ns_inodes]
        # a namespace lives while a process is in it: kill what the job left there (only
        # processes started in these namespaces, which only this module's jobs are)
        for pid in processes_in(inodes):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                topo.cleanup_errors.append(f"killed leftover process {pid}")
        for link in topo.links:
            proc = _run(["ip", "-n", topo.coord_ns, "link", "del", link.coord_if], check=False)
            if proc.returncode != 0 and "Cannot find device" not in proc.stderr:
                topo.cleanup_errors.append(f"veth {link.coord_if}: {proc.stderr.strip()}")
        for ns in reversed(topo.namespaces):
            proc = _run(["ip", "netns", "del", ns], check=False)
            if proc.returncode != 0:
                topo.cleanup_errors.append(f"netns {ns}: {proc.stderr.strip()}")
        left = netns_names() & set(topo.namespaces)
        if left:
            topo.cleanup_errors.append(f"namespaces still present: {sorted(left)}")
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --------------------------------------------------------------------------- counters


def iface_counters(ns: str, dev: str) -> dict[str, int]:
    """rx/tx bytes and packets of ``dev`` in namespace ``ns`` (what ``ip -s link`` shows)."""
    data = json.loads(_run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev]).stdout)
    s = data[0]["stats64"]
    return {"rx_bytes": s["rx"]["bytes"], "tx_bytes": s["tx"]["bytes"],
            "rx_packets": s["rx"]["packets"], "tx_packets": s["tx"]["packets"]}


def qdisc_stats(ns: str, dev: str) -> dict[str, int]:
    proc = _run(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev], check=False)
    try:
        q = next(q for q in json.loads(proc.stdout) if q.get("kind") == "tbf")
    except (ValueError, StopIteration):
        return {}
    return {k: int(q.get(k, 0)) for k in ("bytes", "packets", "drops", "overlimits")}


# sock_diag, read from inside another namespace (a netlink socket belongs to the namespace of
# the thread that opened it, so one short-lived thread switches namespace and opens it)
_TCP_LISTEN = 10
_CLONE_NEWNET = 0x40000000
_TCPI = {"total_retrans": (100, "I"), "bytes_acked": (120, "Q"), "bytes_received": (128, "Q"),
         "segs_out": (136, "I"), "segs_in": (140, "I"), "data_segs_in": (152, "I"),
         "data_segs_out": (156, "I"), "bytes_sent": (200, "Q"), "bytes_retrans": (208, "Q")}


def _netlink_in(ns: str) -> socket.socket:
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, Any] = {}

    def opener() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
                out["sock"] = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                            netstat.NETLINK_SOCK_DIAG)
            finally:
                os.close(fd)
        except OSError as exc:
            out["error"] = exc

    t = threading.Thread(target=opener, name=f"setns-{ns}")
    t.start()
    t.join()
    if "error" in out:
        raise NetbenchError(f"cannot read TCP counters in {ns}: {out['error']}")
    return out["sock"]


def _tcp_dump(sock: socket.socket, seq: int) -> Iterator[tuple[tuple[str, int, str, int],
                                                             dict[str, int]]]:
    """(local addr, port, remote addr, port) and tcp_info counters of every IPv4 TCP socket
    that has them (not listeners, not TIME_WAIT)."""
    for e in netstat.sock_diag_dump(sock, socket.AF_INET, 0xFFF, seq):
        if e.state == _TCP_LISTEN:
            continue
        yield (str(e.src), e.sport, str(e.dst), e.dport), {
            k: struct.unpack_from("=" + f, e.info, off)[0] for k, (off, f) in _TCPI.items()
            if off + struct.calcsize(f) <= len(e.info)}


class ConnectionSampler:
    """Polls the tcp_info of every TCP socket in some namespaces and keeps each connection's
    last counters: the whole connection's traffic, including what happens between rounds,
    up to the last poll before the socket reaches TIME_WAIT (at most the final ACK missed)."""

    def __init__(self, namespaces: Sequence[str], interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self._socks = {ns: _netlink_in(ns) for ns in namespaces}
        self.last: dict[str, dict[tuple[str, int, str, int], dict[str, int]]] = {
            ns: {} for ns in namespaces}
        self.polls = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="netbench-sampler", daemon=True)

    def __enter__(self) -> ConnectionSampler:
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        for s in self._socks.values():
            s.close()

    def poll(self) -> None:
        self.polls += 1
        for ns, s in self._socks.items():
            try:
                for key, counters in _tcp_dump(s, self.polls):
                    self.last[ns][key] = counters
            except OSError as exc:
                if len(self.errors) < 5:
                    self.errors.append(f"{ns}: {exc}")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()


# --------------------------------------------------------------------------- the job


@dataclass
class WorkerResult:
    index: int
    client_id: int
    worker_id: str | None
    bandwidth_mbit: float
    ratio: float | None
    rounds: int
    payload_bytes: int  # tensor bytes, both directions, summed over rounds
    accounted_wire_bytes: int  # metrics wire_down + wire_up (TCP payload), summed over rounds
    accounted_l2_bytes: int  # metrics wire_*_l2 (+66 B per segment), summed over rounds
    interface_bytes: int  # worker veth rx + tx, worker start -> every process gone
    interface_packets: int
    interface_rx_bytes: int
    interface_tx_bytes: int
    agreement: float  # accounted_l2_bytes / interface_bytes
    outside_rounds_bytes: int  # interface_bytes - accounted_l2_bytes
    connection_wire_bytes: int | None  # the whole connection's tcp_info, worker side
    connection_l2_bytes: int | None  # ... + 66 B per segment
    connection_segments: int | None
    connection_agreement: float | None  # connection_l2_bytes / interface_bytes
    connections: int
    retrans_bytes: int | None  # bytes the worker retransmitted
    qdisc_drops: int  # tbf drops on both ends of the link
    transfer_s: list[float]
    transfer_s_mean: float
    throughput_mbit: float | None  # accounted L2 bytes over the summed transfer seconds
    ratios: list[float] = field(default_factory=list)  # per round it took part in
    round_s: list[float] = field(default_factory=list)  # its compute + transfer per round


@dataclass
class JobResult:
    workers: list[WorkerResult]
    rounds: int
    rounds_completed: int
    round_retries: int
    summary: dict[str, Any]
    out_dir: str
    wall_s: float
    burst: int
    latency_ms: float
    shaped: bool
    hidden: int
    sampler_polls: int
    notes: list[str]
    round_s: list[float] = field(default_factory=list)  # per round, opened to aggregated
    # (wall_s since the first round opened, test accuracy) per evaluated round
    timeline: list[tuple[float, float]] = field(default_factory=list)


def job_overrides(n_workers: int, rounds: int, hidden: int, ratios: Sequence[float] | None
                  ) -> list[str]:
    """The bench's job; ``ratios`` None: the ratio policy chooses (no ``clients.ratios``)."""
    fixed = [f"clients.ratios=[{','.join(f'{r:g}' for r in ratios)}]"] if ratios else []
    return ["data.dataset=digits", f"model.hidden=[{hidden},{hidden}]",
            f"clients.count={n_workers}", *fixed, f"rounds={rounds}",
            "inner.steps=1", "data.batch_size=32", "outer.optimizer=sgd",
            "cluster.register_timeout_s=120"]


def policy_overrides(policy: str, deadline_s: float) -> list[str]:
    """``memory``: the ratio policy on memory alone (equal workers all get the largest
    ratio); ``link``: step plus transfer time must fit ``deadline_s`` (policy.link)."""
    if policy == "link":
        return ["policy.link=true", f"policy.deadline_s={deadline_s:g}"]
    return []


def payload_estimate(hidden: int, ratio: float = 1.0) -> int:
    """Bytes a worker moves per round, both directions (x, y and v slices of the digits MLP
    64-h-h-10 each way, float32); for the time-out only."""
    h = max(1, int(hidden * ratio))
    x = 64 * h + h + h * h + h
    y = h * 10 + 10
    return 2 * 4 * (x + 2 * y)


def _spawn(ns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, GRPC_VERBOSITY="ERROR", PYTHONUNBUFFERED="1")
    prefix = ["ip", "netns", "exec", ns]
    if shutil.which("setpriv"):  # dies with this process, even on SIGKILL
        prefix += ["setpriv", "--pdeathsig", "KILL", "--"]
    with open(log, "ab") as fh:
        # own session: a terminal's Ctrl-C reaches this process, which stops them in order
        return subprocess.Popen(prefix + argv, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)


def _stop(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 3.0) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def _listening(pid: int, port: int, netns: str | None) -> bool:
    """Whether process ``pid``, once inside the namespace ``netns`` ('net:[inode]'), has a
    socket listening on ``port`` there."""
    try:
        if netns is not None and os.readlink(f"/proc/{pid}/ns/net") != netns:
            return False  # still `ip netns exec` in the caller's namespace
    except OSError:
        return False
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A" and parts[1].endswith(f":{port:04X}"):
                return True
    return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + s for s in text[-lines:])


def run_job(topo: Topology, *, rounds: int = 3, hidden: int = 512,
            ratios: Sequence[float] | None = (1.0,), out_dir: str | Path,
            timeout_s: float | None = None, extra_overrides: Sequence[str] = (),
            python: str = sys.executable, worker_args: Sequence[str] = ()) -> JobResult:
    """Runs the coordinator in ``topo.coord_ns`` and worker i in ``topo.links[i].ns`` until the
    coordinator exits, then compares each worker's accounting with its veth's counters.
    ``ratios`` None: the ratio policy chooses. Every process it started is gone when it
    returns or raises."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(topo.links)
    ratio_of = [float(ratios[i % len(ratios)]) if ratios else 1.0 for i in range(n)]
    if timeout_s is None:
        slowest = max(payload_estimate(hidden, r) * 1.1 * 8 / (lk.mbit * 1e6)
                      for lk, r in zip(topo.links, ratio_of, strict=True))
        timeout_s = 120.0 + rounds * (3 * slowest + 5)
    overrides = job_overrides(n, rounds, hidden, ratio_of if ratios else None) \
        + list(extra_overrides)
    run_dir = out / "run"
    coord_argv = [python, "-m", "rabo.cli", "coordinator", "--bind", f"0.0.0.0:{PORT}",
                  "--out", str(run_dir), "--overwrite"]
    for o in overrides:
        coord_argv += ["--set", o]
    procs: list[subprocess.Popen[bytes]] = []
    workers: list[subprocess.Popen[bytes]] = []
    before: list[dict[str, int]] = []
    notes: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    coord_net = f"net:[{topo.ns_inodes[topo.coord_ns]}]" if topo.coord_ns in topo.ns_inodes \
        else None
    try:
        coord = _spawn(topo.coord_ns, coord_argv, out / "coordinator.log")
        procs.append(coord)
        while not _listening(coord.pid, PORT, coord_net):
            if coord.poll() is not None:
                raise NetbenchError(f"the coordinator exited with {coord.returncode} before "
                                    f"listening:\n{_tail(out / 'coordinator.log')}")
            if time.monotonic() > min(deadline, t0 + 60):
                raise NetbenchError("the coordinator did not listen within 60 s:\n"
                                    + _tail(out / "coordinator.log"))
            time.sleep(0.05)
        with ConnectionSampler([lk.ns for lk in topo.links]) as sampler:
            for lk in topo.links:
                before.append(iface_counters(lk.ns, lk.worker_if))
                w = _spawn(lk.ns, [python, "-m", "worker", "--coordinator",
                                   f"{lk.coord_addr}:{PORT}", "--client-id", str(lk.index),
                                   "--threads", "1", "--name", f"netbench-{lk.index}",
                                   *worker_args],
                           out / f"worker-{lk.index}.log")
                procs.append(w)
                workers.append(w)
            while coord.poll() is None:
                if time.monotonic() > deadline:
                    raise NetbenchError(
                        f"time-out: the job ran longer than {timeout_s:.0f} s; coordinator "
                        f"log:\n{_tail(out / 'coordinator.log')}")
                for lk, w in zip(topo.links, workers, strict=True):
                    if w.poll() is not None and w.returncode != 0:
                        raise NetbenchError(
                            f"worker {lk.index} exited with {w.returncode}:\n"
                            + _tail(out / f"worker-{lk.index}.log"))
                time.sleep(0.05)
            if coord.returncode != 0:
                raise NetbenchError(f"the coordinator exited with {coord.returncode}:\n"
                                    + _tail(out / "coordinator.log"))
            # the coordinator has sent every worker Finished; give them a moment to exit
            end = time.monotonic() + 20
            for lk, w in zip(topo.links, workers, strict=True):
                try:
                    w.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    notes.append(f"worker {lk.index} did not exit within 20 s of the "
                                 "coordinator; stopped")
                if w.returncode not in (0, None):
                    notes.append(f"worker {lk.index} exited with {w.returncode}")
            _stop(procs)
            time.sleep(0.3)  # TCP teardown (FIN / ACK) of the closed sockets
        after = [iface_counters(lk.ns, lk.worker_if) for lk in topo.links]
    finally:
        _stop(procs)
    wall = time.monotonic() - t0
    if sampler.errors:
        notes.append("sampler: " + "; ".join(sampler.errors))
    return _collect(topo, run_dir, rounds, hidden, ratio_of, before, after, sampler, wall, out,
                    notes)


def _collect(topo: Topology, run_dir: Path, rounds: int, hidden: int, ratio_of: list[float],
             before: list[dict[str, int]], after: list[dict[str, int]],
             sampler: ConnectionSampler, wall: float, out: Path, notes: list[str]) -> JobResult:
    try:
        records = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if s.strip()]
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise NetbenchError(f"no metrics from the coordinator ({exc}):\n"
                            + _tail(out / "coordinator.log")) from None
    results = []
    for lk, b, a in zip(topo.links, before, after, strict=True):
        mine = [c for rec in records for c in rec.get("clients", [])
                if c.get("client_id") == lk.index and c.get("arrived", True)]
        missing = [k for k in ("wire_down_l2_bytes", "wire_up_l2_bytes", "wire_down_bytes",
                               "wire_up_bytes") if any(c.get(k) is None for c in mine)]
        if missing:
            raise NetbenchError(f"worker {lk.index}: the metrics have no {missing[0]} "
                                "(kernel TCP counters unavailable to the coordinator)")
        acc_l2 = sum(c["wire_down_l2_bytes"] + c["wire_up_l2_bytes"] for c in mine)
        acc_wire = sum(c["wire_down_bytes"] + c["wire_up_bytes"] for c in mine)
        payload = sum((c.get("payload_down_bytes") or 0) + (c.get("payload_up_bytes") or 0)
                      for c in mine)
        d = {k: a[k] - b[k] for k in a}
        iface = d["rx_bytes"] + d["tx_bytes"]
        conns = {key: c for key, c in sampler.last[lk.ns].items()
                 if key[2] == lk.coord_addr and key[3] == PORT}
        cw: int | None = None
        segs: int | None = None
        cl2: int | None = None
        retrans: int | None = None
        if conns:
            cw = sum(c.get("bytes_acked", 0) + c.get("bytes_received", 0)
                     for c in conns.values())
            segs = sum(c.get("segs_out", 0) + c.get("segs_in", 0) for c in conns.values())
            cl2 = cw + HEADER_BYTES * segs
            retrans = sum(c.get("bytes_retrans", 0) for c in conns.values())
        drops = sum(qdisc_stats(ns, dev).get("drops", 0)
                    for ns, dev in ((topo.coord_ns, lk.coord_if), (lk.ns, lk.worker_if)))
        transfer = [float(c.get("transfer_s") or 0.0) for c in mine]
        total_t = sum(transfer)
        results.append(WorkerResult(
            index=lk.index, client_id=lk.index,
            worker_id=mine[0].get("worker_id") if mine else None, bandwidth_mbit=lk.mbit,
            ratio=mine[0].get("ratio") if mine else ratio_of[lk.index], rounds=len(mine),
            payload_bytes=payload, accounted_wire_bytes=acc_wire, accounted_l2_bytes=acc_l2,
            interface_bytes=iface, interface_packets=d["rx_packets"] + d["tx_packets"],
            interface_rx_bytes=d["rx_bytes"], interface_tx_bytes=d["tx_bytes"],
            agreement=acc_l2 / iface if iface else float("nan"),
            outside_rounds_bytes=iface - acc_l2, connection_wire_bytes=cw,
            connection_l2_bytes=cl2, connection_segments=segs,
            connection_agreement=(cl2 / iface if cl2 is not None and iface else None),
            connections=len(conns), retrans_bytes=retrans, qdisc_drops=drops,
            transfer_s=transfer, transfer_s_mean=total_t / len(transfer) if transfer else 0.0,
            throughput_mbit=acc_l2 * 8 / total_t / 1e6 if total_t > 0 else None,
            ratios=[float(c.get("ratio") or 0.0) for c in mine],
            round_s=[float(c.get("compute_s") or 0.0) + float(c.get("transfer_s") or 0.0)
                     for c in mine]))
    done = sorted({rec.get("round") for rec in records})
    return JobResult(workers=results, rounds=rounds, rounds_completed=len(done),
                     round_retries=int(summary.get("round_retries") or 0), summary=summary,
                     out_dir=str(out), wall_s=wall, burst=topo.burst, latency_ms=topo.latency_ms,
                     shaped=topo.shaped, hidden=hidden, sampler_polls=sampler.polls, notes=notes,
                     round_s=[float(rec.get("round_s") or 0.0) for rec in records],
                     timeline=[(float(rec["wall_s"]), float(rec["test_acc"])) for rec in records
                               if rec.get("test_acc") is not None])


# --------------------------------------------------------------------------- command


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: comma-separated numbers, got {text!r}"
                                         ) from None
    if not vals or any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{what}: positive numbers, got {text!r}")
    return vals


def add_network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bandwidths", default="100,10", metavar="MBIT,...",
                   type=lambda s: _floats(s, "--bandwidths"),
                   help="one worker per entry: its link rate in Mbit/s (default 100,10)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512,
                   help="MLP width h of the digits model 64-h-h-10 (512: ~2.4 MB per worker "
                        "and round at ratio 1)")
    p.add_argument("--ratios", default="1", type=lambda s: _floats(s, "--ratios"),
                   help="width ratio per worker, cycled (default 1: every worker moves the "
                        "same bytes); with --policy fixed only")
    p.add_argument("--policy", choices=("fixed", "memory", "link"), default="fixed",
                   help="fixed: the --ratios; memory: the ratio policy on memory alone (equal "
                        "workers, --memory-limit 4GiB each); link: runs the memory job and then "
                        "the same job with policy.link and policy.deadline_s=--deadline, and "
                        "compares round time and accuracy at equal wall time (default fixed)")
    p.add_argument("--deadline", type=float, default=2.0, metavar="S",
                   help="policy.deadline_s of the --policy link job (default 2)")
    p.add_argument("--burst", type=int, default=DEFAULT_BURST,
                   help=f"tbf bucket in bytes (default {DEFAULT_BURST}: one frame, so tbf cuts "
                        "every GSO packet into frames)")
    p.add_argument("--latency-ms", type=float, default=DEFAULT_LATENCY_MS,
                   help="tbf queue limit as a delay (default 500)")
    p.add_argument("--no-tbf", action="store_true",
                   help="no rate limit (to see what the veths count without tbf's segmentation)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop everything after this long (default: from the sizes)")
    p.add_argument("--out", metavar="DIR",
                   help="keep the run folder and logs here (default: a temporary folder)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="extra config override for the job (repeatable)")
    p.add_argument("--json", action="store_true")


def format_table(res: JobResult) -> str:
    head = (f"{'worker':>6} {'Mbit/s':>7} {'ratio':>5} {'accounted_B':>12} {'interface_B':>12} "
            f"{'acc/iface':>9} {'conn_B':>12} {'conn/iface':>10} {'outside_B':>9} "
            f"{'transfer_s':>10}  per round")
    rows = [head]
    for w in res.workers:
        conn = "-" if w.connection_l2_bytes is None else f"{w.connection_l2_bytes:,}"
        cagr = "-" if w.connection_agreement is None else f"{w.connection_agreement:.4f}"
        ratio = "-" if w.ratio is None else f"{w.ratio:g}"
        rate = f"{w.bandwidth_mbit:g}" if res.shaped else "none"
        rows.append(f"{w.index:>6} {rate:>7} {ratio:>5} {w.accounted_l2_bytes:>12,} "
                    f"{w.interface_bytes:>12,} {w.agreement:>9.4f} {conn:>12} {cagr:>10} "
                    f"{w.outside_rounds_bytes:>9,} {w.transfer_s_mean:>10.3f}  "
                    + " ".join(f"{t:.3f}" for t in w.transfer_s))
    return "\n".join(rows)


EQUAL_MEMORY = "4GiB"  # every worker's --memory-limit under --policy memory|link


def accuracy_at(timeline: Sequence[tuple[float, float]], wall_s: float) -> float | None:
    """Test accuracy of the last evaluated round that ended by ``wall_s``."""
    seen = [acc for t, acc in timeline if t <= wall_s + 1e-9]
    return seen[-1] if seen else None


@dataclass
class PolicyComparison:
    memory: JobResult
    link: JobResult
    deadline_s: float
    round_s_memory: float  # median round time, the rounds after the first
    round_s_link: float
    speedup: float  # round_s_memory / round_s_link
    equal_wall_s: float  # the shorter run's wall time at its last round
    acc_memory: float | None  # test accuracy at equal_wall_s
    acc_link: float | None
    slowest_link_round_s: float  # the link job's slowest worker round after the probe


def _median(xs: Sequence[float]) -> float:
    ys = sorted(xs)
    if not ys:
        return 0.0
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else 0.5 * (ys[mid - 1] + ys[mid])


def compare_policies(topo: Topology, *, rounds: int, hidden: int, deadline_s: float,
                     out_dir: Path, timeout_s: float | None = None,
                     extra_overrides: Sequence[str] = ()) -> PolicyComparison:
    """The same job under the memory-only policy (``rounds`` rounds) and under policy.link
    with a deadline, on the same links; the link job runs as many rounds as fit the memory
    job's wall time at the deadline (at least ``rounds``), so that the two can be compared at
    equal rounds (round time, rounds after the first: the link job's probe round) and at
    equal wall time (accuracy)."""
    jobs: dict[str, JobResult] = {}
    for policy in ("memory", "link"):
        n = rounds
        if policy == "link" and jobs["memory"].timeline:
            n = max(rounds, int(jobs["memory"].timeline[-1][0] / deadline_s))
        jobs[policy] = run_job(
            topo, rounds=n, hidden=hidden, ratios=None, out_dir=out_dir / policy,
            timeout_s=timeout_s, worker_args=["--memory-limit", EQUAL_MEMORY],
            extra_overrides=[*policy_overrides(policy, deadline_s), *extra_overrides])
    mem, link = jobs["memory"], jobs["link"]
    rm, rl = _median(mem.round_s[1:]), _median(link.round_s[1:])
    equal = min(mem.timeline[-1][0] if mem.timeline else 0.0,
                link.timeline[-1][0] if link.timeline else 0.0)
    slowest = max((t for w in link.workers for t in w.round_s[1:]), default=0.0)
    return PolicyComparison(mem, link, deadline_s, rm, rl, rm / rl if rl > 0 else float("nan"),
                            equal, accuracy_at(mem.timeline, equal),
                            accuracy_at(link.timeline, equal), slowest)


def format_comparison(c: PolicyComparison) -> str:
    def pct(a: float | None) -> str:
        return "-" if a is None else f"{100 * a:.1f}%"

    def spread(xs: Sequence[float], fmt: str) -> str:
        """First value, then the distinct values of the rest (round 1 is the link probe)."""
        if not xs:
            return "-"
        rest = sorted(set(xs[1:]))
        tail = (f"{rest[0]:{fmt}}" if len(rest) == 1 else
                f"{min(rest):{fmt}}..{max(rest):{fmt}}") if rest else ""
        return f"{xs[0]:{fmt}}, then {tail}" if tail else f"{xs[0]:{fmt}}"

    rows = [f"{'worker':>6} {'Mbit/s':>7} {'memory: ratio':>18} {'link: ratio':>20} "
            f"{'memory: round_s':>20} {'link: round_s':>20}  (round 1, then the rest)"]
    for wm, wl in zip(c.memory.workers, c.link.workers, strict=True):
        rows.append(f"{wm.index:>6} {wm.bandwidth_mbit:>7g} {spread(wm.ratios, 'g'):>18} "
                    f"{spread(wl.ratios, 'g'):>20} {spread(wm.round_s, '.2f'):>20} "
                    f"{spread(wl.round_s, '.2f'):>20}")
    rows += [
        f"median round time after round 1: memory {c.round_s_memory:.2f}s, link "
        f"{c.round_s_link:.2f}s: {c.speedup:.1f}x shorter (deadline {c.deadline_s:g}s; the "
        f"link job's slowest worker round after its probe {c.slowest_link_round_s:.2f}s)",
        f"wall time: memory {c.memory.wall_s:.1f}s, link {c.link.wall_s:.1f}s for "
        f"{c.memory.rounds_completed} and {c.link.rounds_completed} rounds",
        f"test accuracy at equal wall time ({c.equal_wall_s:.1f}s, the shorter run's last "
        f"round): memory {pct(c.acc_memory)}, link {pct(c.acc_link)}"
        f" ({sum(1 for t, _ in c.link.timeline if t <= c.equal_wall_s + 1e-9)} rounds); at "
        f"the end: memory "
        f"{pct(c.memory.timeline[-1][1] if c.memory.timeline else None)}, link "
        f"{pct(c.link.timeline[-1][1] if c.link.timeline else None)}"]
    return "\n".join(rows)


def cmd_bench_network(args: argparse.Namespace) -> int:
    bandwidths = args.bandwidths if isinstance(args.bandwidths, list) \
        else _floats(str(args.bandwidths), "--bandwidths")
    ratios = args.ratios if isinstance(args.ratios, list) else _floats(str(args.ratios),
                                                                       "--ratios")
    why = check_support()
    if why is not None:
        print(f"rabo bench network: cannot build the namespaces here: {why}. It needs root "
              "(CAP_NET_ADMIN and CAP_SYS_ADMIN), iproute2 (`ip`, `tc`) and the tbf qdisc.",
              file=sys.stderr)
        return ExitCode.USAGE
    if args.rounds < 1 or args.hidden < 1:
        print("rabo bench network: --rounds and --hidden must be >= 1", file=sys.stderr)
        return ExitCode.USAGE
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="rabo-netbench-")
    out = Path(args.out) if args.out else Path(tmp.name)  # type: ignore[union-attr]
    if not args.json:
        links = "no rate limit (--no-tbf)" if args.no_tbf else \
            f"tbf at {','.join(f'{b:g}' for b in bandwidths)} Mbit/s (burst {args.burst} B, " \
            f"latency {args.latency_ms:g} ms)"
        print(f"rabo bench network: coordinator + {len(bandwidths)} workers in their own network "
              f"namespaces, one veth pair each, {links}, digits MLP "
              f"64-{args.hidden}-{args.hidden}-10, {args.rounds} rounds", flush=True)
    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM: stop and clean up as after Ctrl-C

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with topology(bandwidths, burst=args.burst, latency_ms=args.latency_ms,
                      shape=not args.no_tbf) as topo:
            if args.policy == "link":
                comp = compare_policies(topo, rounds=args.rounds, hidden=args.hidden,
                                        deadline_s=args.deadline, out_dir=out,
                                        timeout_s=args.timeout, extra_overrides=args.overrides)
                res = comp.link
            else:
                res = run_job(topo, rounds=args.rounds, hidden=args.hidden,
                              ratios=ratios if args.policy == "fixed" else None, out_dir=out,
                              timeout_s=args.timeout, extra_overrides=args.overrides,
                              worker_args=([] if args.policy == "fixed"
                                           else ["--memory-limit", EQUAL_MEMORY]))
        res.notes.extend(topo.cleanup_errors)
    except KeyboardInterrupt:
        print("rabo bench network: interrupted; processes and namespaces removed",
              file=sys.stderr)
        return 130
    except (NetbenchError, ValueError, OSError, subprocess.SubprocessError) as exc:
        print(f"rabo bench network: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if tmp is not None:
            tmp.cleanup()
    if args.policy == "link":
        if args.json:
            import datetime

            out_json = {"command": "rabo bench network " + " ".join(sys.argv[3:])
                        if sys.argv[1:3] == ["bench", "network"] else "rabo bench network",
                        "generated": datetime.datetime.now(datetime.timezone.utc).strftime(
                            "%Y-%m-%d %H:%M UTC"), **asdict(comp)}
            print(json.dumps(out_json, indent=2, default=str))
        else:
            print(format_comparison(comp))
            for note in res.notes:
                print(f"note: {note}")
        return 0
    if args.json:
        print(json.dumps(asdict(res), indent=2, default=str))
        return 0
    print(format_table(res))
    print(f"rounds completed {res.rounds_completed}/{res.rounds} (retries {res.round_retries}),"
          f" wall {res.wall_s:.1f}s")
    print("accounted_B: metrics wire_down_l2 + wire_up_l2 summed over rounds (TCP payload + 66 B"
          " per segment); interface_B: rx + tx of the worker's veth, from before the worker "
          "started to after every process exited; conn_B: the worker's whole connection "
          "(tcp_info + 66 B per segment); outside_B: interface_B - accounted_B (registration, "
          "heartbeats and polls between rounds, handshake, teardown, ARP)")
    for w in res.workers:
        extra = []
        if w.retrans_bytes:
            extra.append(f"{w.retrans_bytes:,} B retransmitted")
        if w.qdisc_drops:
            extra.append(f"{w.qdisc_drops} tbf drops")
        tput = "-" if w.throughput_mbit is None else f"{w.throughput_mbit:.1f}"
        print(f"  worker {w.index}: wire (no headers) {w.accounted_wire_bytes:,} B, payload "
              f"{w.payload_bytes:,} B, {w.interface_packets:,} frames, {w.connections} "
              f"connection(s), {tput} Mbit/s over the transfer time"
              + (f"; {', '.join(extra)}" if extra else ""))
    for note in res.notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rabo bench network", description=__doc__.split("\n")[0])
    add_network_args(p)
    return cmd_bench_network(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
