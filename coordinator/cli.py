"""``rabo coordinator`` and ``rabo local`` (registered through the rabo.commands entry point)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from rabo.cli import add_config_args, load_config
from rabo.runner import format_progress

log = logging.getLogger("rabo.coordinator")


def _print_summary(summary: dict[str, Any], out: Path | None) -> None:
    acc = summary.get("test_acc")
    wire = summary.get("wire_bytes_total")
    print(f"done: {summary['rounds']} rounds, test_acc "
          f"{'-' if acc is None else f'{acc:.4f}'}, upper_loss {summary['upper_loss']:.4f}, "
          f"C_x* {summary['C_x_star']}, wire {0 if wire is None else wire / 2**20:.1f} MiB, "
          f"{summary['wall_s']:.1f}s", flush=True)
    if out is not None:
        print(f"run folder: {out} (metrics.jsonl, summary.json, checkpoint.pt, plots)")


def grpc_progress(total: int):
    def show(rec: dict[str, Any]) -> None:
        line = format_progress(rec, total)
        mib = (rec.get("wire_bytes") or rec.get("payload_bytes") or 0) / 2**20
        extra = f"  wire {mib:.1f} MiB"
        if rec.get("left_out"):
            extra += f"  left out: {[w['worker_id'] for w in rec['left_out']]}"
        print(line + extra, flush=True)
    return show


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.server import serve

    cfg = load_config(args)
    out = Path(args.out) if args.out else None
    server = serve(cfg, out, bind=args.bind, progress=grpc_progress(cfg.rounds))
    print(f"rabo coordinator: listening on {args.bind or cfg.cluster.bind} (port {server.port}),"
          f" waiting for {cfg.cluster.workers or cfg.clients.count} workers", flush=True)
    stopping = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        stopping.set()
        server.driver.finish(f"coordinator stopped by signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not server.wait(0.5):
        pass
    server.stop()
    if server.driver.error is not None and not stopping.is_set():
        print(f"rabo coordinator: error: {server.driver.error}", file=sys.stderr)
        return 1
    if server.driver.summary:
        _print_summary(server.driver.summary, out)
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before gRPC's core starts logging
    from coordinator.local import run_local
    from rabo.report import write_plots

    overrides = [f"cluster.workers={args.workers}"]
    args.overrides = list(args.overrides) + overrides
    cfg = load_config(args)
    if args.workers > cfg.clients.count:
        print(f"rabo local: error: --workers {args.workers} exceeds clients.count "
              f"{cfg.clients.count} (one data partition per worker)", file=sys.stderr)
        return 2
    limits = [s.strip() for s in args.worker_memory_limits.split(",")] \
        if args.worker_memory_limits else cfg.clients.memory_budgets
    if limits:
        from rabo.units import parse_bytes

        for s in limits:
            try:
                parse_bytes(s)
            except ValueError as exc:
                print(f"rabo local: error: --worker-memory-limits: {exc}", file=sys.stderr)
                return 2
    out = Path(args.out)
    print(f"rabo local: coordinator + {args.workers} worker processes on 127.0.0.1; task "
          f"{cfg.task}, {cfg.algorithm.upper()}, {cfg.estimator.name}, {cfg.rounds} rounds"
          + (f", worker memory budgets {', '.join(limits)}" if limits else ""), flush=True)
    try:
        server = run_local(cfg, args.workers, out, limits, grpc_progress(cfg.rounds),
                           threads=args.threads)
    except KeyboardInterrupt:
        print("rabo local: interrupted; workers stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - reported with its message
        print(f"rabo local: error: {exc}", file=sys.stderr)
        return 1
    first = server.driver.records[0] if server.driver.records else None
    if first:
        print("ratios chosen in round 1 (from each worker's memory budget):")
        for w in first["clients"]:
            print(f"  client {w['client_id']}: ratio {w['ratio']:g}  ({w['reason']})")
        for wid, why in first.get("not_assigned", {}).items():
            print(f"  worker {wid}: {why}")
    plots = write_plots(out)
    _print_summary(server.driver.summary, out)
    if plots:
        print("plots: " + ", ".join(str(p) for p in plots))
    return 0


def register(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coordinator", help="run the gRPC coordinator")
    add_config_args(p)
    p.add_argument("--bind", metavar="HOST:PORT", help="listen address (config cluster.bind)")
    p.add_argument("--out", metavar="DIR", help="run folder")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("local", help="coordinator and N worker processes on 127.0.0.1")
    add_config_args(p)
    p.add_argument("--workers", type=int, required=True, metavar="N")
    p.add_argument("--worker-memory-limits", metavar="SIZES",
                   help="comma-separated training-memory budgets, cycled over workers, e.g. "
                        "8GiB,2GiB,512MiB")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (0: CPUs / workers)")
    p.add_argument("--out", metavar="DIR", required=True, help="run folder")
    p.set_defaults(func=cmd_local)

    from coordinator.bench import (
        add_compare_args,
        add_transport_args,
        cmd_bench_transport,
        cmd_compare_transports,
    )

    p = bench_sub.add_parser("transport", help="round trip of a P-parameter model, no compute")
    add_transport_args(p)
    p.set_defaults(func=cmd_bench_transport)

    p = bench_sub.add_parser("compare-transports", help="the same job over gRPC and gloo")
    add_compare_args(p)
    p.set_defaults(func=cmd_compare_transports)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2)
