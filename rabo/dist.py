"""The torch.distributed backend: the round loop (``rabo.rounds``) over gloo (CPU) or nccl
(GPU).

Launched by torchrun (``torchrun --nnodes N --nproc-per-node P -m rabo.dist --config FILE``)
or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Rank 0 coordinates;
ranks 1..W-1 are workers, rank r serving client r-1. Per round, all ranks in lockstep:

1. every worker measures its resources (``rabo.resources``); an all-gather brings them to
   rank 0, which picks each worker's ratio with the same policy code as the gRPC coordinator;
2. rank 0 broadcasts the round's ratios (0: not taking part);
3. rank 0 sends each participant only its packed x, y, v slices (point-to-point); the worker,
   which derives the same slice plan from (round, client, ratio), unpacks them;
4. the worker runs the client step and sends back its packed update and its measurements;
5. rank 0 runs the server step, evaluates and writes ``metrics.jsonl`` in the gRPC schema.

Bytes on the wire (gloo) come from the kernel's counters of rank 0's TCP connections to each
worker, mapped to ranks by exchanging the workers' local endpoints once at start. With nccl
the transport is not a TCP socket the coordinator can see: wire fields are null.

A rank that dies ends the job: its peers' pending send/recv fails (connection closed) or times
out after ``cluster.dist_timeout_s``; each rank then exits non-zero with a message naming the
round, and torchrun tears the job down.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from rabo import checkpoint
from rabo.cliargs import quiet, set_quiet
from rabo.config import Config, to_dict
from rabo.distcli import add_dist_args
from rabo.engine import Assignment, ClientPlan, GlobalState, Update, client_step
from rabo.errors import ConfigError, ExitCode, RaboError
from rabo.job import Job, resolve_device
from rabo.metrics import MetricsWriter, wire_total, write_json
from rabo.netstat import SocketCounters, TcpCounters
from rabo.params import Params
from rabo.policy import Resources
from rabo.records import WorkerRound, summarize
from rabo.resources import measure
from rabo.rounds import EarlyAggregate, Exchange, Member, Returned, RoundLoop, Task, Transport
from rabo.runner import ProgressLine
from rabo.runtime import peak_above_startup, rss_bytes, settled_rss_bytes, tune_allocator
from rabo.units import parse_byte_list, parse_bytes
from rabo.wireformat import ClientResiduals, WireFormat, WireFormatError

log = logging.getLogger("rabo.dist")
PROFILE_FIELDS = 2  # memory budget, flops/s
META_FIELDS = 6  # compute_s, peak_mem_bytes, samples, upper_loss, receive_s, send_s
MAX_ENDPOINTS = 16  # local TCP endpoints a worker reports (gloo opens one or a few per peer)


class DistError(RaboError):
    """The distributed job cannot go on (a rank failed, timed out or was misconfigured)."""


@dataclass
class Context:
    cfg: Config
    job: Job
    rank: int
    world: int
    backend: str
    comm_device: torch.device  # where tensors travel (cuda for nccl)
    compute_device: torch.device
    started_at: float = 0.0  # time.time() when this rank started (summary.json provenance)


# --------------------------------------------------------------------------- packing


def pack(parts: list[Params], device: torch.device) -> torch.Tensor:
    """One contiguous byte buffer of every tensor of ``parts``, in order: their bytes in the
    wire form they hold (rabo.wireformat), so nothing is rounded here."""
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8)
            for p in parts for t in p.values()]
    return (torch.cat(flat).to(device) if flat
            else torch.zeros(0, dtype=torch.uint8, device=device))


Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]


def unpack(buf: torch.Tensor, layouts: list[Layout]) -> list[Params]:
    """The tensors of a :func:`pack` buffer, laid out as ``layouts`` (one per part)."""
    out: list[Params] = []
    pos = 0
    buf = buf.cpu()
    for part in layouts:
        d: Params = {}
        for name, dtype, shape in part:
            nbytes = math.prod(shape) * dtype.itemsize
            # cloned first: a view as a wider dtype needs an aligned start
            d[name] = buf[pos:pos + nbytes].clone().view(dtype).view(shape)
            pos += nbytes
        out.append(d)
    if pos != buf.numel():
        raise DistError(f"packed buffer holds {buf.numel()} bytes, the plan {pos}")
    return out


def plan_layouts(plan: ClientPlan, fmt: WireFormat) -> list[Layout]:
    """The wire tensors of x, y and v for ``plan`` in ``fmt``."""
    return [fmt.layout(plan.x.shapes), fmt.layout(plan.y.shapes), fmt.layout(plan.y.shapes)]


def plan_nbytes(plan: ClientPlan, fmt: WireFormat) -> int:
    return fmt.nbytes(plan.x.shapes) + 2 * fmt.nbytes(plan.y.shapes)


# --------------------------------------------------------------------------- wire counters


def _ip_value(addr: str) -> int:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return int(ip) & ((1 << 53) - 1)  # exact in float64 for IPv4 (and most IPv6 suffixes)


def local_endpoints(store_port: int) -> torch.Tensor:
    """This process's TCP endpoints (ip, port) other than the rendezvous store, padded."""
    out = torch.zeros(MAX_ENDPOINTS, 2, dtype=torch.float64)
    conns = TcpCounters().connections() or []
    mine = [c for c in conns if c.remote_port != store_port and c.local_port != store_port]
    for i, c in enumerate(mine[:MAX_ENDPOINTS]):
        out[i, 0] = _ip_value(c.local_addr)
        out[i, 1] = c.local_port
    return out


class RankCounters:
    """Rank 0's per-worker wire counters: its connections whose remote end is a worker's."""

    def __init__(self, endpoints: torch.Tensor) -> None:
        self.tcp = TcpCounters()
        self.owner: dict[tuple[int, int], int] = {}
        for rank in range(1, endpoints.shape[0]):
            for ip, port in endpoints[rank].tolist():
                if port:
                    self.owner[(int(ip), int(port))] = rank

    def read(self) -> dict[int, SocketCounters] | None:
        conns = self.tcp.connections()
        if conns is None or not self.owner:
            return None
        totals: dict[int, SocketCounters] = {}
        for c in conns:
            rank = self.owner.get((_ip_value(c.remote_addr), c.remote_port))
            if rank is None:
                continue
            t = totals.get(rank, SocketCounters(0, 0, 0, 0))
            totals[rank] = SocketCounters(t.bytes_sent + c.counters.bytes_sent,
                                          t.bytes_received + c.counters.bytes_received,
                                          t.segs_out + c.counters.segs_out,
                                          t.segs_in + c.counters.segs_in)
        return totals


# --------------------------------------------------------------------------- the ranks


def _gather_profiles(ctx: Context, mine: torch.Tensor) -> torch.Tensor:
    parts = [torch.zeros(PROFILE_FIELDS, dtype=torch.float64, device=ctx.comm_device)
             for _ in range(ctx.world)]
    dist.all_gather(parts, mine.to(ctx.comm_device))
    return torch.stack([p.cpu() for p in parts])


def _broadcast_ratios(ctx: Context, ratios: torch.Tensor) -> torch.Tensor:
    buf = ratios.to(ctx.comm_device)
    dist.broadcast(buf, src=0)
    return buf.cpu()


class DistTransport(Transport):
    """The round loop's torch.distributed transport, on rank 0: profiles gathered from every
    rank, ratios broadcast, slices and updates point-to-point (see the module docstring)."""

    def __init__(self, ctx: Context, counters: RankCounters | None) -> None:
        self.ctx = ctx
        self.counters = counters
        self.name = f"torch.distributed ({ctx.backend})"
        self._opened = 0.0

    def members(self, q: int) -> list[Member]:
        self._opened = self.clock()  # the round opens with the profiles' all-gather
        profiles = _gather_profiles(self.ctx, torch.zeros(PROFILE_FIELDS, dtype=torch.float64))
        return [Member(f"rank{rank}", rank - 1,
                       Resources(int(profiles[rank, 0]), float(profiles[rank, 1])))
                for rank in range(1, self.ctx.world)]

    def exchange(self, q: int, state: GlobalState, tasks: list[Task],
                 not_assigned: dict[str, str], early: EarlyAggregate) -> Exchange:
        ctx, engine = self.ctx, self.ctx.job.engine
        fmt = engine.hyper.wire
        plans = {t.plan.client_id + 1: t for t in tasks}  # rank -> task
        ratios = torch.zeros(ctx.world, dtype=torch.float64)
        for rank, t in plans.items():
            ratios[rank] = t.plan.ratio
        _broadcast_ratios(ctx, ratios)
        if not plans:
            raise DistError(f"round {q}: no worker could take part: {not_assigned}")
        before = self.counters.read() if self.counters else None
        sent_at = self.clock()
        sends, outgoing = [], []  # the buffers live until their sends complete
        for rank, t in plans.items():
            a = engine.assign(state, t.plan, copy=False)
            outgoing.append(pack([a.x, a.y, a.v], ctx.comm_device))
            sends.append(dist.isend(outgoing[-1], dst=rank))
        bufs = {rank: torch.empty(plan_nbytes(t.plan, fmt), dtype=torch.uint8,
                                  device=ctx.comm_device) for rank, t in plans.items()}
        metas = {rank: torch.empty(META_FIELDS, dtype=torch.float64, device=ctx.comm_device)
                 for rank in plans}
        recvs = [(rank, dist.irecv(bufs[rank], src=rank), dist.irecv(metas[rank], src=rank))
                 for rank in plans]
        for work in sends:
            _wait(work)
        # waited for in rank order (polling is_completed() on gloo's point-to-point works
        # never saw them finish: the job timed out), so a fast rank behind a slow one is
        # stamped late: a rank's transfer_s is an upper bound (docs/torch-distributed.md)
        arrived: dict[int, float] = {}
        for rank, rb, rm in recvs:
            _wait(rb)
            _wait(rm)
            arrived[rank] = self.clock()
        after = self.counters.read() if self.counters else None
        out = []
        for rank, t in sorted(plans.items()):
            plan = t.plan
            x, y, v = unpack(bufs[rank], plan_layouts(plan, fmt))
            m = metas[rank].cpu().tolist()
            try:
                upd = Update(q, plan.client_id, x, y, v, samples=int(m[2]), upper_loss=m[3],
                             compute_s=m[0], peak_mem_bytes=int(m[1])).received(fmt)
            except WireFormatError as exc:
                raise DistError(f"round {q}: the update of rank {rank}: {exc}") from None
            wire = (after[rank].minus(before[rank])
                    if after and before and rank in after and rank in before else None)
            payload = plan_nbytes(plan, fmt)
            out.append(Returned(t, WorkerRound(
                t.name, plan.client_id, plan.ratio, reason=t.reason,
                payload_down_bytes=payload, payload_up_bytes=payload,
                element_bytes=fmt.bytes_per_element,
                message_down_bytes=payload, message_up_bytes=payload + 8 * META_FIELDS,
                wire=wire, compute_s=m[0], receive_s=m[4], upload_s=m[5],
                transfer_s=arrived[rank] - sent_at - m[0], peak_mem_bytes=int(m[1]),
                samples=int(m[2]), upper_loss=m[3]), upd))
        return Exchange(out, self._opened)


def run_coordinator(ctx: Context, out: Path | None, progress: bool = True) -> dict[str, Any]:
    cfg, job = ctx.cfg, ctx.job
    endpoints = _gather_endpoints(ctx, torch.zeros(MAX_ENDPOINTS, 2, dtype=torch.float64))
    counters = RankCounters(endpoints) if ctx.backend == "gloo" else None
    writer = MetricsWriter.for_run(out)

    progress_line = ProgressLine(cfg.rounds)

    def show(rec: dict[str, Any]) -> None:
        if quiet():  # rabo dist -q
            return
        mib = (rec["wire_bytes"] or rec["payload_bytes"]) / 2**20
        print(progress_line(rec) + f"  wire {mib:.1f} MiB", flush=True)

    transport = DistTransport(ctx, counters)
    loop = RoundLoop(job, transport, job.engine.init_state(), writer=writer,
                     progress=show if progress else None)
    start = time.perf_counter()
    try:
        loop.run()
    finally:
        if writer:
            writer.close()
    state, records = loop.state, loop.records
    summary = summarize(cfg, state, records, time.perf_counter() - start,
                        {"transport": transport.name, "world_size": ctx.world,
                         "wire_bytes_total": wire_total(records)}, started_at=ctx.started_at)
    if out:
        checkpoint.save(out, state, {"config": to_dict(cfg)})
        write_json(out / "summary.json", summary)
    return summary


def _wait(work: Any) -> None:
    if work is not None:
        work.wait()


def _gather_endpoints(ctx: Context, mine: torch.Tensor) -> torch.Tensor:
    parts = [torch.zeros(MAX_ENDPOINTS, 2, dtype=torch.float64, device=ctx.comm_device)
             for _ in range(ctx.world)]
    dist.all_gather(parts, mine.to(ctx.comm_device))
    return torch.stack([p.cpu() for p in parts])


def run_worker(ctx: Context, memory_limit: int | None) -> None:
    cfg, job = ctx.cfg, ctx.job
    engine = job.engine
    fmt = engine.hyper.wire
    residuals = ClientResiduals()  # this rank's client's int8 error feedback
    cid = ctx.rank - 1
    store_port = int(os.environ.get("MASTER_PORT", "0"))
    _gather_endpoints(ctx, local_endpoints(store_port) if ctx.backend == "gloo"
                      else torch.zeros(MAX_ENDPOINTS, 2, dtype=torch.float64))
    flops = None
    # the start-up footprint; what the rank holds above it is training state it will reuse,
    # counted back into its budget as the gRPC worker does (worker.client), which also first
    # hands back what building the job freed
    baseline = settled_rss_bytes()
    for q in range(1, cfg.rounds + 1):
        prof = measure(ctx.compute_device, memory_limit, flops_per_s=flops,
                       held_bytes=max(0, rss_bytes() - baseline))
        flops = prof.flops_per_s
        _gather_profiles(ctx, torch.tensor([float(prof.memory_budget_bytes), prof.flops_per_s],
                                           dtype=torch.float64))
        ratios = _broadcast_ratios(ctx, torch.zeros(ctx.world, dtype=torch.float64))
        ratio = float(ratios[ctx.rank])
        if ratio <= 0:
            continue
        plan = engine.plan(q, cid, ratio)
        buf = torch.empty(plan_nbytes(plan, fmt), dtype=torch.uint8, device=ctx.comm_device)
        t0 = time.perf_counter()
        dist.recv(buf, src=0)
        receive_s = time.perf_counter() - t0
        x, y, v = unpack(buf, plan_layouts(plan, fmt))
        assignment = Assignment(q, cid, plan.mask, engine.hyper, x, y, v)
        update = client_step(job.task, assignment, job.data.clients[cid], ctx.compute_device,
                             residuals.of(fmt, cid))
        t0 = time.perf_counter()
        dist.send(pack([update.x, update.y, update.v], ctx.comm_device), dst=0)
        send_s = time.perf_counter() - t0
        peak = peak_above_startup(update.peak_mem_bytes, baseline, ctx.compute_device)
        meta = torch.tensor([update.compute_s, float(peak),
                             float(update.samples), update.upper_loss, receive_s, send_s],
                            dtype=torch.float64, device=ctx.comm_device)
        dist.send(meta, dst=0)


# --------------------------------------------------------------------------- entry


def cmd_dist(args: argparse.Namespace) -> int:
    from rabo.cliargs import load_config
    from rabo.provenance import provenance

    started_at = time.time()
    provenance()  # the checkout as the run starts (edits made while it runs do not count)

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RaboError(f"{key} is not set; launch with torchrun, e.g. "
                            "torchrun --nproc-per-node 3 -m rabo.dist --config FILE")
    try:
        rank, world, local_rank = (int(os.environ[k]) if k in os.environ else 0
                                   for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        bad = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        raise RaboError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {bad}"
                        ) from None
    if world < 2:
        raise RaboError("needs at least 2 processes (rank 0 coordinates)")
    overrides = list(args.overrides)
    args.overrides = [*overrides, f"clients.count={world - 1}"]
    cfg = load_config(args)
    backend = args.backend
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = pick_backend(backend, gpus, os.environ.get("LOCAL_WORLD_SIZE"))
    if backend == "nccl" and not torch.cuda.is_available():
        raise RaboError("--backend nccl needs CUDA; use gloo on CPU")
    if backend == "nccl" and local_rank >= gpus:
        # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): say so up front
        raise RaboError(f"--backend nccl needs one GPU per rank on a node; "
                        f"LOCAL_RANK {local_rank} but this node has {gpus} GPU(s). Start at "
                        f"most {gpus} ranks here, or use --backend gloo (CUDA still computes)")
    try:
        limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    except ValueError as exc:
        raise RaboError(f"--memory-limit: {exc}") from None
    if args.worker_memory_limits:
        try:
            limits = parse_byte_list(args.worker_memory_limits)
        except ValueError as exc:
            raise RaboError(f"--worker-memory-limits: {exc}") from None
        if rank > 0:
            limit = limits[(rank - 1) % len(limits)]
    elif cfg.clients.memory_budgets and rank > 0 and limit is None:
        # as rabo local does: the config's simulated budgets, cycled over the workers, so one
        # config gives the same ratios on every transport
        budgets = cfg.clients.memory_budgets
        limit = parse_bytes(budgets[(rank - 1) % len(budgets)])
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        comm = compute = torch.device("cuda", local_rank)
    else:
        comm = torch.device("cpu")
        # more ranks than GPUs share them round-robin (gloo moves the tensors through host memory)
        try:
            compute = resolve_device(cfg.device, local_rank)
        except ConfigError as exc:  # every rank has the same config: all stop here
            print(f"rabo dist: rank {rank}: error: {exc}", file=sys.stderr)
            return ExitCode.USAGE
    out = None
    if rank == 0 and args.out:
        try:
            out = checkpoint.claim_run_dir(args.out, args.overwrite, resume=None)
        except RaboError as exc:  # the other ranks stop at the rendezvous timeout
            print(f"rabo dist: rank 0: error: {exc}", file=sys.stderr)
            return ExitCode.USAGE
    timeout = timedelta(seconds=args.timeout_s or cfg.cluster.dist_timeout_s)
    where = "coordinator" if rank == 0 else f"worker for client {rank - 1}"
    try:
        dist.init_process_group(backend, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - the rendezvous failed: say where and why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"rabo dist: rank {rank} ({where}): error: cannot join the process group at "
              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
              f"{timeout.total_seconds():.0f}s ({first}); are all {world} ranks started, "
              "with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE?", file=sys.stderr)
        return 1
    try:
        check_same_config(cfg, rank, world, comm)
        ctx = Context(cfg, Job.from_config(cfg), rank, world, backend, comm, compute,
                      started_at)
        if rank == 0:
            print(f"rabo dist: {world - 1} workers over torch.distributed ({backend}); task "
                  f"{cfg.task}, {cfg.algorithm.upper()}, {cfg.rounds} rounds", flush=True)
            summary = run_coordinator(ctx, out)
            print(f"done: test_acc {summary['test_acc']:.4f}, upper_loss "
                  f"{summary['upper_loss']:.4f}, C_x* {summary['C_x_star']}, "
                  f"{summary['wall_s']:.1f}s", flush=True)
            if out is not None:
                from rabo.report import plots_line

                plots = plots_line(out)  # the same run folder as every other transport
                if plots:
                    print(plots, flush=True)
        else:
            run_worker(ctx, limit)
        dist.barrier()
    except Exception as exc:  # noqa: BLE001 - one clear line per rank, then exit non-zero
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # the hint fits the errors of the transport, not e.g. this rank's own out-of-memory
        peer = isinstance(exc, (DistError, dist.DistError)) or "timed out" in msg.lower()
        print(f"rabo dist: rank {rank} ({where}): error: {msg}"
              + (". A peer rank failed, disconnected or timed out; the job stops."
                 if peer else ""), file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def check_same_config(cfg: Config, rank: int, world: int, device: torch.device) -> None:
    """Every rank loads its own --config; on several machines they can differ (a stale copy,
    another seed), which would train a wrong model or hang. The ranks compare a SHA-256 of
    the resolved config (as tensors: no pickled objects cross the wire)."""
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).digest()
    mine = torch.tensor(list(digest), dtype=torch.uint8, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    differ = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
    if differ:
        raise DistError(f"ranks {differ} resolved a different config than rank 0 (same "
                        f"--config file, --set overrides and rounds on every rank?)")


def pick_backend(requested: str, gpus: int, local_world_size: str | None) -> str:
    """``--backend auto``: nccl when every rank on this node can have a GPU of its own, else
    gloo. Every rank must choose the same, so only node-wide facts count: a launcher that does
    not set LOCAL_WORLD_SIZE (torchrun does) gets gloo rather than a guess from this rank's own
    LOCAL_RANK; name --backend explicitly on clusters whose nodes differ."""
    if requested != "auto":
        return requested
    return "nccl" if gpus and local_world_size and gpus >= int(local_world_size) else "gloo"


@record  # torchrun's failure summary then shows a rank's real error, not only its exit code
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rabo.dist",
                                     description="RABO over torch.distributed (rank 0 "
                                                 "coordinates); launch with torchrun")
    add_dist_args(parser)
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="warnings and errors only, no per-round progress lines")
    args = parser.parse_args(argv)
    set_quiet(args.quiet)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return cmd_dist(args)
    except RaboError as exc:
        print(f"rabo dist: error: {exc}", file=sys.stderr)
        # a clear error ends the rank with a status, not a traceback; torchrun's summary
        # reads the message from the error file the elastic agent names
        get_error_handler().record_exception(exc)
        return ExitCode.USAGE


if __name__ == "__main__":
    sys.exit(main())
