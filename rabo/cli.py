"""The ``rabo`` command line.

Core commands live here; the coordinator and worker packages add theirs (``coordinator``,
``worker``, ``local``, ...) through the ``rabo.commands`` entry-point group, so that ``rabo``
itself never imports gRPC code (see docs/architecture.md, layering).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from rabo.errors import RaboError

log = logging.getLogger("rabo")


def int_arg(lo: int | None = None, hi: int | None = None, env: str | None = None
            ) -> Any:
    """An argparse ``type`` for integers in [lo, hi]. With ``env``, the flag's default comes
    from that environment variable as text, so a bad value is reported by argparse only for
    the command that uses it, naming the flag and the variable (not a traceback at start-up
    of every command)."""
    def convert(text: str) -> int:
        where = f" (flag or env {env})" if env else ""
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer{where}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = (f"{lo}..{hi}" if lo is not None and hi is not None
                      else f">= {lo}" if lo is not None else f"<= {hi}")
            raise argparse.ArgumentTypeError(f"{value} is out of range: {bounds}{where}")
        return value
    convert.__name__ = "integer"
    return convert


def seconds_arg(text: str) -> float:
    """An argparse ``type`` for a duration: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number >= 0")
    return value


PORT = {"lo": 0, "hi": 65535}


def check_address(text: str, what: str, listen: bool = False) -> str:
    """HOST:PORT with a port in 1..65535 (0 too when ``listen``: any free port; IPv6 hosts in
    brackets); the error names ``what``."""
    lo = 0 if listen else 1
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not lo <= int(port) <= 65535:
        raise RaboError(f"{what} {text!r}: expected HOST:PORT with a port in {lo}..65535")
    return text


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (refused otherwise)")


def add_config_args(p: argparse.ArgumentParser, rounds: bool = True) -> None:
    """--config FILE, --set KEY=VALUE (repeatable) and --rounds R."""
    p.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config key, e.g. --set estimator.name=exact (repeatable)")
    if rounds:
        p.add_argument("--rounds", type=int, metavar="R", help="override config 'rounds'")


def load_config(args: argparse.Namespace) -> Any:
    from rabo import config

    overrides = list(args.overrides)
    if getattr(args, "rounds", None) is not None:
        overrides.append(f"rounds={args.rounds}")
    return config.load(args.config, overrides)


# --------------------------------------------------------------------------- simulate


def cmd_simulate(args: argparse.Namespace) -> int:
    from rabo.checkpoint import claim_run_dir
    from rabo.runner import format_progress, simulate

    cfg = load_config(args)
    out = claim_run_dir(args.out, args.overwrite) if args.out else None
    print(f"rabo simulate: task {cfg.task}, {cfg.algorithm.upper()}, estimator "
          f"{cfg.estimator.name}, {cfg.clients.count} clients, {cfg.rounds} rounds, "
          f"data {cfg.data.dataset} ({cfg.data.split})", flush=True)
    result = simulate(cfg, out, progress=lambda r: print(format_progress(r, cfg.rounds),
                                                         flush=True))
    s = result.summary
    print(f"done: test_acc {s['test_acc']:.4f}  upper_loss {s['upper_loss']:.4f}  "
          f"C_x* {s['C_x_star']}  ({s['wall_s']:.1f}s)")
    if out is not None:
        print(f"run folder: {out} (metrics.jsonl, summary.json)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from rabo import config

    if args.markdown:
        print(config.markdown(), end="")
        return 0
    if args.config or args.overrides:
        cfg = load_config(args)
        print(json.dumps(config.to_dict(cfg), indent=2))
        return 0
    for key, tp, default, help_ in config.describe():
        print(f"{key:34} {tp:40} {default:18} {help_}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rabo.report import report

    try:
        print(report(args.dir))
    except FileNotFoundError:
        print(f"rabo report: error: {args.dir} has no metrics.jsonl", file=sys.stderr)
        return 2
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from rabo.certs import write_bundle

    out = write_bundle(args.out, workers=args.workers, hosts=args.hosts, days=args.days)
    print(f"wrote a development CA, a coordinator certificate, {args.workers} worker "
          f"certificates and a token to {out}")
    print(f"coordinator: --tls-cert {out}/coordinator.crt --tls-key {out}/coordinator.key "
          f"--tls-ca {out}/ca.crt --token-file {out}/token")
    print(f"worker i:    --tls-ca {out}/ca.crt --tls-cert {out}/worker-i.crt "
          f"--tls-key {out}/worker-i.key --token-file {out}/token")
    return 0


def cmd_bench_estimator(args: argparse.Namespace) -> int:
    from rabo.bench.estimator import main as bench_main

    return bench_main(args)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rabo", description="Resource-adaptive distributed bilevel optimization (RABO)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("simulate", help="in-process run over simulated clients")
    add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="run folder (metrics.jsonl, summary.json)")
    add_overwrite_arg(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("config", help="show the config schema, or a resolved config")
    add_config_args(p, rounds=False)
    p.add_argument("--markdown", action="store_true", help="the schema as docs/config.md")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("certs", help="make a development CA, coordinator and worker certs")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--workers", type=int, default=4, help="worker certificates to make")
    p.add_argument("--hosts", nargs="*", default=[],
                   help="extra DNS names / IPs for the coordinator certificate")
    p.add_argument("--days", type=float, default=365.0, help="validity")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("report", help="a run folder as a table and PNG plots")
    p.add_argument("dir", metavar="DIR", help="run folder holding metrics.jsonl")
    p.set_defaults(func=cmd_report)

    from rabo.experiments.cli import add_experiment_args, cmd_experiment

    p = sub.add_parser("experiment", help="experiments on the paper's claims; their report")
    add_experiment_args(p)
    p.set_defaults(func=cmd_experiment)

    from rabo.dist import add_dist_args, cmd_dist

    p = sub.add_parser("dist", help="run over torch.distributed (launch with torchrun)")
    add_dist_args(p)
    p.set_defaults(func=cmd_dist)

    bench = sub.add_parser("bench", help="benchmarks that print measured ratios")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    from rabo.bench.estimator import add_arguments as add_estimator_args

    p = bsub.add_parser("estimator", help="estimator accuracy, time and memory vs exact")
    add_estimator_args(p)
    p.set_defaults(func=cmd_bench_estimator)

    for ep in entry_points(group="rabo.commands"):
        try:
            register = ep.load()
        except ImportError as exc:  # a plugin whose dependencies are missing
            log.debug("rabo command plugin %s unavailable: %s", ep.name, exc)
            continue
        register(sub, bsub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rabo.runtime import enable_stack_dumps

    enable_stack_dumps()
    try:
        return int(args.func(args) or 0)
    except RaboError as exc:
        print(f"rabo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rabo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
