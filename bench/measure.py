"""The one time and peak-memory measurement of a call, each in a fresh process, shared by
``rabo bench estimator`` and ``rabo bench system``'s per-ratio part.

* time: the median of ``repeats`` calls after two warm-up calls (the allocator and oneDNN
  settle on the second);
* memory: the peak of one call above the resident set just before it (Linux's VmHWM, reset
  first where the kernel allows; ``ru_maxrss`` otherwise), or the CUDA allocator's peak
  above what was allocated before. The memory child runs with a fixed glibc mmap threshold,
  so large tensors live in their own mappings and go back to the system when freed, and the
  resident set follows the live tensors (it slows allocation down: time is measured in a
  process of its own).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MODES = ("time", "memory")


def measure(call: Callable[[], Any], mode: str, repeats: int, device: Any,
            memory_warmup: int = 0) -> tuple[dict[str, Any], Any]:
    """Measure ``call`` in this process (``mode`` 'time' or 'memory'); returns the figures
    and the last call's result. ``memory_warmup``: calls before the measured one, so that
    lazily allocated library state is not counted as the call's memory."""
    import torch

    cuda = getattr(device, "type", str(device)) == "cuda"

    def run() -> Any:
        out = call()
        if cuda:
            torch.cuda.synchronize(device)
        return out

    if mode == "time":
        run()
        run()
        times, last = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            last = run()
            times.append(time.perf_counter() - t0)
        return {"time_s": statistics.median(times)}, last
    if mode != "memory":
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    for _ in range(memory_warmup):
        run()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        last = run()
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device) - base),
                "peak_method": "cuda-allocator"}, last
    import gc

    from rabo.runtime import peak_memory_bytes, reset_peak_memory, rss_bytes

    gc.collect()
    ok = reset_peak_memory()
    base = rss_bytes()
    last = run()
    return {"peak_bytes": int(peak_memory_bytes() - base),
            "peak_method": "rss-hwm" if ok else "ru_maxrss"}, last


def in_child(module: str, args: Sequence[str], mode: str, what: str,
             cwd: Path | None = None) -> dict[str, Any]:
    """Run ``python -m module *args`` (which prints its figures as JSON on its last line) in
    a fresh process, with the memory environment when ``mode`` is 'memory'."""
    env = dict(os.environ, **(MEMORY_ENV if mode == "memory" else {}))
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {what} ({mode}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
