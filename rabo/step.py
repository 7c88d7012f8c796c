"""How a worker runs its local work (``worker.step``): eager PyTorch, compiled, or captured.

A client step's local work (the K inner steps, the estimator's perturbed gradients, the v step
and the hypergradient; rabo.engine.local_work) is a chain of small kernels driven from Python.
On a GPU the launches, not the arithmetic, set its time, so that pruning buys little time
there (docs/RESULTS.md section 5b). The local work is one function of tensors alone (its
batches are drawn before it starts), so it can be handed whole to a compiler:

- ``eager``: as written.
- ``compiled``: ``torch.compile`` with ``worker.compile_backend`` (``inductor``: fused
  kernels, Triton on CUDA and C++ on the CPU; ``aot_eager``: traced through AOTAutograd but run
  with eager kernels, which gives eager's numbers bit for bit: what the CPU tests compare).
  One compilation per shape, i.e. per width ratio; later rounds at that ratio reuse it.
- ``graph``: ``torch.compile(mode="reduce-overhead")``: inductor's kernels replayed as CUDA
  graphs per ratio (static input buffers, one launch per captured region). CUDA only: on any
  other device it runs eager, with one warning.
- ``auto``: eager. The accelerated steps are opt-in until their time is measured on a GPU
  (``bench/gpu.sh``); on the CPU, compiling costs tens of seconds per ratio, measured by
  ``rabo bench system --parts ratio --steps eager,compiled``.

Compiling sets two process-wide TorchDynamo options, so that ``torch.autograd.grad`` and the
norm of the v projection are traced into the graph instead of splitting it
(``trace_autograd_ops``, ``capture_scalar_outputs``); a worker process compiles nothing else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("rabo")

STEPS = ("auto", "eager", "compiled", "graph")
BACKENDS = ("inductor", "aot_eager")
# compilations kept per function: one per (ratio, batch shape) a worker meets, several models
RECOMPILE_LIMIT = 64

_lock = threading.Lock()
_compiled: dict[tuple[Callable[..., Any], str, str], Callable[..., Any]] = {}
_warned: set[str] = set()


def resolve(step: str, device: torch.device) -> str:
    """The step actually run for ``worker.step`` on ``device``."""
    if step not in STEPS:
        raise ValueError(f"worker.step {step!r}: expected one of {list(STEPS)}")
    if step == "auto":
        return "eager"
    if step == "graph" and device.type != "cuda":
        if "graph" not in _warned:
            _warned.add("graph")
            log.warning("worker.step: graph captures CUDA graphs; on %s the step runs eager",
                        device.type)
        return "eager"
    return step


def runner(fn: Callable[..., Any], step: str, backend: str, device: torch.device
           ) -> Callable[..., Any]:
    """``fn`` as ``worker.step`` runs it on ``device`` (compiled once per process and mode)."""
    mode = resolve(step, device)
    if mode == "eager":
        return fn
    if backend not in BACKENDS:
        raise ValueError(f"worker.compile_backend {backend!r}: expected one of "
                         f"{list(BACKENDS)}")
    key = (fn, mode, backend)
    with _lock:
        compiled = _compiled.get(key)
        if compiled is None:
            import torch._dynamo.config as dynamo_config

            # (each option where this torch has it: older ones name the limit
            # cache_size_limit and cannot trace autograd.grad, so their graphs break there)
            for limit in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, limit):
                    setattr(dynamo_config, limit,
                            max(getattr(dynamo_config, limit), RECOMPILE_LIMIT))
                    break
            # trace torch.autograd.grad and the v projection's norm into the graph instead
            # of breaking it there (11 graphs with 12 breaks per A/mlp step without these,
            # 6 graphs and no break with them; the numbers are the same)
            for option in ("trace_autograd_ops", "capture_scalar_outputs"):
                if hasattr(dynamo_config, option):
                    setattr(dynamo_config, option, True)
            if mode == "graph":
                compiled = torch.compile(fn, mode="reduce-overhead", dynamic=False)
            else:
                compiled = torch.compile(fn, backend=backend, dynamic=False)
            _compiled[key] = compiled
    if mode != "graph":
        return compiled

    def replay(*args: Any, **kwargs: Any) -> Any:
        # a new step: the graphs may overwrite the previous step's outputs (already copied off)
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return replay
