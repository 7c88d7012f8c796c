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
