"""A real job across network namespaces with rate-limited veth links (bench/network.py).

The coordinator runs in one namespace, each worker in its own, linked by a veth pair with tbf
at 100 and 10 Mbit/s. Checked: every round completes; per worker, the job's byte accounting
(per-round wire_*_l2_bytes from metrics.jsonl) agrees within 2% with the byte counters of the
worker's veth; the 10 Mbit/s worker's transfers take clearly longer; and nothing (namespaces,
veths, processes) is left behind, also when the job or the caller fails. Skipped where network
namespaces, veths or tbf cannot be created (tried, not guessed from the uid). Addresses used:
10.231.<i>.0/24 inside the namespaces created here, nothing else.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

import pytest

from bench import network as netbench

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def netns_ok() -> None:
    why = netbench.check_support()
    if why is not None:
        pytest.skip(f"network namespaces with veth + tbf unavailable here: {why}")


def _interfaces_in(ns_fd: int) -> list[str]:
    """Interface names in the namespace behind ``ns_fd`` (read from a thread switched into it)."""
    out: dict[str, object] = {}

    def look() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(ns_fd, 0x40000000) != 0:  # CLONE_NEWNET
            out["error"] = os.strerror(ctypes.get_errno())
            return
        out["names"] = [name for _, name in socket.if_nameindex()]

    t = threading.Thread(target=look)
    t.start()
    t.join()
    assert "error" not in out, out
    return out["names"]  # type: ignore[return-value]


def _assert_gone(topo: netbench.Topology, held: dict[str, int] | None = None) -> None:
    assert topo.cleanup_errors == []
    assert not netbench.netns_names() & set(topo.namespaces)
    assert not any(os.path.exists(f"/run/netns/{ns}") for ns in topo.namespaces)
    assert netbench.processes_in(list(topo.ns_inodes.values())) == []
    ours = [n for n in (name for _, name in socket.if_nameindex()) if topo.tag in n]
    assert ours == [], f"interfaces of this topology in the test's own namespace: {ours}"
    # the veths were deleted explicitly, not just left to die with their namespace: a held
    # namespace (the fd keeps it alive past `ip netns del`) has nothing but lo in it
    for ns, fd in (held or {}).items():
        assert _interfaces_in(fd) == ["lo"], ns


def _hold(topo: netbench.Topology) -> dict[str, int]:
    return {ns: os.open(f"/run/netns/{ns}", os.O_RDONLY) for ns in topo.namespaces}


def _release(held: dict[str, int]) -> None:
    for fd in held.values():
        os.close(fd)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()],
                         ids=["exception", "keyboard-interrupt"])
def test_topology_is_removed_when_the_body_raises(netns_ok: None, exc: BaseException) -> None:
    held: dict[str, int] = {}
    try:
        with pytest.raises(type(exc)):
            with netbench.topology([100, 10]) as topo:
                held = _hold(topo)
                assert set(topo.namespaces) <= netbench.netns_names()
                assert len(topo.namespaces) == 3
                for lk in topo.links:
                    assert len(lk.coord_if) <= 15 and len(lk.worker_if) <= 15
                    assert lk.worker_if in _interfaces_in(held[lk.ns])
                    assert lk.coord_if in _interfaces_in(held[topo.coord_ns])
                    # tbf on both ends of every link
                    assert netbench.qdisc_stats(topo.coord_ns, lk.coord_if) != {}
                    assert netbench.qdisc_stats(lk.ns, lk.worker_if) != {}
                raise exc
        _assert_gone(topo, held)
    finally:
        _release(held)


def test_failed_job_leaves_no_process_and_no_namespace(netns_ok: None, tmp_path) -> None:
    """A job that cannot finish in time (1 Mbit/s link, 50 rounds, 10 s) is stopped: run_job
    itself ends every process it started, and the topology goes away after it."""
    with netbench.topology([1.0]) as topo:
        inodes = list(topo.ns_inodes.values())
        with pytest.raises(netbench.NetbenchError, match="time-out"):
            netbench.run_job(topo, rounds=50, hidden=256, out_dir=tmp_path, timeout_s=10)
        assert netbench.processes_in(inodes) == []  # before the topology's own safety net
        assert (tmp_path / "worker-0.log").exists()
    _assert_gone(topo)


def test_accounting_matches_veth_counters_on_rate_limited_links(netns_ok: None,
                                                                 tmp_path) -> None:
    rounds = 3
    with netbench.topology([100, 10]) as topo:
        res = netbench.run_job(topo, rounds=rounds, hidden=512, ratios=[1.0], out_dir=tmp_path,
                               timeout_s=150)
    _assert_gone(topo)

    assert res.rounds_completed == rounds and res.round_retries == 0
    assert res.summary["rounds"] == rounds
    fast, slow = res.workers
    report = netbench.format_table(res)
    for w in res.workers:
        assert w.rounds == rounds, report
        assert w.ratio == 1.0
        assert w.connections >= 1, report  # the sampler saw the worker's connection
        # a few MB per worker: fixed per-connection costs are well under the 2% budget
        assert w.payload_bytes > 6_000_000, report
        assert abs(w.agreement - 1) <= 0.02, report
        # the whole connection, sampled inside the worker's namespace, explains the rest
        assert w.connection_agreement is not None
        assert abs(w.connection_agreement - 1) <= 0.005, report
    assert fast.payload_bytes == slow.payload_bytes  # same ratio, same bytes
    # the 10 Mbit/s link is a physical floor on the slow worker's transfer time; CPU time
    # (which load stretches) adds to both workers' times, so only the floor and the order
    # are asserted, not a ratio
    floor_s = slow.payload_bytes / rounds * 8 / 10e6
    assert slow.transfer_s_mean >= 0.8 * floor_s, report
    assert slow.transfer_s_mean > fast.transfer_s_mean, report


def test_link_policy_gives_slow_links_smaller_ratios_within_the_deadline(netns_ok: None,
                                                                         tmp_path) -> None:
    """Four workers with equal memory at 100, 20, 5 and 1 Mbit/s; policy.link with a 2 s
    deadline. The first round probes every link at the smallest ratio; from then on each
    worker's ratio follows its measured link, and the 1 Mbit/s worker's rounds stay near the
    deadline (at ratio 1 its bytes alone would take about 19 s on that link)."""
    rounds, deadline = 4, 2.0
    bandwidths = [100.0, 20.0, 5.0, 1.0]
    with netbench.topology(bandwidths) as topo:
        res = netbench.run_job(
            topo, rounds=rounds, hidden=512, ratios=None, out_dir=tmp_path, timeout_s=300,
            worker_args=["--memory-limit", netbench.EQUAL_MEMORY],
            extra_overrides=netbench.policy_overrides("link", deadline))
    _assert_gone(topo)
    assert res.rounds_completed == rounds and res.round_retries == 0
    report = netbench.format_table(res)
    by_rate = sorted(res.workers, key=lambda w: -w.bandwidth_mbit)
    for w in by_rate:
        assert len(w.ratios) == rounds, report  # nobody left out: the run loses no round
        assert w.ratios[0] == 0.0625, (w.index, w.ratios)  # the probe round
    last = [w.ratios[-1] for w in by_rate]
    assert last == sorted(last, reverse=True), last  # slower link, never a larger ratio
    fastest, slowest = by_rate[0], by_rate[-1]
    assert slowest.ratios[-1] < fastest.ratios[-1], last
    assert fastest.ratios[-1] == 1.0, last  # 100 Mbit/s carries ratio 1 in well under 2 s
    # the floor the link sets on the slow worker at ratio 1: its payload at 1 Mbit/s
    floor_full_s = netbench.payload_estimate(512) * 8 / 1e6
    assert floor_full_s > 8 * deadline
    for t in slowest.round_s[1:]:
        assert t <= 2 * deadline, (slowest.round_s, report)
    import json

    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {c["bound"] for c in records[0]["clients"]} == {"probe"}
    for rec in records[1:]:
        slow = next(c for c in rec["clients"] if c["client_id"] == slowest.index)
        # what bound it, the estimate it was chosen by, and the measured round beside it
        assert slow["bound"] == "link" and "transfer at" in slow["reason"], slow
        assert 0 < slow["estimated_s"] <= deadline
        assert slow["compute_s"] + slow["transfer_s"] > 0


def test_a_worker_uploading_over_a_slow_link_is_not_expired(netns_ok: None, tmp_path) -> None:
    """Heartbeats every second, a worker expired after 3 misses, and an assignment and an
    update that take about 6 s each over a 1 Mbit/s link: the heartbeats' answers queue behind
    the transfer on the one HTTP/2 connection, yet the worker stays registered, because its
    open transfer moving bytes counts as a sign of life. Every round keeps its update, and
    the worker registers once."""
    rounds = 2
    with netbench.topology([1.0]) as topo:
        res = netbench.run_job(topo, rounds=rounds, hidden=384, ratios=[1.0], out_dir=tmp_path,
                               timeout_s=200, extra_overrides=[
                                   "cluster.heartbeat_s=1", "cluster.heartbeat_misses=3"])
    _assert_gone(topo)
    (w,) = res.workers
    assert res.rounds_completed == rounds and res.round_retries == 0
    assert w.rounds == rounds, netbench.format_table(res)
    assert min(w.transfer_s) > 6.0  # the transfers really outlasted the expiry time
    log = (tmp_path / "coordinator.log").read_text()
    assert log.count("registered worker") == 1, log
