"""``rabo worker``: join a coordinator and work until the run is over.

Every flag has an environment variable equivalent (for containers): RABO_COORDINATOR,
RABO_MEMORY_LIMIT, RABO_DEVICE, RABO_THREADS, RABO_CLIENT_ID, RABO_WORKER_NAME.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from rabo.cliargs import check_address, int_arg
from rabo.errors import ExitCode, exit_codes_help
from rabo.units import parse_bytes


def add_worker_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--coordinator", default=env("RABO_COORDINATOR"), metavar="HOST:PORT",
                   help="coordinator address (env RABO_COORDINATOR)")
    p.add_argument("--memory-limit", default=env("RABO_MEMORY_LIMIT"), metavar="SIZE",
                   help="memory this worker may spend on training state, e.g. 2GiB "
                        "(env RABO_MEMORY_LIMIT; default: cgroup limit, else available memory)")
    p.add_argument("--device", default=env("RABO_DEVICE", "auto"),
                   help="auto, cpu, cuda or cuda:N (env RABO_DEVICE)")
    p.add_argument("--threads", type=int_arg(0, env="RABO_THREADS"),
                   default=env("RABO_THREADS", "0"),
                   help="torch CPU threads (0: torch's default; env RABO_THREADS)")
    p.add_argument("--client-id", type=int_arg(-1, env="RABO_CLIENT_ID"),
                   default=env("RABO_CLIENT_ID", "-1"),
                   help="data partition to ask for (-1: any free one; env RABO_CLIENT_ID)")
    p.add_argument("--name", default=env("RABO_WORKER_NAME", socket.gethostname()),
                   help="a name for logs (env RABO_WORKER_NAME)")
    p.add_argument("--state-file", metavar="FILE", default=env("RABO_WORKER_STATE"),
                   help="keep this worker's instance secret here, so that after a restart of "
                        "the worker, too, the coordinator gives it back its client slot "
                        "(env RABO_WORKER_STATE; default: a new secret per process, which "
                        "survives coordinator restarts)")
    p.add_argument("--poll-s", type=float, default=5.0, help="long-poll length")
    p.add_argument("--give-up-s", type=float, default=0.0,
                   help="exit after this long without reaching the coordinator (0: never)")
    p.add_argument("--token-file", metavar="FILE",
                   help="bearer token file (env RABO_TOKEN_FILE, or the token in RABO_TOKEN)")
    p.add_argument("--tls-ca", metavar="PEM", help="CA that signed the coordinator's "
                                                   "certificate: enables TLS (env RABO_TLS_CA)")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS "
                                                     "(env RABO_TLS_CERT)")
    p.add_argument("--tls-key", metavar="PEM", help="client key (env RABO_TLS_KEY)")
    p.add_argument("--tls-server-name", default=env("RABO_TLS_SERVER_NAME"),
                   help="name to expect in the coordinator's certificate (env "
                        "RABO_TLS_SERVER_NAME)")
    p.add_argument("--on-finish", choices=["exit", "idle"], default=env("RABO_ON_FINISH", "exit"),
                   help="when the run is over: exit, or idle until stopped (env "
                        "RABO_ON_FINISH; idle suits Deployments, which restart exited pods)")
    p.add_argument("--step-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.client import Worker, WorkerExit, WorkerOptions

    if not args.coordinator:
        print("rabo worker: error: --coordinator HOST:PORT (or RABO_COORDINATOR) is required",
              file=sys.stderr)
        return ExitCode.USAGE
    from rabo.auth import load_tls, load_tokens
    from rabo.errors import ConfigError, RaboError

    try:
        check_address(args.coordinator, "--coordinator")
        limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    except ValueError as exc:
        print(f"rabo worker: error: --memory-limit: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except RaboError as exc:
        print(f"rabo worker: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE

    try:
        tls = load_tls(args.tls_cert, args.tls_key, args.tls_ca)
        tokens = load_tokens(args.token_file)
    except ConfigError as exc:
        print(f"rabo worker: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    opts = WorkerOptions(target=args.coordinator, name=args.name, memory_limit=limit,
                         device=args.device, threads=args.threads, client_id=args.client_id,
                         poll_s=args.poll_s, give_up_s=args.give_up_s, tls=tls,
                         token=tokens[0] if tokens else None,
                         server_name=args.tls_server_name, step_delay_s=args.step_delay_s,
                         state_file=args.state_file)
    try:
        worker = Worker(opts)
    except WorkerExit as exc:
        print(f"rabo worker: error: {exc}", file=sys.stderr)
        return exc.code
    worker.install_signal_handlers()
    code = worker.run()
    if code == 0 and args.on_finish == "idle" and worker.finished:
        logging.getLogger("rabo.worker").info("run finished; idling until stopped "
                                              "(--on-finish idle)")
        worker.stop.wait()
    return code


def register(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="join a coordinator as a worker",
                       epilog=exit_codes_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_args(p)
    p.set_defaults(func=cmd_worker)


def main(argv: list[str] | None = None) -> int:
    from rabo.runtime import die_with_parent, enable_stack_dumps

    die_with_parent()
    enable_stack_dumps()
    parser = argparse.ArgumentParser(prog="rabo worker", epilog=exit_codes_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_args(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cmd_worker(args)
