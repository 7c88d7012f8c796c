"""Argparse helpers shared by every ``rabo`` command (and ``python -m worker`` /
``torchrun -m rabo.dist``). Nothing here imports torch or gRPC: building a parser must stay
quick (``rabo --help``)."""

from __future__ import annotations

import argparse
import importlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rabo.errors import RaboError


def lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command function that imports ``module`` only when the command runs."""
    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), function)(args) or 0)

    run.__name__ = function
    return run


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


def tensorboard_arg(text: str) -> Path | None:
    """An argparse ``type`` for ``--tensorboard DIR`` (and env RABO_TENSORBOARD; empty: off):
    refuses the flag where TensorBoard is not installed, before the run starts, and tells
    :mod:`rabo.tracking` to log there. It does so as the flag is parsed (argparse converts the
    flag, or else the variable, once per parse) so that the flag reaches the run's metrics
    writer whichever entry point parsed it (``rabo``, ``python -m rabo.dist``) and wherever
    the transport builds that writer."""
    from rabo import tracking

    if not text:
        tracking.use_tensorboard(None)
        return None
    missing = tracking.tensorboard_missing()
    if missing:
        raise argparse.ArgumentTypeError(f"{missing} (flag or env RABO_TENSORBOARD)")
    tracking.use_tensorboard(text)
    return Path(text)


def add_tracking_args(p: argparse.ArgumentParser) -> None:
    """``--tensorboard DIR``, for every command that runs rounds."""
    p.add_argument("--tensorboard", metavar="DIR", type=tensorboard_arg,
                   default=os.environ.get("RABO_TENSORBOARD"),
                   help="also log each round's scalars (round/*: accuracy, losses, time, "
                        "bytes, coverage; client/<id>/*: ratio, bytes, compute, memory) for "
                        "TensorBoard in DIR; a resumed run continues there. Needs "
                        "pip install 'rabo[tracking]' (env RABO_TENSORBOARD; default: off)")


_QUIET = False


def set_quiet(value: bool) -> None:
    """``-q``: commands print no per-round progress lines (the final result still)."""
    global _QUIET
    _QUIET = bool(value)


def quiet() -> bool:
    return _QUIET


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
