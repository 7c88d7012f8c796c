"""What a worker can spend: CPUs, memory, GPU, measured throughput.

Shared by the gRPC worker (which sends it as a ``ResourceProfile`` message) and the
torch.distributed ranks (which gather it to rank 0), so both feed the same ratio policy.

Inside a container psutil reports the node, not the container, so the cgroup limits are read
directly: cgroup v2 ``memory.max`` / ``memory.current`` / ``cpu.max``, cgroup v1
``memory.limit_in_bytes`` / ``memory.usage_in_bytes`` / ``cpu.cfs_quota_us``. The readers take
their root paths as arguments so they are tested against fixture trees.

The memory *budget* is what the worker may spend on training state:
  * ``--memory-limit`` (or ``RABO_MEMORY_LIMIT``) when given: taken as the budget itself;
  * else a cgroup memory limit: the limit minus the cgroup's working set (its usage less the
    inactive file pages, which the kernel reclaims before it would OOM-kill anyone: the
    figure kubelet's eviction and ``kubectl top`` use). A pod that read its libraries and data
    from a cold cache holds them as page cache charged to its cgroup (measured: usage 548 MiB,
    327 MiB of it inactive file pages, after a worker loaded the MNIST job), so limit minus
    usage would leave it almost nothing;
  * else psutil's available memory;
  * on CUDA, additionally at most the GPU's free memory.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from rabo.policy import Resources

_V1_UNLIMITED = 2**62  # cgroup v1 reports "no limit" as a huge page-rounded number


@dataclass(frozen=True)
class CgroupLimits:
    version: int  # 0: no cgroup found, 1 or 2
    memory_limit: int | None  # bytes; None: unlimited
    memory_usage: int | None  # the working set: usage less inactive file pages
    cpu_quota: float | None  # CPUs; None: unlimited


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _working_set(d: Path, usage_file: str, inactive_key: str) -> int | None:
    """The cgroup ``d``'s usage less its inactive file pages (``memory.stat``); the usage
    alone where the stat cannot be read."""
    usage = _read_int(d / usage_file)
    if usage is None:
        return None
    try:
        for line in (d / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                return max(0, usage - int(value))
    except (OSError, ValueError):
        pass
    return usage


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """controller -> path from /proc/self/cgroup ('' names the unified v2 hierarchy)."""
    out: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            out[""] = path
        for c in controllers.split(","):
            if c:
                out[c] = path
    return out


def _ancestors(root: Path, rel: str) -> list[Path]:
    """root/rel and each parent up to root (limits apply from every ancestor)."""
    rel = rel.strip("/")
    parts = rel.split("/") if rel else []
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def read_cgroup(proc_cgroup: str | Path = "/proc/self/cgroup",
                root: str | Path = "/sys/fs/cgroup") -> CgroupLimits:
    proc_cgroup, root = Path(proc_cgroup), Path(root)
    paths = _cgroup_paths(proc_cgroup)
    if "" in paths and (root / "cgroup.controllers").exists():
        limit = usage = None
        quota = None
        for d in _ancestors(root, paths[""]):
            lim = _read_int(d / "memory.max")
            if lim is not None:
                limit = lim if limit is None else min(limit, lim)
            if usage is None:
                usage = _working_set(d, "memory.current", "inactive_file")
            try:
                q, period = (d / "cpu.max").read_text().split()
                if q != "max":
                    cpus = int(q) / int(period)
                    quota = cpus if quota is None else min(quota, cpus)
            except (OSError, ValueError):
                pass
        return CgroupLimits(2, limit, usage, quota)
    if "memory" in paths or "cpu" in paths:
        limit = usage = None
        quota = None
        mem_root = root / "memory"
        for d in _ancestors(mem_root, paths.get("memory", "/")):
            lim = _read_int(d / "memory.limit_in_bytes")
            if lim is not None and lim < _V1_UNLIMITED:
                limit = lim if limit is None else min(limit, lim)
            if usage is None:
                usage = _working_set(d, "memory.usage_in_bytes", "total_inactive_file")
        for cpu_dir in ("cpu,cpuacct", "cpu"):
            base = root / cpu_dir
            if not base.exists():
                continue
            for d in _ancestors(base, paths.get("cpu", "/")):
                q_us = _read_int(d / "cpu.cfs_quota_us")
                p_us = _read_int(d / "cpu.cfs_period_us")
                if q_us is not None and q_us > 0 and p_us:
                    quota = q_us / p_us if quota is None else min(quota, q_us / p_us)
            break
        return CgroupLimits(1, limit, usage, quota)
    return CgroupLimits(0, None, None, None)


def usable_cpus(limits: CgroupLimits) -> float:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count() or 1
    return min(float(affinity), limits.cpu_quota) if limits.cpu_quota else float(affinity)


def measure_flops(device: torch.device, seconds: float = 0.15, n: int = 384) -> float:
    """Matrix-multiply throughput (FLOP/s) on ``device``: a short step benchmark."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    count = 0
    start = time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        if device.type == "cuda" and count % 16 == 0:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and (device.type != "cuda" or count % 16 == 0):
            break
    return 2.0 * n**3 * count / elapsed


@dataclass(frozen=True)
class Profile:
    """A worker's resources, as measured now."""

    hostname: str
    logical_cpus: int
    usable_cpus: float
    memory_total_bytes: int
    memory_available_bytes: int
    memory_limit_bytes: int  # cgroup limit; 0 when none
    memory_budget_bytes: int  # what the worker may spend on training state
    budget_source: str
    device: str
    threads: int
    flops_per_s: float
    gpu_name: str = ""
    gpu_total_bytes: int = 0
    gpu_free_bytes: int = 0

    def resources(self) -> Resources:
        return Resources(self.memory_budget_bytes, self.flops_per_s)


def measure(device: torch.device, memory_limit: int | None = None, threads: int = 0,
            limits: CgroupLimits | None = None, flops_per_s: float | None = None,
            held_bytes: int = 0) -> Profile:
    """A fresh profile; ``flops_per_s`` reuses an earlier measurement when given.

    ``held_bytes`` is memory this worker already holds for training beyond its start-up
    footprint: it counts towards the budget (it is the worker's to reuse), so that last round's
    allocations do not shrink this round's ratio.
    """
    limits = limits if limits is not None else read_cgroup()
    vm = psutil.virtual_memory()
    if memory_limit is not None:
        budget, source = memory_limit, "--memory-limit"
    elif limits.memory_limit is not None:
        budget = max(0, limits.memory_limit - (limits.memory_usage or 0) + held_bytes)
        source = f"cgroup v{limits.version} limit minus working set"
    else:
        budget, source = vm.available + held_bytes, "available memory (psutil)"
    gpu_name, gpu_total, gpu_free = "", 0, 0
    if device.type == "cuda":
        gpu_free, gpu_total = torch.cuda.mem_get_info(device)
        gpu_name = torch.cuda.get_device_name(device)
        if memory_limit is None or gpu_free < budget:
            budget, source = gpu_free, "free GPU memory"
    return Profile(
        hostname=socket.gethostname(), logical_cpus=psutil.cpu_count() or 1,
        usable_cpus=usable_cpus(limits), memory_total_bytes=vm.total,
        memory_available_bytes=vm.available, memory_limit_bytes=limits.memory_limit or 0,
        memory_budget_bytes=int(budget), budget_source=source, device=str(device),
        threads=threads or torch.get_num_threads(),
        flops_per_s=flops_per_s if flops_per_s is not None else measure_flops(device),
        gpu_name=gpu_name, gpu_total_bytes=int(gpu_total), gpu_free_bytes=int(gpu_free))
