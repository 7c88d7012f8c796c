"""Resource-adaptive ratio selection [recon, ALGORITHM.md section 4].

Per worker and per round, the largest ratio in the ladder whose estimated peak training memory
fits the worker's budget times a safety factor and, when a deadline is set, whose estimated
step time fits it. The estimates are analytic (counted tensors and FLOPs of the submodel) and
the time estimate is scaled by the worker's own measured throughput, so the same code serves the
gRPC coordinator, the torch.distributed rank 0 and the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from rabo.engine import ClientHyper
from rabo.masks import MaskSpec
from rabo.tasks import BilevelTask
from rabo.units import format_bytes

BYTES_PER_ELEMENT = 4  # float32 training state


@dataclass(frozen=True)
class Resources:
    """What the policy needs to know of a worker (from its profile)."""

    memory_budget_bytes: int  # memory it may spend on training state
    flops_per_s: float = 0.0  # measured throughput; 0: unknown (no time check)


@dataclass(frozen=True)
class Choice:
    ratio: float | None  # None: nothing in the ladder fits
    reason: str
    memory_bytes: int = 0  # estimate at the chosen ratio
    step_s: float = 0.0
    # what kept it from the next larger ratio: "memory", "compute" (the deadline), or
    # "none" (the ladder's largest fits)
    bound: str = "none"


def gradient_evaluations(hp: ClientHyper) -> float:
    """Forward+backward passes of one local step, per estimator (counted from the code)."""
    per_iteration = {
        "fd-central": 2 + 1,  # g at y +- d v, and f
        "fd-forward": 1 + 1 + 0.5,  # g at y + d v, f, and grad_x g added to the inner step
        "exact": 1 + 2,  # f, and a double backward (about two passes)
        "neumann": 1 + 3 * hp.neumann_terms,  # f, and one double backward per term
    }[hp.estimator]
    return hp.local_steps * (hp.inner_steps + per_iteration)


RUNTIME_SCRATCH_BYTES = 8 * 2**20  # allocator caches and small temporaries of a step
# gradient-sized tensors alive together at an estimator's peak: grad f, the gradients of g at
# the two points (or the base and one), and a backward pass's temporaries; calibrated against
# measured peaks (see estimate_memory)
LIVE_GRADIENT_COPIES = {"fd-central": 5, "fd-forward": 5, "exact": 4, "neumann": 5}


def estimate_memory(task: BilevelTask, hp: ClientHyper, ratio: float, batch: int) -> int:
    """Peak bytes a worker spends on one round at ``ratio``, above its start-up footprint.

    Counted: the payload twice (the received x, y, v slices, and the transport's buffers
    while the update streams out); the gradient-sized tensors alive together at the
    estimator's peak (``LIVE_GRADIENT_COPIES`` of x and y); the working copies of y and v and
    the update (and of x for RAFBO); the activations a forward pass keeps for backward, twice
    (values and their gradients), three times for exact and Neumann products (which also keep
    the graph of a backward pass); and a fixed scratch allowance. Measured on a gRPC worker
    (resident set above its start-up footprint, steady-state rounds, MLP 784-4096-4096,
    fd-central): 500 MiB against an estimate of 560 MiB; the coordinator applies
    ``policy.safety`` on top.
    """
    mask = MaskSpec("static", ratio, 0)
    nx = task.x_plan(mask, 0).numel()
    ny = task.y_plan(mask).numel()
    payload = 2 * (nx + 2 * ny)
    gradients = LIVE_GRADIENT_COPIES[hp.estimator] * (nx + ny)
    working = 3 * ny + (2 * nx if hp.algorithm == "rafbo" else 0)
    copies = 3 if hp.estimator in ("exact", "neumann") else 2
    activations = copies * task.model.activation_numel(ratio, batch)
    elements = payload + gradients + working + activations
    return BYTES_PER_ELEMENT * elements + RUNTIME_SCRATCH_BYTES


def estimate_flops(task: BilevelTask, hp: ClientHyper, ratio: float, batch: int) -> float:
    """FLOPs of one local step: 3x the forward FLOPs (forward + backward) per evaluation."""
    forward = sum(task.model.layer_flops(ratio, batch).values())
    return 3.0 * forward * gradient_evaluations(hp)


def calibrated_memory(task: BilevelTask, hp: ClientHyper, ratio: float, batch: int,
                      measured: Mapping[float, int] | None) -> tuple[int, str]:
    """Peak bytes expected at ``ratio`` for a worker whose measured peaks (above its start-up
    footprint, per ratio it ran) are ``measured``, and where the figure comes from.

    A ratio it ran: its largest measured peak. Another ratio: the estimate's part that scales
    with the submodel (all of it but ``RUNTIME_SCRATCH_BYTES``) times measured / estimated of
    that part at the ran ratio nearest to it (on a log scale), so that a worker whose real
    peaks sit below the estimate is offered the larger ratios that fit, and one whose peaks
    sit above it the smaller ones. No measurement: the analytic estimate. A measured peak
    below the ratio's own payload (what the worker must hold to receive its assignment) is
    not believed and ignored."""
    estimate = estimate_memory(task, hp, ratio, batch)
    plausible = {r: peak for r, peak in (measured or {}).items()
                 if r > 0 and peak >= payload_bytes(task, r)}
    if not plausible:
        return estimate, "estimate"
    if ratio in plausible:
        return plausible[ratio], f"measured at ratio {ratio:g}"
    near = min(plausible, key=lambda r: abs(math.log(r / ratio)))
    scratch = RUNTIME_SCRATCH_BYTES
    factor = (max(0, plausible[near] - scratch)
              / max(1, estimate_memory(task, hp, near, batch) - scratch))
    mem = max(payload_bytes(task, ratio), int(scratch + factor * (estimate - scratch)))
    return mem, f"estimate x {factor:.2f} (measured at ratio {near:g})"


def payload_bytes(task: BilevelTask, ratio: float) -> int:
    """Bytes of an assignment at ``ratio``: x, y and v slices."""
    mask = MaskSpec("static", ratio, 0)
    return BYTES_PER_ELEMENT * (task.x_plan(mask, 0).numel() + 2 * task.y_plan(mask).numel())


def choose_ratio(task: BilevelTask, hp: ClientHyper, resources: Resources,
                 ladder: list[float], safety: float, deadline_s: float, batch: int,
                 measured: Mapping[float, int] | None = None) -> Choice:
    """The largest fitting ratio of ``ladder`` (tried from large to small), or why none fits.
    ``measured``: the worker's measured peaks per ratio (:func:`calibrated_memory`)."""
    budget = resources.memory_budget_bytes * safety
    smallest_mem = None
    bound, larger = "none", ""
    for ratio in sorted(ladder, reverse=True):
        mem, source = calibrated_memory(task, hp, ratio, batch, measured)
        smallest_mem = mem
        if mem > budget:
            if bound == "none":
                bound, larger = "memory", f"; ratio {ratio:g} needs ~{format_bytes(mem)}"
            continue
        step_s = 0.0
        if resources.flops_per_s > 0:
            step_s = estimate_flops(task, hp, ratio, batch) / resources.flops_per_s
            if deadline_s > 0 and step_s > deadline_s:
                if bound == "none":
                    bound, larger = "compute", (f"; ratio {ratio:g} needs ~{step_s:.2f}s per "
                                                f"step, over the {deadline_s:g}s deadline")
                continue
        return Choice(ratio, f"ratio {ratio:g}: ~{format_bytes(mem)} ({source}) of "
                      f"{format_bytes(budget)} usable{larger}", mem, step_s, bound)
    why = (f"the smallest ratio {min(ladder):g} needs ~{format_bytes(smallest_mem or 0)} but "
           f"only {format_bytes(budget)} of {format_bytes(resources.memory_budget_bytes)} "
           f"may be used (safety {safety:g})")
    if deadline_s > 0 and resources.flops_per_s > 0 and smallest_mem is not None \
            and smallest_mem <= budget:
        step = estimate_flops(task, hp, min(ladder), batch) / resources.flops_per_s
        why = (f"the smallest ratio {min(ladder):g} needs ~{step:.2f}s per step, "
               f"over the {deadline_s:g}s deadline")
    return Choice(None, why)
