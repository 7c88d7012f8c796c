"""``rabo dist`` / ``torchrun -m rabo.dist``: the flags (the run itself is ``rabo.dist``, which
imports torch.distributed; the parser must not)."""

from __future__ import annotations

import argparse
import os

from rabo.cliargs import (
    add_config_args,
    add_overwrite_arg,
    add_tracking_args,
    int_arg,
    seconds_arg,
)


def add_dist_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="run folder (written by rank 0)")
    add_overwrite_arg(p)
    add_tracking_args(p)  # rank 0 logs
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="auto: nccl where this node has a GPU for each of its ranks, else gloo")
    p.add_argument("--memory-limit", default=os.environ.get("RABO_MEMORY_LIMIT"),
                   metavar="SIZE", help="this rank's training-memory budget (env "
                                        "RABO_MEMORY_LIMIT; default: cgroup / available)")
    p.add_argument("--worker-memory-limits", default=os.environ.get("RABO_WORKER_MEMORY_LIMITS"),
                   metavar="SIZES",
                   help="comma-separated budgets cycled over the worker ranks by client id "
                        "(rank 1 is client 0), e.g. 96MiB,40MiB: heterogeneous workers on one "
                        "machine, as `rabo local --worker-memory-limits`; overrides "
                        "--memory-limit (env RABO_WORKER_MEMORY_LIMITS)")
    p.add_argument("--threads", type=int_arg(0, env="RABO_THREADS"),
                   default=os.environ.get("RABO_THREADS", "0"),
                   help="torch CPU threads per rank (0: torch's default; env RABO_THREADS)")
    p.add_argument("--timeout-s", type=seconds_arg, default=0.0,
                   help="collective / send / recv timeout (0: cluster.dist_timeout_s)")
