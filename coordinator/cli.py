"""``rabo coordinator`` and ``rabo local`` (registered through the rabo.commands entry point)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from rabo.cliargs import (
    PORT,
    add_config_args,
    add_overwrite_arg,
    add_tracking_args,
    check_address,
    int_arg,
    load_config,
    quiet,
)
from rabo.errors import ExitCode

log = logging.getLogger("rabo.coordinator")


def _print_summary(summary: dict[str, Any], out: Path | None,
                   tensorboard: Path | None = None) -> None:
    acc = summary.get("test_acc")
    wire = summary.get("wire_bytes_total")
    print(f"done: {summary['rounds']} rounds, test_acc "
          f"{'-' if acc is None else f'{acc:.4f}'}, upper_loss {summary['upper_loss']:.4f}, "
          f"C_x* {summary['C_x_star']}, wire {0 if wire is None else wire / 2**20:.1f} MiB, "
          f"{summary['wall_s']:.1f}s", flush=True)
    if out is not None:
        from rabo.report import plots_line

        plots = plots_line(out)  # or why there are none: matplotlib is an extra
        print(f"run folder: {out} (metrics.jsonl, summary.json, checkpoint.pt"
              f"{', plots' if plots and plots.startswith('plots:') else ''})")
        if plots:
            print(plots)
    if tensorboard:
        print(f"tensorboard: tensorboard --logdir {tensorboard}")


def grpc_progress(total: int):
    from rabo.runner import ProgressLine

    progress_line = ProgressLine(total)

    def show(rec: dict[str, Any]) -> None:
        if quiet():
            return
        line = progress_line(rec)
        mib = (rec.get("wire_bytes") or rec.get("payload_bytes") or 0) / 2**20
        extra = f"  wire {mib:.1f} MiB"
        if rec.get("left_out"):
            extra += f"  left out: {[w['worker_id'] for w in rec['left_out']]}"
        print(line + extra, flush=True)
    return show


def _security(args: argparse.Namespace):
    from coordinator.server import Security
    from rabo.auth import load_tls, load_tokens

    return Security(tls=load_tls(args.tls_cert, args.tls_key, args.tls_ca),
                    tokens=load_tokens(args.token_file))


def default_run_dir(kind: str, base: Path = Path("runs")) -> Path:
    """A new folder ``runs/<kind>-<UTC time>`` (``-2``, ``-3``... if that one exists)."""
    import datetime

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = base / f"{kind}-{stamp}"
    n = 2
    while path.exists():
        path = base / f"{kind}-{stamp}-{n}"
        n += 1
    return path


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.server import serve
    from rabo import checkpoint, config

    resume_state = None
    out = Path(args.out) if args.out else None
    cfg = None
    if args.resume:
        run_dir = Path(args.resume)
        if checkpoint.has_checkpoint(run_dir):
            resume_state, sidecar, path, skipped = checkpoint.load_latest(run_dir)
            for bad, why in skipped:
                print(f"rabo coordinator: skipping {bad.name}: {why}", file=sys.stderr)
            print(f"rabo coordinator: resuming from {path} (round {resume_state.round})",
                  flush=True)
            if not args.config:
                data = config.apply_overrides(dict(sidecar.get("config") or {}),
                                              args.overrides)
                if args.rounds is not None:
                    data["rounds"] = args.rounds
                cfg = config.from_dict(data)
        elif not args.config:
            print(f"rabo coordinator: error: --resume {run_dir}: no checkpoint there, and no "
                  "--config to start from", file=sys.stderr)
            return ExitCode.USAGE
        else:  # a first start under a supervisor that always passes --resume
            print(f"rabo coordinator: nothing to resume in {run_dir}; starting", flush=True)
        out = out or run_dir
    elif out is not None:
        out = checkpoint.claim_run_dir(out, args.overwrite)
    if cfg is None:
        cfg = load_config(args)
    check_address(args.bind or cfg.cluster.bind, "--bind" if args.bind else "cluster.bind",
                  listen=True)
    if out is None:  # a run's results always land in a folder the user is told of
        out = checkpoint.claim_run_dir(default_run_dir("coordinator"))
        print(f"rabo coordinator: no --out given; the run folder is {out}", flush=True)
    server = serve(cfg, out, bind=args.bind, progress=grpc_progress(cfg.rounds),
                   security=_security(args), resume=resume_state,
                   health_port=args.health_port, metrics_port=args.metrics_port)
    stopping = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        stopping.set()

    # before the line that says we are up: a supervisor (or a test) may signal right after it
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    print(f"rabo coordinator: listening on {args.bind or cfg.cluster.bind} (port {server.port}"
          + (f", health on {server.health_port}" if server.health_port else "")
          + f"), waiting for {cfg.cluster.workers or cfg.clients.count} workers", flush=True)
    done = False
    while not stopping.is_set():
        if not done and server.wait(0.5):
            done = True
            if server.driver.error is not None:
                print(f"rabo coordinator: error: {server.driver.error}", file=sys.stderr)
                server.stop()
                return 1
            if server.driver.summary:
                _print_summary(server.driver.summary, out, args.tensorboard)
            if not args.keep_serving:
                server.stop()
                return 0
            print("rabo coordinator: run complete; serving until stopped (--keep-serving)",
                  flush=True)
        elif done:
            stopping.wait(0.5)
    if done:
        server.stop()
        return 0
    # checkpoint the last completed round, then stop; --resume continues from it
    server.stop(grace=2.0, checkpoint_now=True)
    print("rabo coordinator: stopped by a signal; last completed round "
          f"{server.coord.state.round} checkpointed"
          + (f" in {out} (resume with --resume {out})" if out else ""), flush=True)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the coordinator's health service answers SERVING (Docker HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(args.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"rabo health: {args.address}: {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_local(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before gRPC's core starts logging
    from coordinator.local import run_local

    overrides = [f"cluster.workers={args.workers}"]
    args.overrides = list(args.overrides) + overrides
    cfg = load_config(args)
    if args.workers < 1:
        print("rabo local: error: --workers must be at least 1", file=sys.stderr)
        return ExitCode.USAGE
    if args.workers > cfg.clients.count:
        print(f"rabo local: error: --workers {args.workers} exceeds clients.count "
              f"{cfg.clients.count} (one data partition per worker)", file=sys.stderr)
        return ExitCode.USAGE
    if args.workers < cfg.clients.count:
        idle = list(range(args.workers, cfg.clients.count))
        shown = ", ".join(map(str, idle[:8])) + (", ..." if len(idle) > 8 else "")
        print(f"rabo local: warning: --workers {args.workers} < clients.count "
              f"{cfg.clients.count}: the data partitions of clients {shown} get no worker and "
              f"go untrained (start {cfg.clients.count} workers, or set "
              f"clients.count={args.workers})", file=sys.stderr, flush=True)
    limits = [s.strip() for s in args.worker_memory_limits.split(",") if s.strip()] \
        if args.worker_memory_limits else cfg.clients.memory_budgets
    if args.worker_memory_limits:
        from rabo.units import parse_byte_list

        try:
            parse_byte_list(args.worker_memory_limits)
        except ValueError as exc:
            print(f"rabo local: error: --worker-memory-limits: {exc}", file=sys.stderr)
            return ExitCode.USAGE
    from rabo.checkpoint import claim_run_dir

    out = claim_run_dir(args.out, args.overwrite,
                        resume="`rabo coordinator --resume {dir}` and workers started against "
                               "it (rabo local starts new runs only)")
    print(f"rabo local: coordinator + {args.workers} worker processes on 127.0.0.1; task "
          f"{cfg.task}, {cfg.algorithm.upper()}, {cfg.estimator.name}, {cfg.rounds} rounds"
          + (f", worker memory budgets {', '.join(limits)}" if limits else ""), flush=True)
    try:
        server = run_local(cfg, args.workers, out, limits, grpc_progress(cfg.rounds),
                           threads=args.threads)
    except KeyboardInterrupt:
        from rabo.checkpoint import has_checkpoint

        print("rabo local: interrupted; workers stopped"
              + (f". The last checkpoint is in {out}: continue with `rabo coordinator --resume "
                 f"{out}` and workers started against it (`rabo worker --coordinator ...`)"
                 if has_checkpoint(out) else f"; no round was checkpointed in {out}"),
              file=sys.stderr)
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
    _print_summary(server.driver.summary, out, args.tensorboard)
    return 0


def metrics_port_arg(text: str) -> int:
    """An argparse ``type`` for ``--metrics-port`` (and env RABO_METRICS_PORT): a port, refused
    before the coordinator starts where prometheus-client (an extra) is missing."""
    port: int = int_arg(**PORT, env="RABO_METRICS_PORT")(text)
    if port:
        from coordinator.monitoring import prometheus_missing

        missing = prometheus_missing()
        if missing:
            raise argparse.ArgumentTypeError(f"{missing} (flag or env RABO_METRICS_PORT)")
    return port


def register(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    env = os.environ.get
    p = sub.add_parser("coordinator", help="run the gRPC coordinator")
    add_config_args(p)
    p.add_argument("--bind", metavar="HOST:PORT", default=env("RABO_BIND"),
                   help="listen address (env RABO_BIND; default config cluster.bind)")
    p.add_argument("--out", metavar="DIR",
                   help="run folder (default: a new runs/coordinator-<UTC time> here)")
    add_overwrite_arg(p)
    add_tracking_args(p)
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its newest good checkpoint (config from "
                        "DIR unless --config is given; with --config and no checkpoint in DIR, "
                        "start there: what a supervisor that restarts the pod wants)")
    p.add_argument("--keep-serving", action="store_true",
                   default=os.environ.get("RABO_KEEP_SERVING", "") not in ("", "0"),
                   help="after the last round keep serving (health, and 'finished' to "
                        "workers) until stopped, instead of exiting (env RABO_KEEP_SERVING; "
                        "for Deployments)")
    p.add_argument("--health-port", type=int_arg(**PORT, env="RABO_HEALTH_PORT"),
                   default=env("RABO_HEALTH_PORT"),
                   help="plaintext health-only port (env RABO_HEALTH_PORT)")
    p.add_argument("--metrics-port", type=metrics_port_arg, default=env("RABO_METRICS_PORT"),
                   help="Prometheus /metrics port (env RABO_METRICS_PORT); needs "
                        "pip install 'rabo[metrics]'")
    add_security_args(p, server=True)
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("health", help="check a coordinator's gRPC health service")
    p.add_argument("--address", default="127.0.0.1:50052", metavar="HOST:PORT")
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("local", help="coordinator and N worker processes on 127.0.0.1")
    add_config_args(p)
    p.add_argument("--workers", type=int, required=True, metavar="N")
    p.add_argument("--worker-memory-limits", metavar="SIZES",
                   help="comma-separated training-memory budgets, cycled over workers, e.g. "
                        "8GiB,2GiB,512MiB")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (0: CPUs / workers)")
    p.add_argument("--out", metavar="DIR", required=True, help="run folder")
    add_overwrite_arg(p)
    add_tracking_args(p)
    p.set_defaults(func=cmd_local)


def add_security_args(p: argparse.ArgumentParser, server: bool) -> None:
    """TLS files and the token file; each also from its RABO_* environment variable. There is
    deliberately no flag for the token itself (it would show in ps)."""
    p.add_argument("--token-file", metavar="FILE",
                   help="file of accepted bearer tokens, one per line (env RABO_TOKEN_FILE; "
                        "or the token itself in env RABO_TOKEN)")
    p.add_argument("--tls-cert", metavar="PEM", help="own certificate (env RABO_TLS_CERT)")
    p.add_argument("--tls-key", metavar="PEM", help="own private key (env RABO_TLS_KEY)")
    p.add_argument("--tls-ca", metavar="PEM",
                   help=("CA of the workers' certificates: requires mutual TLS (env RABO_TLS_CA)"
                         if server else "CA that signed the coordinator (env RABO_TLS_CA)"))
