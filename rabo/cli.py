"""The ``rabo`` command line.

Core commands live here; the coordinator and worker packages add theirs (``coordinator``,
``worker``, ``local``, ...) through the ``rabo.commands`` entry-point group, so that ``rabo``
itself never imports gRPC code (see docs/architecture.md, layering). Building the parser
imports neither torch nor gRPC: each command's implementation is imported when it runs
(``rabo.cliargs.lazy``), so ``rabo --help`` is quick. The argparse helpers every command
shares live in ``rabo.cliargs``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from rabo.cliargs import (
    add_config_args,
    add_overwrite_arg,
    add_tracking_args,
    lazy,
    load_config,
    quiet,
)
from rabo.errors import ExitCode, RaboError, exit_codes_help

log = logging.getLogger("rabo")


# --------------------------------------------------------------------------- simulate


def cmd_simulate(args: argparse.Namespace) -> int:
    from rabo.checkpoint import claim_run_dir
    from rabo.runner import ProgressLine, simulate

    cfg = load_config(args)
    out = claim_run_dir(args.out, args.overwrite, resume=None) if args.out else None
    print(f"rabo simulate: task {cfg.task}, {cfg.algorithm.upper()}, estimator "
          f"{cfg.estimator.name}, {cfg.clients.count} clients, {cfg.rounds} rounds, "
          f"data {cfg.data.dataset} ({cfg.data.split})", flush=True)
    line = ProgressLine(cfg.rounds)
    result = simulate(cfg, out, progress=None if quiet() else
                      lambda r: print(line(r), flush=True))
    s = result.summary
    print(f"done: test_acc {s['test_acc']:.4f}  upper_loss {s['upper_loss']:.4f}  "
          f"C_x* {s['C_x_star']}  ({s['wall_s']:.1f}s)")
    if out is not None:
        from rabo.report import plots_line

        plots = plots_line(out)  # every transport leaves the same run folder
        made = ", plots" if plots and plots.startswith("plots:") else ""
        print(f"run folder: {out} (metrics.jsonl, summary.json{made})")
        if plots:
            print(plots)
    if args.tensorboard:
        print(f"tensorboard: tensorboard --logdir {args.tensorboard}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from rabo import config

    if args.markdown:
        print(config.markdown(), end="")
        return 0
    if args.init:
        target = Path(args.init)
        if target.exists() and not args.force:
            print(f"rabo config: error: {target} exists; pass --force to replace it",
                  file=sys.stderr)
            return ExitCode.USAGE
        cfg = load_config(args)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(config.starter_yaml(cfg))
        print(f"rabo config: wrote {target}; run it with rabo simulate --config {target} "
              f"or rabo local --config {target} --workers {cfg.clients.count}")
        return 0
    if args.config or args.overrides:
        cfg = load_config(args)
        print(json.dumps(config.to_dict(cfg), indent=2))
        return 0
    for key, tp, default, help_ in config.describe():
        print(f"{key:34} {tp:40} {default:18} {help_}")
    return 0


def needs_plots(command: str, func: Callable[[argparse.Namespace], int]
                ) -> Callable[[argparse.Namespace], int]:
    """``func``, refused before it does any work where matplotlib (an extra) is missing: for
    the commands that exist to plot (``rabo report``, ``rabo experiment ...``)."""
    def run(args: argparse.Namespace) -> int:
        from rabo.experiments.plots import matplotlib_missing

        missing = matplotlib_missing()
        if missing:
            print(f"rabo {command}: error: {missing}", file=sys.stderr)
            return ExitCode.USAGE
        return func(args)

    run.__name__ = getattr(func, "__name__", command)
    return run


def cmd_report(args: argparse.Namespace) -> int:
    from rabo import report as rep

    try:
        runs = rep.load_runs(args.dirs)
    except FileNotFoundError as exc:
        print(f"rabo report: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if len(runs) == 1 and not args.out:
        print(rep.report(args.dirs[0]))
    else:
        out = Path(args.out or "rabo-report")
        print(rep.compare_table(runs))
        paths = rep.write_compare_plots(runs, out)
        print("plots: " + ", ".join(str(p) for p in paths))
    if args.csv:
        print(f"metrics: {rep.write_csv(runs, args.csv)}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    try:
        from rabo.certs import write_bundle
    except RaboError as exc:  # rabo.certs.CertsUnavailable: its extra is not installed
        print(f"rabo certs: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        out = write_bundle(args.out, workers=args.workers, hosts=args.hosts, days=args.days,
                           force=args.force)
    except FileExistsError as exc:
        print(f"rabo certs: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"wrote a development CA, a coordinator certificate, {args.workers} worker "
          f"certificates and a token to {out}")
    print(f"coordinator: --tls-cert {out}/coordinator.crt --tls-key {out}/coordinator.key "
          f"--tls-ca {out}/ca.crt --token-file {out}/token")
    print(f"worker i:    --tls-ca {out}/ca.crt --tls-cert {out}/worker-i.crt "
          f"--tls-key {out}/worker-i.key --token-file {out}/token")
    return 0


# --------------------------------------------------------------------------- parser


class VersionAction(argparse.Action):
    """``--version``, computed when asked for (it imports torch; ``rabo --help`` does not)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from rabo.provenance import version_text

        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rabo", description="Resource-adaptive distributed bilevel optimization (RABO)",
        epilog=exit_codes_help(), formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="warnings and errors only, no per-round progress lines")
    parser.add_argument("--version", action=VersionAction,
                        help="the version, git commit and torch build, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("simulate", help="in-process run over simulated clients")
    add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="run folder (metrics.jsonl, summary.json)")
    add_overwrite_arg(p)
    add_tracking_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("config", help="show the config schema, or a resolved config")
    add_config_args(p, rounds=False)
    p.add_argument("--markdown", action="store_true", help="the schema as docs/config.md")
    p.add_argument("--init", metavar="FILE",
                   help="write a starter config (the defaults, or --config/--set applied), "
                        "every key with its help as a comment")
    p.add_argument("--force", action="store_true", help="with --init: replace FILE")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("certs", help="make a development CA, coordinator and worker certs")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--workers", type=int, default=4, help="worker certificates to make")
    p.add_argument("--hosts", nargs="*", default=[],
                   help="extra DNS names / IPs for the coordinator certificate")
    p.add_argument("--days", type=float, default=365.0, help="validity")
    p.add_argument("--force", action="store_true",
                   help="replace a CA already in --out (what it signed stops verifying)")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("report", help="run folders as tables and plots; several side by side")
    p.add_argument("dirs", metavar="RUN", nargs="+",
                   help="run folders holding metrics.jsonl; one: its table, plots in it; "
                        "several: their final figures side by side and overlaid plots")
    p.add_argument("--out", metavar="DIR",
                   help="where the comparison plots go (default: rabo-report/ here)")
    p.add_argument("--csv", metavar="FILE",
                   help="also write every run's per-round figures to FILE as CSV")
    p.set_defaults(func=needs_plots("report", cmd_report))

    from rabo.experiments.cli import add_experiment_args, cmd_experiment

    p = sub.add_parser("experiment", help="experiments on the paper's claims; their report")
    add_experiment_args(p)
    p.set_defaults(func=needs_plots("experiment", cmd_experiment))  # report too: it replots

    from rabo.distcli import add_dist_args

    p = sub.add_parser("dist", help="run over torch.distributed (launch with torchrun)")
    add_dist_args(p)
    p.set_defaults(func=lazy("rabo.dist", "cmd_dist"))

    # the benches (bench/) and the gRPC commands (coordinator/, worker/) register themselves
    # through the rabo.commands entry points, so this module imports none of them
    bench = sub.add_parser("bench", help="benchmarks that print measured ratios")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    for ep in entry_points(group="rabo.commands"):
        try:
            register = ep.load()
        except ImportError as exc:  # a plugin whose dependencies are missing
            log.debug("rabo command plugin %s unavailable: %s", ep.name, exc)
            continue
        register(sub, bsub)
    _polish_subcommands(sub)
    return parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless it has none or says it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (action.option_strings and "default" not in text.lower()
                and default is not None and default is not False and default != []
                and default != "" and default is not argparse.SUPPRESS
                and not isinstance(action, argparse._HelpAction)):
            text += " (default: %(default)s)"
        return text


def _polish_subcommands(sub: argparse._SubParsersAction) -> None:
    """-v and -q after any subcommand too (``rabo simulate -v``), at every level of nesting;
    SUPPRESS keeps a subcommand that was not given them from resetting the top level's. Every
    subcommand's help also shows each option's default (:class:`HelpFormatter`)."""
    seen: set[int] = set()
    stack = [sub]
    while stack:
        action = stack.pop()
        for p in action.choices.values():
            if id(p) in seen:
                continue
            seen.add(id(p))
            p.formatter_class = HelpFormatter
            for a in p._actions:  # an option without help text still shows its default
                if a.help is None and a.option_strings and a.default not in (None, ""):
                    a.help = "default: %(default)s"
            taken = {s for a in p._actions for s in a.option_strings}
            if "-v" not in taken and "--verbose" not in taken:
                p.add_argument("-v", "--verbose", action="store_true",
                               default=argparse.SUPPRESS, help="debug logging")
            if "-q" not in taken and "--quiet" not in taken:
                p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                               help="warnings and errors only, no per-round progress lines")
            stack.extend(a for a in p._actions if isinstance(a, argparse._SubParsersAction))


def main(argv: Sequence[str] | None = None) -> int:
    from rabo.tracking import use_tensorboard

    use_tensorboard(None)  # a second main() in one process (tests) starts from none
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v and -q exclude each other")
    from rabo.cliargs import set_quiet

    set_quiet(args.quiet)
    logging.basicConfig(level=logging.DEBUG if args.verbose else
                        logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rabo.runtime import enable_stack_dumps

    enable_stack_dumps()
    try:
        return int(args.func(args) or 0)
    except RaboError as exc:
        print(f"rabo: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        print("rabo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # a socket's broken pipe (a dead peer) is a real error
        # the reader went away (``rabo config | head``): stop quietly, as a tool killed by
        # SIGPIPE would, and keep the interpreter's final flush from printing a traceback
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # SIGPIPE


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
