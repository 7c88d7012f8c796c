"""The round engine: a client step and a server step, with no transport in it.

    coordinator                                   worker
    -----------                                   ------
    plan(round, client, ratio) -> ClientPlan
    assign(state, plan)        -> Assignment  ==>  client_step(assignment, data) -> Update
    server_step(state, [(plan, update), ...])  <==

The in-process runner, the gRPC coordinator/worker pair and the torch.distributed backend all
drive these same functions, so for one config and seed they produce the same numbers; only how
assignments and updates travel differs.

RABO and RAFBO are two configurations of this engine [recon, see docs/method.md]:
  * RABO: a client runs K inner y steps, one v step, and returns its hypergradient slice with
    its y and v deltas; the coordinator coverage-averages the hypergradients and takes the x step
    itself (SGD, momentum or Adam).
  * RAFBO: a client runs T local iterations of (K inner y steps, one v step, one x step) and
    returns its x, y and v deltas; the coordinator coverage-averages them.

Within a local iteration the estimator is evaluated where the last inner step's gradient was
taken (x, y_{K-1}) on the same batch, so that ``fd-forward`` reuses that gradient; with K = 1
this is the single-loop, simultaneous update of SOBA / FdeHBO.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rabo.aggregation import CoverageAverager, CoverageStats, apply_average
from rabo.config import Config, EstimatorConfig
from rabo.data import ClientData, TensorSet
from rabo.errors import UpdateRejected
from rabo.estimators import Problem, grads, make_estimator
from rabo.masks import MaskSpec, client_mask_seed
from rabo.params import Params, norm, numel
from rabo.runtime import peak_memory_bytes, reset_peak_memory
from rabo.step import runner as step_runner
from rabo.submodel import ParamLayout, SlicePlan, extract, scatter
from rabo.tasks import Batch, BilevelTask
from rabo.wireformat import ErrorFeedback, WireFormat

log = logging.getLogger("rabo")

# --------------------------------------------------------------------------- value types



@dataclass(frozen=True)
class ClientHyper:
    """What a client needs besides its slices: travels with every assignment."""

    algorithm: str
    inner_steps: int
    inner_lr: float
    local_steps: int
    local_lr: float
    batch_size: int
    estimator: str
    delta: float
    eta_v: float
    radius: float
    neumann_terms: int
    neumann_eta: float
    seed: int
    wire_dtype: str = "float32"  # of the slices both ways (wire.dtype)
    wire_block: int = 256  # int8: entries per block scale (wire.block)
    wire_error_feedback: bool = True  # int8: residuals carried to the next update
    step: str = "auto"  # how the local work runs (worker.step; rabo.step)
    compile_backend: str = "inductor"  # worker.compile_backend

    @classmethod
    def from_config(cls, cfg: Config) -> ClientHyper:
        return cls(
            algorithm=cfg.algorithm,
            inner_steps=cfg.inner.steps,
            inner_lr=cfg.inner.lr,
            local_steps=cfg.outer.local_steps if cfg.algorithm == "rafbo" else 1,
            local_lr=cfg.outer.lr,
            batch_size=cfg.data.batch_size,
            estimator=cfg.estimator.name,
            delta=cfg.estimator.delta,
            eta_v=cfg.estimator.eta_v,
            radius=cfg.estimator.radius,
            neumann_terms=cfg.estimator.neumann_terms,
            neumann_eta=cfg.estimator.neumann_eta,
            seed=cfg.seed,
            wire_dtype=cfg.wire.dtype,
            wire_block=cfg.wire.block,
            wire_error_feedback=cfg.wire.error_feedback,
            step=cfg.worker.step,
            compile_backend=cfg.worker.compile_backend,
        )

    @property
    def wire(self) -> WireFormat:
        """What the slices look like on the wire (rabo.wireformat)."""
        return WireFormat(self.wire_dtype, self.wire_block, self.wire_error_feedback)

    def estimator_config(self) -> EstimatorConfig:
        return EstimatorConfig(name=self.estimator, delta=self.delta,  # type: ignore[arg-type]
                               eta_v=self.eta_v, radius=self.radius,
                               neumann_terms=self.neumann_terms, neumann_eta=self.neumann_eta)


@dataclass(frozen=True)
class ClientPlan:
    """The coordinator's record of one client's share of a round: what it will receive and
    exactly which slices (names and shapes) it must send back."""

    round: int
    client_id: int
    mask: MaskSpec
    x: SlicePlan
    y: SlicePlan  # v shares y's plan

    @property
    def ratio(self) -> float:
        return self.mask.ratio


@dataclass
class Assignment:
    round: int
    client_id: int
    mask: MaskSpec
    hyper: ClientHyper
    x: Params
    y: Params
    v: Params

    def payload_numel(self) -> int:
        return numel(self.x) + numel(self.y) + numel(self.v)

    def payload_bytes(self) -> int:
        return _nbytes(self.x, self.y, self.v)


@dataclass
class Update:
    """A client's result. ``x`` is a hypergradient slice (RABO) or an x delta (RAFBO);
    ``y`` and ``v`` are deltas. Measurements ride along."""

    round: int
    client_id: int
    x: Params
    y: Params
    v: Params
    samples: int
    upper_loss: float
    compute_s: float = 0.0
    peak_mem_bytes: int = 0

    def payload_numel(self) -> int:
        return numel(self.x) + numel(self.y) + numel(self.v)

    def payload_bytes(self) -> int:
        return _nbytes(self.x, self.y, self.v)

    def received(self, fmt: WireFormat) -> Update:
        """What a receiver keeps of this update, sent in ``fmt`` (``WireFormat.received``:
        int8 decoded, raising :class:`~rabo.wireformat.WireFormatError` on bad scales)."""
        if not fmt.quantized:
            return self
        return dataclasses.replace(self, x=fmt.received(self.x), y=fmt.received(self.y),
                                   v=fmt.received(self.v))

    def as_float32(self) -> Update:
        """This update with float32 slices (itself when they are already). Int8 slices are
        decoded where they are received (``WireFormat.received``), never held as codes."""
        parts = (self.x, self.y, self.v)
        if all(t.dtype == torch.float32 for p in parts for t in p.values()):
            return self
        x, y, v = ({k: t.float() for k, t in p.items()} for p in parts)
        return dataclasses.replace(self, x=x, y=y, v=v)


@dataclass
class GlobalState:
    round: int  # rounds completed
    x: Params
    y: Params
    v: Params
    opt: dict[str, Params] = field(default_factory=dict)
    y_clients: dict[int, Params] = field(default_factory=dict)  # lower_level: personalized
    v_clients: dict[int, Params] = field(default_factory=dict)
    c_x_star: int | None = None


@dataclass(frozen=True)
class RoundStats:
    round: int
    coverage_x: CoverageStats
    coverage_y: CoverageStats
    step_norm: float  # norm of the averaged hypergradient (RABO) or x delta (RAFBO)
    upper_loss: float  # sample-weighted mean of the clients' reported f
    aggregation_s: float
    # clients whose updates were dropped because the aggregate came out non-finite
    dropped: tuple[int, ...] = ()
    clipped: int = 0  # update parts scaled down by aggregation.clip_rms
    early: int = 0  # updates averaged while the round's other transfers still ran
    # which coordinates of x some update covered (None: every one, or no update at all)
    x_covered: Mapping[str, torch.Tensor] | None = None


# --------------------------------------------------------------------------- helpers


def client_weight(weighting: str, ratio: float, samples: int) -> float:
    """A client's weight in coverage averaging: 1 (uniform), its sample count, or 1/ratio
    (inverse-ratio: a client that covers a fraction r of a layer weighs 1/r on what it covers,
    so every client's total influence per round is about equal)."""
    if weighting == "samples":
        return float(samples)
    if weighting == "inverse-ratio":
        return 1.0 / ratio
    return 1.0


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (numpy SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
               .astype(np.uint64).dot(np.array([1, 2**32], dtype=np.uint64)) >> np.uint64(1))


def sample_batch(split: TensorSet, batch_size: int, seed: int) -> Batch:
    n = len(split)
    if batch_size <= 0 or batch_size >= n:
        index = torch.arange(n)
    else:
        gen = torch.Generator().manual_seed(seed)
        index = torch.randperm(n, generator=gen)[:batch_size]
    device = split.inputs.device
    i = index.to(device)
    return Batch(split.inputs[i], split.labels[i], i)


def sample_participants(seed: int, round: int, candidates: Sequence[int], fraction: float
                        ) -> list[int]:
    """Seeded choice of ceil(fraction * n) clients among ``candidates``, sorted."""
    pool = sorted(candidates)
    m = min(len(pool), max(1, math.ceil(fraction * len(pool) - 1e-9)))
    if m == len(pool):
        return pool
    rng = np.random.Generator(np.random.PCG64([seed, round, 0x5A17]))
    return sorted(int(c) for c in rng.choice(pool, size=m, replace=False))


# --------------------------------------------------------------------------- the engine


class RoundEngine:
    """Client and server steps of RABO / RAFBO for one task and config."""

    def __init__(self, cfg: Config, task: BilevelTask) -> None:
        self.cfg = cfg
        self.task = task
        self.hyper = ClientHyper.from_config(cfg)
        # RMS of the global values under each slice plan, for the state last checked against
        # (weakly: the cache keeps no old model alive): workers that share a plan (all of
        # them at ratio 1) need it once per round, not once each
        self._refs_lock = threading.Lock()
        self._refs: tuple[Callable[[], GlobalState | None], dict[tuple[str, str], float]] = (
            lambda: None, {})

    # ------------------------------------------------------------------ coordinator side

    def init_state(self) -> GlobalState:
        x, y = self.task.init(self.cfg.seed)
        v = {k: torch.zeros_like(t) for k, t in y.items()}
        return GlobalState(round=0, x=x, y=y, v=v)

    def plan(self, round: int, client_id: int, ratio: float) -> ClientPlan:
        mask = MaskSpec(policy=self.cfg.mask.policy, ratio=ratio, round=round,
                        seed=client_mask_seed(self.cfg.seed, client_id),
                        stride=self.cfg.mask.rolling_stride,
                        sweep_rounds=self.cfg.mask.sweep_rounds,
                        layer_shift=self.cfg.mask.layer_shift)
        return ClientPlan(round, client_id, mask, self.task.x_plan(mask, client_id),
                          self.task.y_plan(mask))

    def assign(self, state: GlobalState, plan: ClientPlan, copy: bool = True) -> Assignment:
        """The slices of ``plan``; ``copy=False`` shares whole tensors with ``state`` (for
        read-only use, e.g. encoding them for the wire while the state stands still)."""
        y_full, v_full = self._lower_of(state, plan.client_id)
        x, y, v = (extract(state.x, plan.x, copy), extract(y_full, plan.y, copy),
                   extract(v_full, plan.y, copy))
        wire = self.hyper.wire
        if wire.dtype != "float32":  # rounded from the float32 master: no error accumulates
            x, y, v = (wire.encode(p) for p in (x, y, v))
        return Assignment(round=plan.round, client_id=plan.client_id, mask=plan.mask,
                          hyper=self.hyper, x=x, y=y, v=v)

    def payload_key(self, state: GlobalState, plan: ClientPlan) -> tuple[Any, ...]:
        """Equal for two plans whose assignments from ``state`` hold the same tensors (same
        round, same kept entries of x and y, the shared lower level or the same client's
        own): what lets a transport encode such an assignment once and send it to both."""
        personal = (self.cfg.lower_level == "personalized" and plan.client_id in state.y_clients)
        return (plan.round, plan.client_id if personal else None, plan.x.key(), plan.y.key())

    def _lower_of(self, state: GlobalState, client_id: int) -> tuple[Params, Params]:
        """The (y, v) a client starts from: its own under ``lower_level: personalized`` (the
        shared initial ones before its first round); reads ``state``, never changes it."""
        if self.cfg.lower_level == "personalized" and client_id in state.y_clients:
            return state.y_clients[client_id], state.v_clients[client_id]
        return state.y, state.v

    def magnitudes(self, state: GlobalState, plan: ClientPlan, update: Update
                   ) -> dict[str, tuple[float, float]]:
        """Per part (x, y, v): the RMS of the update's slices and the RMS of the global values
        they update (float32 sums of squares, float64 where those overflow, so that a finite but
        huge update reads as what it is)."""
        y_full, v_full = self._lower_of(state, plan.client_id)
        personal = y_full is not state.y
        with self._refs_lock:
            if self._refs[0]() is not state:
                self._refs = (weakref.ref(state), {})
            refs = self._refs[1]
        out = {}
        for part, values, full, slice_plan in (("x", update.x, state.x, plan.x),
                                               ("y", update.y, y_full, plan.y),
                                               ("v", update.v, v_full, plan.y)):
            key = (part, slice_plan.key()) if part == "x" or not personal else None
            ref = refs.get(key) if key else None
            if ref is None:
                ref = _rms(extract(full, slice_plan, copy=False).values())
                if key:
                    refs[key] = ref  # a float: whichever thread stores it stores the same
            out[part] = (_rms(values.values()), ref)
        return out

    def check_magnitude(self, state: GlobalState, plan: ClientPlan, update: Update) -> None:
        """Raise :class:`UpdateRejected` when a part of ``update`` is larger than
        ``aggregation.max_update_rms`` allows (every transport calls this before aggregating)."""
        limit = self.cfg.aggregation.max_update_rms
        if not limit:
            return
        for part, (rms, ref) in self.magnitudes(state, plan, update).items():
            if not rms <= limit * max(1.0, ref):  # also refuses a NaN RMS
                raise UpdateRejected(
                    f"update {part} of client {plan.client_id}: RMS {rms:.3g} exceeds "
                    f"aggregation.max_update_rms {limit:g} x max(1, {ref:.3g}) (the RMS of the "
                    f"global values it updates)")

    def aggregation(self, state: GlobalState, round: int) -> Aggregation:
        """An empty aggregate of round ``round`` over ``state``: updates go in with
        :meth:`Aggregation.add` (in client-id order) while others are still on their way, and
        :meth:`server_step` finishes it (``started``)."""
        return Aggregation(self, state, round)

    def server_step(self, state: GlobalState, results: Sequence[tuple[ClientPlan, Update]],
                    started: Aggregation | None = None) -> tuple[GlobalState, RoundStats]:
        """Coverage-average the updates into a new state (``state`` itself is not modified).

        ``started``: an aggregate of this round that already holds some of ``results`` (a
        transport that adds each update as it arrives); it is used when what it holds is the
        first of ``results`` in client-id order, and the rest are added to it, so the sums
        run in the same order either way and give the same bits.

        Should the aggregate come out non-finite (float overflow of updates that passed
        :meth:`check_magnitude`), the largest update is dropped and the round aggregated again,
        until the result is finite; with none left the state stays as it was. The dropped
        clients are named in the stats."""
        ordered = sorted(results, key=lambda r: r[0].client_id)
        if not ordered:
            raise ValueError("server_step needs at least one update")
        agg = started if started is not None and started.holds_prefix_of(ordered, state) \
            else None
        new_state, stats = self._aggregate(state, ordered, agg)
        if _finite_state(new_state):
            return new_state, stats
        log.warning("round %d: the aggregate is not finite; dropping the largest updates until "
                    "it is (the global model stays finite)", ordered[0][0].round)
        # largest first: the one whose biggest part is the most above its reference
        ranked = sorted(ordered, key=lambda r: -max(
            rms / max(1.0, ref) for rms, ref in self.magnitudes(state, *r).values()))
        dropped: list[int] = []
        for plan, _ in ranked:
            dropped.append(plan.client_id)
            kept = [r for r in ordered if r[0].client_id not in dropped]
            if not kept:
                break
            new_state, stats = self._aggregate(state, kept)
            if _finite_state(new_state):
                log.warning("round %d: dropped the updates of clients %s", ordered[0][0].round,
                            sorted(dropped))
                return new_state, dataclasses.replace(stats, dropped=tuple(sorted(dropped)))
        log.warning("round %d: no finite aggregate; the model is left as it was",
                    ordered[0][0].round)
        return self.skip_round(state, ordered[0][0].round, tuple(sorted(dropped)))

    def skip_round(self, state: GlobalState, round: int, dropped: tuple[int, ...] = ()
                   ) -> tuple[GlobalState, RoundStats]:
        """Round ``round`` with no update aggregated: the model stays as it was."""
        empty = CoverageAverager({}).stats()
        return (dataclasses.replace(state, round=round),
                RoundStats(round, empty, empty, 0.0, 0.0, 0.0, dropped=dropped))

    def _aggregate(self, state: GlobalState, ordered: Sequence[tuple[ClientPlan, Update]],
                   agg: Aggregation | None = None) -> tuple[GlobalState, RoundStats]:
        clipped = 0
        if self.cfg.aggregation.clip_rms:  # scales by the round's medians: needs them all
            ordered, clipped = self._clipped(state, ordered)
            agg = None
        if agg is None:
            agg = Aggregation(self, state, ordered[0][0].round)
        early = len(agg.client_ids)
        for plan, upd in ordered[early:]:
            agg.add(plan, upd)
        return agg.finish(clipped, early)

    def _clipped(self, state: GlobalState, ordered: Sequence[tuple[ClientPlan, Update]]
                 ) -> tuple[list[tuple[ClientPlan, Update]], int]:
        """Norm clipping [ext]: each part scaled to at most clip_rms x the round's median RMS
        of that part (the updates themselves are not modified)."""
        factor = self.cfg.aggregation.clip_rms
        sizes = [{p: rms for p, (rms, _) in self.magnitudes(state, plan, upd).items()}
                 for plan, upd in ordered]
        out, clipped = [], 0
        medians = {p: float(np.median([s[p] for s in sizes])) for p in ("x", "y", "v")}
        for (plan, upd), size in zip(ordered, sizes, strict=True):
            parts = {}
            for p in ("x", "y", "v"):
                values = getattr(upd, p)
                bound = factor * medians[p]
                if size[p] > bound > 0:
                    clipped += 1
                    values = {n: t * (bound / size[p]) for n, t in values.items()}
                parts[p] = values
            out.append((plan, dataclasses.replace(upd, **parts)))
        return out, clipped

    # ------------------------------------------------------------------ worker side

    def client_step(self, assignment: Assignment, data: ClientData,
                    device: torch.device | str = "cpu", feedback: ErrorFeedback | None = None
                    ) -> Update:
        """Run one client's local work on ``device``; returns its update slices in their
        wire form (``feedback``: the client's int8 residuals, see :func:`client_step`)."""
        return client_step(self.task, assignment, data, torch.device(device), feedback)


class Aggregation:
    """One round's coverage averages of x, y and v, filled one update at a time.

    Updates go in with :meth:`add` in increasing client id (every transport sums in that
    order, so every transport gets the same bits); :meth:`finish` takes the server step from
    what was added. A transport that adds each update as soon as it and every update before
    it in that order have arrived does the averaging while the round's other transfers are
    still running (the gRPC transport, ``rabo.rounds.EarlyAggregate``)."""

    def __init__(self, engine: RoundEngine, state: GlobalState, round: int) -> None:
        self.engine = engine
        self.state = state
        self.round = round
        self.client_ids: list[int] = []
        self.seconds = 0.0  # spent in add() and finish()
        self._xa = CoverageAverager(state.x)
        self._ya = CoverageAverager(state.y)
        self._va = CoverageAverager(state.v)
        self._personalized = engine.cfg.lower_level == "personalized"
        self._y_clients = dict(state.y_clients)
        self._v_clients = dict(state.v_clients)
        self._weighted_loss = 0.0
        self._samples = 0

    def holds_prefix_of(self, ordered: Sequence[tuple[ClientPlan, Update]],
                        state: GlobalState) -> bool:
        """Whether this aggregate is over ``state`` and holds the first of ``ordered``."""
        ids = [p.client_id for p, _ in ordered[:len(self.client_ids)]]
        return self.state is state and ids == self.client_ids

    def add(self, plan: ClientPlan, upd: Update) -> None:
        if self.client_ids and plan.client_id <= self.client_ids[-1]:
            raise ValueError(f"client {plan.client_id} added after client "
                             f"{self.client_ids[-1]}: updates go in by increasing client id")
        start = time.perf_counter()
        upd = upd.as_float32()
        w = client_weight(self.engine.cfg.aggregation.weighting, plan.ratio, upd.samples)
        self._xa.add(plan.x, upd.x, w)
        self._ya.add(plan.y, upd.y, w)
        self._va.add(plan.y, upd.v, w)
        self._weighted_loss += upd.upper_loss * upd.samples
        self._samples += upd.samples
        if self._personalized:
            y_c, v_c = self.engine._lower_of(self.state, plan.client_id)
            self._y_clients[plan.client_id] = scatter(y_c, plan.y, upd.y, add=True)
            self._v_clients[plan.client_id] = scatter(v_c, plan.y, upd.v, add=True)
        self.client_ids.append(plan.client_id)
        self.seconds += time.perf_counter() - start

    def finish(self, clipped: int = 0, early: int = 0) -> tuple[GlobalState, RoundStats]:
        start = time.perf_counter()
        cfg, state = self.engine.cfg, self.state
        xa, ya, va = self._xa, self._ya, self._va
        cov_x, cov_y = xa.stats(), ya.stats()
        avg_x = xa.average()
        opt = state.opt
        covered = xa.covered() if cov_x.zero else None
        if cfg.algorithm == "rabo":
            x, opt = outer_step(cfg, state.x, avg_x, covered, state.opt)
        else:
            x = {k: state.x[k] + cfg.outer.server_lr * avg_x[k] for k in state.x}
        if self._personalized:
            y, v = state.y, state.v
        else:
            y, v = apply_average(state.y, ya), apply_average(state.v, va)
        c_star = cov_x.min if state.c_x_star is None else min(state.c_x_star, cov_x.min)
        new_state = GlobalState(round=self.round, x=x, y=y, v=v, opt=opt,
                                y_clients=self._y_clients, v_clients=self._v_clients,
                                c_x_star=c_star)
        self.seconds += time.perf_counter() - start
        stats = RoundStats(self.round, cov_x, cov_y, norm(avg_x),
                           self._weighted_loss / max(self._samples, 1), self.seconds,
                           clipped=clipped, early=early, x_covered=covered)
        return new_state, stats


def _upper_loss(task: BilevelTask, x: Params, y: Params, val: Any, batch: int,
                device: torch.device) -> float:
    """f over the client's whole validation split, in pieces of ``batch`` samples (the
    sample-weighted mean of the pieces' f; one piece when the split fits): a forward pass over
    the whole split at once made the worker's peak grow with its data, e.g. 110 MiB of
    convolution outputs for 1,600 MNIST images in a CNN 32-64, whatever the ratio."""
    n = len(val)
    piece = batch if 0 < batch < n else n
    with torch.no_grad():
        if piece == n:
            return float(task.f(x, y, Batch(val.inputs, val.labels,
                                            torch.arange(n, device=device))))
        total = 0.0
        for start in range(0, n, piece):
            stop = min(n, start + piece)
            idx = torch.arange(start, stop, device=device)
            part = Batch(val.inputs[start:stop], val.labels[start:stop], idx)
            total += float(task.f(x, y, part)) * (stop - start)
        return total / n


def client_step(task: BilevelTask, a: Assignment, data: ClientData, device: torch.device,
                feedback: ErrorFeedback | None = None) -> Update:
    """The worker's half of a round (module-level so workers need no coordinator state).

    The assignment's slices may be in any wire form; the update's are in the wire form of
    ``a.hyper.wire``. ``feedback``: this client's residuals, kept by the caller from round to
    round, when the wire is int8 with error feedback (``Job.feedback``); None rounds each
    update on its own."""
    hp = a.hyper
    fmt = hp.wire
    estimator = _estimator(hp)
    reset_peak_memory(device)  # so that each step reports its own peak
    start = time.perf_counter()
    # computed in float32 whatever the wire carries (wire.dtype)
    x0, y0, v0 = (_to_device(fmt.decode(p), device) for p in (a.x, a.y, a.v))
    train, val = data.train.to(device), data.val.to(device)
    upper_loss = _upper_loss(task, x0, y0, val, hp.batch_size, device)
    # [ext] the consistent scaler: a submodel's steps on each tensor scaled by the tensor's kept
    # fraction (1 for a whole tensor), which undoes the forward scaler's gain on its gradients
    fy = kept_fractions(task.y_layout, y0) if task.model.scaler == "consistent" else None
    fx = kept_fractions(task.x_layout, x0) if fy is not None else None
    # every batch drawn first (from seeds of (seed, round, client, t, k), as always), so that
    # the local work is a function of tensors alone, which worker.step may compile
    batches = [(sample_batch(val, hp.batch_size, derive_seed(hp.seed, a.round, a.client_id, t, 1)),
                [sample_batch(train, hp.batch_size,
                              derive_seed(hp.seed, a.round, a.client_id, t, 2, k))
                 for k in range(hp.inner_steps)])
               for t in range(hp.local_steps)]
    work = step_runner(local_work, hp.step, hp.compile_backend, device)
    x, y, v, hypergradient = work(task, hp, estimator, x0, y0, v0, batches, fy, fx)
    if hp.algorithm == "rafbo":
        x_out = _to_host({n: x[n] - x0[n] for n in x})
    else:
        x_out = _to_host(hypergradient)
    parts = {"x": x_out, "y": _to_host({n: y[n] - y0[n] for n in y}),
             "v": _to_host({n: v[n] - v0[n] for n in v})}
    if device.type == "cuda":  # the non-blocking copies to the host have landed
        torch.cuda.synchronize(device)
    if feedback is not None and fmt.feedback:
        plans = {"x": task.x_plan(a.mask, a.client_id), "y": task.y_plan(a.mask)}
        wire = {p: feedback.encode(fmt, p, values, plans["x" if p == "x" else "y"])
                for p, values in parts.items()}
    else:
        wire = {p: fmt.encode(values) for p, values in parts.items()}
    compute_s = time.perf_counter() - start
    return Update(
        round=a.round, client_id=a.client_id, x=wire["x"], y=wire["y"], v=wire["v"],
        samples=len(train), upper_loss=upper_loss, compute_s=compute_s,
        peak_mem_bytes=peak_memory_bytes(device),
    )


def local_work(task: BilevelTask, hp: ClientHyper, estimator: Any, x: Params, y: Params,
               v: Params, batches: Sequence[tuple[Batch, Sequence[Batch]]],
               fy: Mapping[str, float] | None, fx: Mapping[str, float] | None
               ) -> tuple[Params, Params, Params, Params]:
    """A client's local work on its starting (x, y, v) and its drawn batches: per local step
    t, K inner steps on y (the last one at the estimator's point), the estimator, and the
    simultaneous v (and, for RAFBO, x) steps. Returns the final (x, y, v) and the last
    hypergradient. Tensors in, tensors out: what ``worker.step`` compiles (rabo.step)."""
    hypergradient: Params = {}
    for val_batch, train_batches in batches:
        for k, train_batch in enumerate(train_batches):
            problem = Problem(f=functools.partial(_bound, task.f, val_batch),
                              g=functools.partial(_bound, task.g, train_batch))
            if k < len(train_batches) - 1:
                _, gy = grads(problem.g, x, y, wrt_x=False)
                y = _step(y, gy, hp.inner_lr, fy)
                continue
            if estimator.uses_base:
                base = grads(problem.g, x, y)
                gy = base[1]
            else:
                base = None
                _, gy = grads(problem.g, x, y, wrt_x=False)
            est = estimator.estimate(problem, x, y, v, base)
            y = _step(y, gy, hp.inner_lr, fy)
            if fy is None:
                v, hypergradient = est.v, est.hypergradient
            else:  # a convex combination of two points of the ball: v stays projected
                assert fx is not None
                v = {n: v[n] + fy[n] * (est.v[n] - v[n]) if fy[n] != 1.0 else est.v[n]
                     for n in v}
                hypergradient = {n: h * fx[n] if fx[n] != 1.0 else h
                                 for n, h in est.hypergradient.items()}
            if hp.algorithm == "rafbo":
                x = _step(x, hypergradient, hp.local_lr, None)
    return x, y, v, hypergradient


@functools.lru_cache(maxsize=32)
def _estimator(hp: ClientHyper) -> Any:
    """One estimator object per client settings (a compiled step guards on the one it saw)."""
    return make_estimator(hp.estimator_config())


def _to_device(params: Params, device: torch.device) -> Params:
    """Slices onto ``device``: on CUDA from pinned host memory, without blocking."""
    if device.type != "cuda":
        return {k: t.to(device) for k, t in params.items()}
    return {k: t.pin_memory().to(device, non_blocking=True) for k, t in params.items()}


def _to_host(params: Params) -> Params:
    """Result tensors onto the host (from CUDA into pinned memory, without blocking: the
    caller synchronizes once for all of them)."""
    return {k: t.detach().to("cpu", non_blocking=t.is_cuda) for k, t in params.items()}


def kept_fractions(layout: Mapping[str, ParamLayout], sub: Mapping[str, torch.Tensor]
                   ) -> dict[str, float]:
    """Per tensor of a submodel: its kept entries over the full tensor's (1.0 when whole)."""
    return {n: t.numel() / math.prod(layout[n].shape) for n, t in sub.items()}


def _sum_squares(t: torch.Tensor) -> float:
    """Sum of squares: a float32 dot product (memory speed; measured 35x the float64 cast
    and square it replaced), in float64 only when float32 overflows (a finite but huge
    update then reads as what it is)."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.float32:
        total = float(torch.dot(flat, flat))
        if math.isfinite(total):
            return total
    return float(torch.linalg.vector_norm(flat, dtype=torch.float64)) ** 2


def _rms(tensors: Iterable[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for t in tensors:
        total += _sum_squares(t)
        count += t.numel()
    return math.sqrt(total / count) if count else 0.0


def _nbytes(*parts: Params) -> int:
    return sum(t.numel() * t.element_size() for p in parts for t in p.values())


def _finite_state(state: GlobalState) -> bool:
    parts = [state.x, state.y, state.v, *state.opt.values(), *state.y_clients.values(),
             *state.v_clients.values()]
    return all(all_finite(t) for p in parts for t in p.values())


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: a sum is non-finite when any entry is, so a
    finite float32 sum (one pass at memory speed) settles it; only a non-finite one (an
    entry, or a float32 overflow of finite entries) needs the exact test."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _step(params: Params, grad: Mapping[str, torch.Tensor], lr: float,
          scale: Mapping[str, float] | None) -> Params:
    """params - lr * grad, per tensor times ``scale[name]`` where given."""
    if scale is None:
        return {n: params[n] - lr * grad[n] for n in params}
    return {n: params[n] - (lr * scale[n]) * grad[n] for n in params}


def _bound(loss: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Batch],
                          torch.Tensor],
           batch: Batch, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]
           ) -> torch.Tensor:
    return loss(x, y, batch)


# --------------------------------------------------------------------------- x optimizer


def outer_step(cfg: Config, x: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor],
               covered: Mapping[str, torch.Tensor] | None, opt: Mapping[str, Params]
               ) -> tuple[Params, dict[str, Params]]:
    """One coordinator x step (RABO). Only covered coordinates move, and only their optimizer
    state advances: an uncovered coordinate keeps its value and its momentum. ``covered`` is
    None when every coordinate was covered (then no masking is needed).

    Adam keeps per-coordinate bias corrections, so that a coordinate's correction counts the
    rounds it was actually updated in. The previous state's tensors are never modified.
    """
    lr = cfg.outer.lr
    kind = cfg.outer.optimizer
    new_x: Params = {}
    new_opt: dict[str, Params] = {k: dict(v) for k, v in opt.items()}
    if kind == "sgd":  # an uncovered coordinate has a zero averaged gradient: no mask needed
        return {k: x[k] - lr * grad[k] for k in x}, new_opt
    beta1 = cfg.outer.momentum
    for k in x:
        mask = covered[k] if covered is not None else None
        g = grad[k]
        if kind == "momentum":
            old = opt.get("momentum", {}).get(k)
            buf = g.clone() if old is None else torch.add(g, old, alpha=beta1)
            step = buf
        else:
            beta2 = cfg.outer.beta2
            old_m = opt.get("adam_m", {}).get(k)
            old_s = opt.get("adam_v", {}).get(k)
            old_c1 = opt.get("adam_c1", {}).get(k)
            old_c2 = opt.get("adam_c2", {}).get(k)
            m = g * (1 - beta1) if old_m is None else torch.add(old_m * beta1, g,
                                                                 alpha=1 - beta1)
            s = g * g * (1 - beta2) if old_s is None else torch.addcmul(old_s * beta2, g, g,
                                                                        value=1 - beta2)
            # bias corrections c = 1 - beta^n per coordinate, advanced without powers:
            # 1 - beta^(n+1) = (1 - beta) + beta (1 - beta^n)
            c1 = (torch.full_like(g, 1 - beta1) if old_c1 is None
                  else torch.add(old_c1 * beta1, 1 - beta1))
            c2 = (torch.full_like(g, 1 - beta2) if old_c2 is None
                  else torch.add(old_c2 * beta2, 1 - beta2))
            if mask is not None:
                zero = torch.zeros_like(g)
                m = torch.where(mask, m, zero if old_m is None else old_m)
                s = torch.where(mask, s, zero if old_s is None else old_s)
                c1 = torch.where(mask, c1, zero if old_c1 is None else old_c1)
                c2 = torch.where(mask, c2, zero if old_c2 is None else old_c2)
            # step = m_hat / (sqrt(s_hat) + eps); uncovered coordinates are masked out below
            tiny = torch.finfo(g.dtype).tiny
            denom = (s / c2.clamp(min=tiny)).sqrt_().add_(1e-8)
            step = (m / c1.clamp(min=tiny)).div_(denom)
            new_opt.setdefault("adam_m", {})[k] = m
            new_opt.setdefault("adam_v", {})[k] = s
            new_opt.setdefault("adam_c1", {})[k] = c1
            new_opt.setdefault("adam_c2", {})[k] = c2
        if kind == "momentum":
            if mask is not None:
                old_buf = torch.zeros_like(g) if old is None else old
                buf = torch.where(mask, buf, old_buf)
            new_opt.setdefault("momentum", {})[k] = buf
            step = buf
        new = torch.add(x[k], step, alpha=-lr)
        new_x[k] = new if mask is None else torch.where(mask, new, x[k])
    return new_x, new_opt

