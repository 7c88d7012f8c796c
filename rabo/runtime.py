"""Process-level tuning and measurement shared by the coordinator, the workers and the
benchmarks: allocator settings, parent-death and stack-dump signals, and memory readings
(resident set, and a peak that can be restarted per step)."""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import sys
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_tuned = False


def tune_allocator(keep_bytes: int = 1 << 30, arenas: int | None = None) -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the system.

    glibc serves blocks above its mmap threshold (at most 32 MiB by default) with fresh
    mappings and unmaps them on free, so every new full-model tensor (a coordinator allocates
    several per round) page-faults all of its pages in again. Raising the mmap and trim
    thresholds lets those blocks be reused: the coordinator's server step ran about 2.5x faster
    on a 10M-parameter model (``rabo bench transport``). The process keeps up to its peak heap.

    ``arenas`` caps glibc's malloc arenas. Each thread that allocates gets an arena of its own
    (up to 8 per core), and a block freed into one arena cannot serve a request from another:
    the coordinator's gRPC threads allocate receive buffers and the round thread allocates the
    server step's tensors, so with many arenas the raised thresholds above still left about
    29,000 page faults per round at 10M parameters x 8 workers. One arena removed them
    (``rabo bench transport --params 10e6 --workers 8 --ratios 1``: coordinator CPU 0.71 ->
    0.59 s per round, round overhead 793 -> 623 ms). It must be set before the threads start.
    Returns False where this is not glibc (no change).
    """
    global _tuned
    if _tuned or not sys.platform.startswith("linux"):
        return _tuned
    _tuned = _mallopt(keep_bytes, 2 * keep_bytes, arenas)
    return _tuned


def prefer_low_memory(mmap_bytes: int = 1 << 20, arenas: int | None = 1) -> bool:
    """Give freed tensors back to the system promptly (for memory-bound workers).

    glibc raises its mmap threshold after every large free (up to 32 MiB), after which blocks
    of a few MiB come from the heap, fragment it and stay resident: a worker's resident set
    then grows from round to round above what it holds. A fixed threshold keeps every tensor
    above ``mmap_bytes`` in its own mapping, returned when freed, at the cost of fresh page
    faults; measured on an MLP 784-4096-4096, the peak above start-up of rounds 2 and 3 fell
    from about 660 MiB to the first round's level. ``arenas`` caps glibc's malloc arenas (one
    per allocating thread otherwise, each growing and fragmenting on its own); with
    :func:`release_free_memory` after every round, the peaks of an MLP 784-1024-1024 worker
    over 10 rounds stayed at 61-63 MiB where they had crept from 67 to 80 MiB
    (``rabo bench policy`` measures the peaks). Returns False where this is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    return _mallopt(mmap_bytes, 16 * mmap_bytes, arenas)


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim(0)``, which also
    releases free pages inside the heap, not only at its top). A worker calls it between
    rounds: what a round freed then leaves its resident set, and the next round's peak starts
    from what the worker really holds. About a millisecond. False where this is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _glibc() -> Any:
    """glibc, or None where this is not Linux or the C library is another one."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt(mmap_threshold: int, trim_threshold: int, arenas: int | None) -> bool:
    """The thresholds, and the arena cap when given; False where glibc refuses or is absent."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if ok and arenas is not None:
        ok = bool(libc.mallopt(_M_ARENA_MAX, int(arenas)))
    return ok


PARENT_ENV = "RABO_DIE_WITH_PARENT"


def die_with_parent() -> None:
    """If started by ``rabo local`` (``RABO_DIE_WITH_PARENT`` holds its pid), ask Linux to send
    this process SIGTERM when that parent dies, so that no worker outlives a killed launcher.

    Set here, in the child after exec, rather than in a ``preexec_fn``: forking a process whose
    gRPC threads are running and then running Python before exec can crash the child in gRPC's
    fork handlers; without ``preexec_fn`` the launcher spawns with vfork/exec.
    """
    import os
    import signal

    expected = os.environ.get(PARENT_ENV)
    if not expected or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(expected):  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def enable_stack_dumps() -> bool:
    """``kill -USR1 PID`` prints every thread's Python stack to stderr (``faulthandler``): how a
    stuck coordinator, launcher or worker shows where it waits, without stopping it."""
    import faulthandler
    import signal

    if not hasattr(signal, "SIGUSR1"):
        return False
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    except (OSError, ValueError, AttributeError):  # stderr is no file (e.g. captured)
        return False
    return True


def settled_rss_bytes() -> int:
    """The resident set once what was freed has gone back (garbage collection, then
    :func:`release_free_memory`): a start-up footprint that does not hold a varying 4-6 MiB
    of freed heap, which the first round's trim would release and so count against the
    round's peak instead."""
    gc.collect()
    release_free_memory()
    return rss_bytes()


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc; psutil-free and cheap)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_above_startup(peak: int, baseline_rss: int, device: Any = None) -> int:
    """A step's peak (:func:`peak_memory_bytes`) above the process's start-up footprint
    ``baseline_rss``, what memory budgets are counted against: on CUDA the allocator's peak
    holds only tensors already; on the CPU the resident set's includes start-up."""
    if device is not None and getattr(device, "type", None) == "cuda":
        return peak
    return max(0, peak - baseline_rss)


def reset_peak_memory(device: Any = None) -> bool:
    """Start a fresh high-water mark for :func:`peak_memory_bytes`: the CUDA allocator's on a
    CUDA ``device``, else the process's resident set (Linux: ``/proc/self/clear_refs``).
    False where the CPU mark cannot be reset (it then runs from process start)."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device: Any = None) -> int:
    """Peak since :func:`reset_peak_memory`: the CUDA allocator's high-water mark on a CUDA
    ``device``; else the resident set's (VmHWM; runtime and data included)."""
    if device is not None and device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
