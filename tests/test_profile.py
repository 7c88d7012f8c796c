"""Resource profiling: cgroup readers against fixture trees, budgets, backoff."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rabo.resources import read_cgroup
from worker.backoff import Backoff
from worker.profile import build_profile


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_cgroup_v2_limits_from_the_hierarchy(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    root = tmp_path / "cg"
    _write(root, {
        "cgroup.controllers": "cpu memory\n",
        "kubepods/memory.max": "8589934592\n",
        "kubepods/pod1/memory.max": "2147483648\n",  # the pod limit: 2 GiB
        "kubepods/pod1/ctr/memory.max": "max\n",
        "kubepods/pod1/ctr/memory.current": "536870912\n",
        "kubepods/pod1/ctr/cpu.max": "150000 100000\n",
    })
    lim = read_cgroup(proc, root)
    assert lim.version == 2 and lim.memory_limit == 2 * 2**30
    assert lim.memory_usage == 512 * 2**20 and lim.cpu_quota == 1.5


def test_cgroup_v2_unlimited(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/\n")
    _write(tmp_path / "cg", {"cgroup.controllers": "memory\n", "memory.max": "max\n",
                             "cpu.max": "max 100000\n"})
    lim = read_cgroup(proc, tmp_path / "cg")
    assert lim.version == 2 and lim.memory_limit is None and lim.cpu_quota is None


def test_cgroup_v1(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:memory:/docker/abc\n5:cpu,cpuacct:/docker/abc\n")
    _write(tmp_path / "cg", {
        "memory/docker/abc/memory.limit_in_bytes": "1073741824\n",
        "memory/docker/abc/memory.usage_in_bytes": "104857600\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "unlimited"
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    lim = read_cgroup(proc, tmp_path / "cg")
    assert lim.version == 1 and lim.memory_limit == 2**30 and lim.memory_usage == 100 * 2**20
    assert lim.cpu_quota == 0.5


def test_usage_is_the_working_set_without_inactive_file_pages(tmp_path: Path) -> None:
    """Page cache the kernel reclaims before an OOM kill (inactive file pages, e.g. libraries
    and data read from a cold cache) is not counted against the budget, as kubelet counts a
    container's working set."""
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/pod/ctr\n")
    _write(tmp_path / "v2", {
        "cgroup.controllers": "memory\n", "pod/memory.max": "1073741824\n",
        "pod/ctr/memory.current": str(548 * 2**20) + "\n",
        "pod/ctr/memory.stat": f"anon {217 * 2**20}\nfile {328 * 2**20}\n"
                               f"active_file 0\ninactive_file {327 * 2**20}\n"})
    assert read_cgroup(proc, tmp_path / "v2").memory_usage == 221 * 2**20
    proc.write_text("12:memory:/pod\n")
    _write(tmp_path / "v1", {
        "memory/pod/memory.limit_in_bytes": "1073741824\n",
        "memory/pod/memory.usage_in_bytes": str(548 * 2**20) + "\n",
        # the group's own inactive_file is not what counts: total_ (with its children) is
        "memory/pod/memory.stat": f"inactive_file 1\ntotal_inactive_file {327 * 2**20}\n"})
    assert read_cgroup(proc, tmp_path / "v1").memory_usage == 221 * 2**20
    # a stat that cannot be read: the usage as it is
    (tmp_path / "v1/memory/pod/memory.stat").write_text("garbage\n")
    assert read_cgroup(proc, tmp_path / "v1").memory_usage == 548 * 2**20


def test_no_cgroup(tmp_path: Path) -> None:
    lim = read_cgroup(tmp_path / "missing", tmp_path / "cg")
    assert (lim.version, lim.memory_limit, lim.cpu_quota) == (0, None, None)


def test_budget_sources(tmp_path: Path) -> None:
    from rabo.resources import CgroupLimits

    cpu = torch.device("cpu")
    flag = build_profile(cpu, memory_limit=123 * 2**20, flops_per_s=1.0,
                         limits=CgroupLimits(2, 2**30, 2**28, None))
    assert flag.memory_budget_bytes == 123 * 2**20 and flag.budget_source == "--memory-limit"
    cg = build_profile(cpu, flops_per_s=1.0, limits=CgroupLimits(2, 2**30, 2**28, 1.0),
                       held_bytes=2**20)
    assert cg.memory_budget_bytes == 2**30 - 2**28 + 2**20
    assert cg.memory_limit_bytes == 2**30 and cg.usable_cpus <= 1.0
    free = build_profile(cpu, flops_per_s=1.0, limits=CgroupLimits(0, None, None, None))
    assert free.budget_source == "available memory (psutil)" and free.memory_budget_bytes > 0


def test_step_benchmark_measures_something() -> None:
    p = build_profile(torch.device("cpu"), memory_limit=1, limits=read_cgroup())
    assert p.flops_per_s > 1e7 and p.logical_cpus >= 1


def test_backoff_is_capped_exponential_with_jitter() -> None:
    b = Backoff(initial=0.5, cap=4.0, rng=random.Random(0))
    delays = [b.next_delay() for _ in range(8)]
    ceilings = [0.5, 1, 2, 4, 4, 4, 4, 4]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next_delay() <= 0.5


def test_bad_memory_limit_flag() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "rabo.cli", "worker", "--coordinator",
                           "127.0.0.1:1", "--memory-limit", "lots"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--memory-limit: 'lots' is not a byte size" in proc.stderr


@pytest.mark.parametrize("missing", [True])
def test_worker_without_coordinator_flag(missing: bool) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "rabo.cli", "worker"], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin"})
    assert proc.returncode == 2 and "--coordinator HOST:PORT" in proc.stderr
