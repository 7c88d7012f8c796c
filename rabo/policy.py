"""Resource-adaptive ratio selection [recon, ALGORITHM.md section 4; links: ext].

Per worker and per round, the largest ratio in the ladder whose estimated peak training memory
fits the worker's budget times a safety factor and, when a deadline is set, whose estimated
step time fits it (with ``policy.link``: step time plus the time its slices take over the
worker's link, from the link's measured seconds per byte). The estimates are analytic (counted
tensors and FLOPs of the submodel) and the time estimate is scaled by the worker's own measured
throughput, so the same code serves the gRPC coordinator, the torch.distributed rank 0 and the
simulator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

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
    # the link's seconds per payload byte, both directions, and its fixed seconds per round
    # (LinkEstimate); 0: not measured yet
    link_s_per_byte: float = 0.0
    link_fixed_s: float = 0.0


@dataclass(frozen=True)
class Choice:
    ratio: float | None  # None: nothing in the ladder fits
    reason: str
    memory_bytes: int = 0  # estimate at the chosen ratio
    step_s: float = 0.0
    # what kept it from the next larger ratio: "memory", "compute" (the deadline), "link"
    # (the transfer time made it miss the deadline; "probe": the link is not measured yet), or
    # "none" (the ladder's largest fits)
    bound: str = "none"
    transfer_s: float = 0.0  # estimated transfer time at the chosen ratio (policy.link)


def gradient_evaluations(hp: ClientHyper) -> float:
    """Forward+backward passes of one local step, per estimator (counted from the code)."""
    per_iteration = {
        "fd-central": 2 + 1,  # g at y +- d v, and f
        "fd-forward": 1 + 1 + 0.5,  # g at y + d v, f, and grad_x g added to the inner step
        "exact": 1 + 2,  # f, and a double backward (about two passes)
        "neumann": 1 + 3 * hp.neumann_terms,  # f, and one double backward per term
    }[hp.estimator]
    return hp.local_steps * (hp.inner_steps + per_iteration)


# Constants of the memory estimate, calibrated against `rabo bench policy` (preset reduced:
# tasks A and B x MLP 784-1024-1024-10 and CNN 32-64 x four estimators x ratios 1 to 1/8, one
# real gRPC worker per point, torch 2.13 CPU, 2 cores; docs/method.md section 6). Each stands
# for something the code holds; their values were fitted together to two runs of the bench's
# 64 points (`rabo bench policy --fit`, a linear program: every measured / estimate at or above
# 0.75 and as far below 1.0 as these terms allow, 0.944 for those two runs; rounded to eighths,
# 0.75-0.95) and checked on a third run (docs/RESULTS.md section 5d). None is what a test
# expects.
#
# What the first step leaves resident above the worker's start-up footprint whatever the ratio
# (autograd's and the allocator's state, the heap kept below glibc's trim threshold, thread
# stacks): most of the 13.4-14.7 MiB peaks of task A's MLP 784-1024-1024 at ratio 1/8 over
# every estimator (the terms that follow the ratio come to about 4 MiB there), now that the
# worker hands back what building its job freed before it takes its start-up footprint
# (before that, the same job read 9.0 MiB in one process and 13.3 in another).
RUNTIME_SCRATCH_BYTES = int(14.375 * 2**20)
# with y the whole network (task B), a further part that does not shrink with the ratio: the
# lower level's backward passes run through the first layer, whose input (the batch's features,
# not pruned) they keep, and autograd's graph spans every layer. Not counted from the code:
# task B's MLP peaks sit 9-15 MiB above task A's at ratio 1/8 where the terms that
# follow the ratio differ by about 6 MiB; the fit puts 2.3 MiB here (3.9 to one run alone).
NETWORK_SCRATCH_BYTES = int(2.25 * 2**20)
# the convolution library's state, created by a process's first convolution and kept (oneDNN's
# kernels and caches): measured 11.4 MiB above the state before it, the same at 4 and at 32
# output channels; the fit puts 12.7 MiB here
CONV_RUNTIME_BYTES = int(12.625 * 2**20)
# payload-sized buffers a gRPC worker holds at its step's peak: the receive buffer its x, y and
# v slices are read from (rabo_proto BufferPool), the previous round's update (alive until the
# next one replaces it in the worker loop), and the transport's chunk copies left on the heap;
# the peaks of a gRPC worker rise 2.3-3.2 payloads faster with the ratio than those of the same
# step run in-process (which holds its assignment, one payload)
TRANSPORT_PAYLOAD_COPIES = 3
# gradient-sized tensors (of x and y together) alive at an estimator's peak beyond the
# payload: grad f, the gradients of g at the points each estimator evaluates (the inner step's
# zeros for grad_x, the base, the shifted points), the backward pass's own buffers; and for
# Neumann its series' term, sum and Hessian product. "head": y is the model's head (task A),
# a few gradient-sized tensors of x; "network": y is the whole network (task B: x holds one
# log L2 strength per weight), whose penalty sum(exp(x) y^2) / 2 builds y-sized temporaries
# (exp(x), exp(x) y and their gradients) at every evaluation of g. Fitted with the rest (task
# A's MLP at ratio 1 bounds the "head" counts from below, task B's MLP at ratio 1/4 the
# "network" ones).
LIVE_GRADIENT_COPIES = {
    "head": {"fd-central": 4.375, "fd-forward": 4.625, "exact": 3.0, "neumann": 4.25},
    "network": {"fd-central": 8.25, "fd-forward": 7.0, "exact": 7.5, "neumann": 11.875},
}
# forward passes whose activations are alive together at the peak: one (backward frees a
# layer's saved tensors as it makes their gradients), two for exact and Neumann products when y
# is the whole network (the double backward keeps the graph of the first backward through
# every layer; with y the head that graph spans the head only). Measured on the CNN 32-64 at
# batch 128: 60 MiB at ratio 1 for every estimator on task A, 103-105 MiB for exact and
# Neumann on task B.
SECOND_ORDER_PASSES = 2


def lower_level_kind(task: BilevelTask) -> str:
    """"head" where y is the model's head (task A), else "network" (y spans the backbone)."""
    head = set(task.model.head_names)
    return "head" if set(task.y_layout) <= head else "network"


def fixed_memory_bytes(task: BilevelTask) -> int:
    """The part of :func:`estimate_memory` that does not depend on the ratio or the batch."""
    return (RUNTIME_SCRATCH_BYTES + (CONV_RUNTIME_BYTES if task.model.convolution else 0)
            + (NETWORK_SCRATCH_BYTES if lower_level_kind(task) == "network" else 0))


def memory_terms(task: BilevelTask, hp: ClientHyper, ratio: float, batch: int
                 ) -> dict[str, float]:
    """The parts of :func:`estimate_memory` at ``ratio``: for each calibrated constant (by its
    name, as :func:`memory_constants` gives them) the bytes one unit of it stands for, and
    under ``"counted"`` the bytes no constant multiplies. The estimate is
    ``counted + sum(constant * bytes)``; ``rabo bench policy --fit`` fits the constants to
    measured peaks through the same parts."""
    mask = MaskSpec("static", ratio, 0)
    nx = task.x_plan(mask, 0).numel()
    ny = task.y_plan(mask).numel()
    kind = lower_level_kind(task)
    working = 2 * nx if hp.algorithm == "rafbo" else 0
    passes = (SECOND_ORDER_PASSES
              if hp.estimator in ("exact", "neumann") and kind == "network" else 1)
    model = task.model
    activations = passes * (model.activation_numel(ratio, batch)
                            + model.workspace_numel(ratio, batch))
    return {
        "counted": float(BYTES_PER_ELEMENT * (working + activations)),
        "TRANSPORT_PAYLOAD_COPIES": float(BYTES_PER_ELEMENT * (nx + 2 * ny)),
        f"LIVE_GRADIENT_COPIES.{kind}.{hp.estimator}": float(BYTES_PER_ELEMENT * (nx + ny)),
        "RUNTIME_SCRATCH_BYTES": 1.0,
        "CONV_RUNTIME_BYTES": 1.0 if model.convolution else 0.0,
        "NETWORK_SCRATCH_BYTES": 1.0 if kind == "network" else 0.0,
    }


def memory_constants() -> dict[str, float]:
    """The calibrated constants of the memory estimate by name (:func:`memory_terms`)."""
    out = {"TRANSPORT_PAYLOAD_COPIES": float(TRANSPORT_PAYLOAD_COPIES),
           "RUNTIME_SCRATCH_BYTES": float(RUNTIME_SCRATCH_BYTES),
           "CONV_RUNTIME_BYTES": float(CONV_RUNTIME_BYTES),
           "NETWORK_SCRATCH_BYTES": float(NETWORK_SCRATCH_BYTES)}
    for kind, counts in LIVE_GRADIENT_COPIES.items():
        for estimator, n in counts.items():
            out[f"LIVE_GRADIENT_COPIES.{kind}.{estimator}"] = float(n)
    return out


def estimate_memory(task: BilevelTask, hp: ClientHyper, ratio: float, batch: int) -> int:
    """Peak bytes a worker spends on one round at ``ratio``, above its start-up footprint.

    Counted (elements of float32): ``TRANSPORT_PAYLOAD_COPIES`` payloads (the received x, y
    and v slices and the transport's buffers); ``LIVE_GRADIENT_COPIES`` of x and y together,
    per estimator and per kind of lower level (y the head, task A; y the whole network, task
    B); the working copy of x and x0 for RAFBO; and the activations a forward pass keeps for
    backward plus the kernels' workspace that does not shrink with the ratio (the model's
    ``activation_numel`` and ``workspace_numel``: for a CNN, its first convolution's input in
    oneDNN's channel-blocked layout), once, ``SECOND_ORDER_PASSES`` times for exact and
    Neumann products through the whole network. Then bytes that follow neither
    (:func:`fixed_memory_bytes`): ``RUNTIME_SCRATCH_BYTES``, ``CONV_RUNTIME_BYTES`` for a
    model with convolutions and ``NETWORK_SCRATCH_BYTES`` where y is the whole network.
    Measured against real gRPC workers by ``rabo bench policy`` (docs/method.md section 6);
    the coordinator applies ``policy.safety`` on top.
    """
    return memory_from_terms(memory_terms(task, hp, ratio, batch))


def memory_from_terms(terms: Mapping[str, float],
                      constants: Mapping[str, float] | None = None) -> int:
    """The estimate from :func:`memory_terms` under ``constants`` (by default the calibrated
    ones, :func:`memory_constants`; ``rabo bench policy --fit`` passes fitted ones)."""
    c = memory_constants() if constants is None else constants
    return int(terms["counted"] + sum(c[k] * b for k, b in terms.items() if k != "counted"))


def estimate_flops(task: BilevelTask, hp: ClientHyper, ratio: float, batch: int) -> float:
    """FLOPs of one local step: 3x the forward FLOPs (forward + backward) per evaluation."""
    forward = sum(task.model.layer_flops(ratio, batch).values())
    return 3.0 * forward * gradient_evaluations(hp)


def calibrated_memory(task: BilevelTask, hp: ClientHyper, ratio: float, batch: int,
                      measured: Mapping[float, int] | None) -> tuple[int, str]:
    """Peak bytes expected at ``ratio`` for a worker whose measured peaks (above its start-up
    footprint, per ratio it ran) are ``measured``, and where the figure comes from.

    A ratio it ran: its largest measured peak. Another ratio: the estimate's part that scales
    with the submodel (all of it but :func:`fixed_memory_bytes`) times measured / estimated of
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
    scratch = fixed_memory_bytes(task)
    factor = (max(0, plausible[near] - scratch)
              / max(1, estimate_memory(task, hp, near, batch) - scratch))
    mem = max(payload_bytes(task, ratio), int(scratch + factor * (estimate - scratch)))
    return mem, f"estimate x {factor:.2f} (measured at ratio {near:g})"


def payload_bytes(task: BilevelTask, ratio: float) -> int:
    """Bytes of an assignment at ``ratio``: x, y and v slices."""
    mask = MaskSpec("static", ratio, 0)
    return BYTES_PER_ELEMENT * (task.x_plan(mask, 0).numel() + 2 * task.y_plan(mask).numel())


def transfer_bytes(task: BilevelTask, ratio: float, element_bytes: float = BYTES_PER_ELEMENT
                   ) -> int:
    """Bytes one round moves over a worker's link at ``ratio``: the x, y and v slices down and
    an update of the same shape up, at ``element_bytes`` per element (wire.dtype)."""
    return int(2 * payload_bytes(task, ratio) * element_bytes / BYTES_PER_ELEMENT)


# forgetting factor of the link fit: a sample's weight shrinks by this much per newer sample,
# so the estimate follows a link that changes within a few rounds (a sample 4 rounds old
# weighs 0.24 of the newest)
LINK_FORGET = 0.7
LINK_WINDOW = 16  # samples kept
# a fit of the fixed part needs transfers of different sizes: the largest at least this many
# times the smallest (else the fixed part of the last good fit is kept)
LINK_SPREAD = 1.5


@dataclass
class LinkEstimate:
    """A worker's link, from the rounds it ran: a round at ``b`` payload bytes (down plus up)
    takes ``fixed_s + b * s_per_byte`` seconds outside its step, fitted by weighted least
    squares to the rounds it ran (weights ``LINK_FORGET`` per newer sample, the last
    ``LINK_WINDOW``). The fixed part is what a round costs whatever its size (latency,
    connection and message overhead, the worker's own deserialisation); a per-byte figure
    alone would put it all on the bytes, so a small probe round would make a fast link look
    slow. Until transfers of different sizes have been seen, the fixed part is 0 (or that of
    the last fit that had them) and the per-byte part carries the rest. A round's
    ``transfer_s`` is assignment sent to update received, less the worker's compute."""

    s_per_byte: float = 0.0
    fixed_s: float = 0.0
    samples: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    def add(self, nbytes: int, transfer_s: float) -> None:
        if nbytes <= 0 or not transfer_s > 0 or not math.isfinite(transfer_s):
            return  # nothing moved or not measured (in-process clients)
        self.history = [*self.history[-(LINK_WINDOW - 1):], (nbytes, transfer_s)]
        self.samples += 1
        n = len(self.history)
        w = [LINK_FORGET ** (n - 1 - i) for i in range(n)]
        sw = sum(w)
        mb = sum(wi * b for wi, (b, _) in zip(w, self.history, strict=True)) / sw
        mt = sum(wi * t for wi, (_, t) in zip(w, self.history, strict=True)) / sw
        sizes = [b for b, _ in self.history]
        if max(sizes) >= LINK_SPREAD * min(sizes):
            var = sum(wi * (b - mb) ** 2 for wi, (b, _) in zip(w, self.history, strict=True))
            cov = sum(wi * (b - mb) * (t - mt)
                      for wi, (b, t) in zip(w, self.history, strict=True))
            slope = cov / var
            if slope > 0:
                self.fixed_s = max(0.0, mt - slope * mb)
        if mt <= self.fixed_s:  # the rounds got faster than the fixed part: refit from 0
            self.fixed_s = 0.0
        self.s_per_byte = (mt - self.fixed_s) / mb

    def predict(self, nbytes: int) -> float:
        return self.fixed_s + nbytes * self.s_per_byte

    def decay(self) -> None:
        """Halve the estimate (a worker left out for its link is measured no more)."""
        self.s_per_byte *= 0.5
        self.fixed_s *= 0.5
        self.history = [(b, 0.5 * t) for b, t in self.history]

    @property
    def mbit_per_s(self) -> float:
        return 8e-6 / self.s_per_byte if self.s_per_byte > 0 else 0.0


def choose_ratio(task: BilevelTask, hp: ClientHyper, resources: Resources,
                 ladder: list[float], safety: float, deadline_s: float, batch: int,
                 measured: Mapping[float, int] | None = None, link: bool = False,
                 element_bytes: float = BYTES_PER_ELEMENT) -> Choice:
    """The largest fitting ratio of ``ladder`` (tried from large to small), or why none fits.
    ``measured``: the worker's measured peaks per ratio (:func:`calibrated_memory`).
    ``link`` (with a deadline): the estimated step plus transfer time (``transfer_bytes`` at
    ``element_bytes`` per element times ``resources.link_s_per_byte``) must fit the deadline;
    a worker whose link is not measured yet gets the smallest ratio that fits its memory (a
    probe round: the fewest bytes, whatever its link)."""
    budget = resources.memory_budget_bytes * safety
    smallest_mem = None
    bound, larger = "none", ""
    probe = link and deadline_s > 0 and resources.link_s_per_byte <= 0
    for ratio in [min(ladder)] if probe else sorted(ladder, reverse=True):
        mem, source = calibrated_memory(task, hp, ratio, batch, measured)
        smallest_mem = mem
        if mem > budget:
            bound, larger = "memory", f"; ratio {ratio:g} needs ~{format_bytes(mem)}"
            continue
        if probe:
            return Choice(ratio, f"ratio {ratio:g}: ~{format_bytes(mem)} ({source}) of "
                          f"{format_bytes(budget)} usable; the smallest that fits, as the link "
                          f"is not measured yet (policy.link)", mem, 0.0, "probe")
        step_s = 0.0
        if resources.flops_per_s > 0:
            step_s = estimate_flops(task, hp, ratio, batch) / resources.flops_per_s
            if deadline_s > 0 and step_s > deadline_s:
                bound, larger = "compute", (f"; ratio {ratio:g} needs ~{step_s:.2f}s per "
                                            f"step, over the {deadline_s:g}s deadline")
                continue
        transfer_s = 0.0
        if link and resources.link_s_per_byte > 0:
            transfer_s = resources.link_fixed_s + \
                transfer_bytes(task, ratio, element_bytes) * resources.link_s_per_byte
            if deadline_s > 0 and step_s + transfer_s > deadline_s:
                mbit = 8e-6 / resources.link_s_per_byte
                bound, larger = "link", (
                    f"; ratio {ratio:g} needs ~{step_s + transfer_s:.2f}s ({step_s:.2f}s "
                    f"step + {transfer_s:.2f}s transfer at {mbit:.3g} Mbit/s), over the "
                    f"{deadline_s:g}s deadline")
                continue
        timing = (f", ~{step_s + transfer_s:.2f}s step + transfer of the {deadline_s:g}s "
                  "deadline"
                  if link and deadline_s > 0 else "")
        return Choice(ratio, f"ratio {ratio:g}: ~{format_bytes(mem)} ({source}) of "
                      f"{format_bytes(budget)} usable{timing}{larger}", mem, step_s, bound,
                      transfer_s)
    why = (f"the smallest ratio {min(ladder):g} needs ~{format_bytes(smallest_mem or 0)} but "
           f"only {format_bytes(budget)} of {format_bytes(resources.memory_budget_bytes)} "
           f"may be used (safety {safety:g})")
    if deadline_s > 0 and smallest_mem is not None and smallest_mem <= budget:
        r = min(ladder)
        step = (estimate_flops(task, hp, r, batch) / resources.flops_per_s
                if resources.flops_per_s > 0 else 0.0)
        if link and resources.link_s_per_byte > 0:
            transfer = resources.link_fixed_s + \
                transfer_bytes(task, r, element_bytes) * resources.link_s_per_byte
            why = (f"the smallest ratio {r:g} needs ~{step + transfer:.2f}s ({step:.2f}s step "
                   f"+ {transfer:.2f}s transfer at {8e-6 / resources.link_s_per_byte:.3g} "
                   f"Mbit/s), over the {deadline_s:g}s deadline")
            bound = "link" if step <= deadline_s else "compute"
        else:
            why = (f"the smallest ratio {r:g} needs ~{step:.2f}s per step, "
                   f"over the {deadline_s:g}s deadline")
            bound = "compute"
    else:
        bound = "memory"
    return Choice(None, why, bound=bound)
