"""``rabo experiment <group> [--full] [--out DIR] [--jobs N]`` and ``rabo experiment report``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rabo.experiments import common

# "all" runs what make bench regenerates; the ablations and the robustness experiment are
# run on their own (make ablations), to keep make bench within its 40 minutes
BENCH_GROUPS = ("claims", "estimators", "coverage", "communication")
GROUPS = (*BENCH_GROUPS, "ablations", "robust", "models", "wire")


def _module(name: str) -> Any:
    import importlib

    return importlib.import_module(f"rabo.experiments.{name}")


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=[*GROUPS, "all", "report"],
                   help="an experiment group; 'all': those make bench runs ("
                        + ", ".join(BENCH_GROUPS) + "); 'report': RESULTS.md from the JSON "
                        "files")
    p.add_argument("--full", action="store_true",
                   help="the whole grid (hours); default: the reduced variant of make bench")
    p.add_argument("--quick", action="store_true",
                   help="a smoke-sized grid (seconds; what the test suite runs): checks the "
                        "pipeline, measures nothing")
    p.add_argument("--preset", choices=["reduced", "full", "tiny"], default=None,
                   help=argparse.SUPPRESS)  # tiny = --quick
    p.add_argument("--out", metavar="DIR", default=str(common.RESULTS_DIR),
                   help="results folder: JSON and PNG files (default docs/results)")
    p.add_argument("--report", metavar="FILE", default=None,
                   help="report: the markdown file to write (default: RESULTS.md next to the "
                        "results folder)")
    p.add_argument("--store", metavar="DIR", default=str(common.DEFAULT_STORE),
                   help="keep each finished simulation here, keyed by its resolved config and "
                        "a hash of the library's source: a stopped grid resumes without "
                        "redoing finished runs, and experiments share identical runs "
                        "(default %(default)s)")
    p.add_argument("--no-store", action="store_true",
                   help="run every simulation afresh and keep nothing")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="simulations run side by side, one torch thread each (default: "
                        "min(2, CPUs))")


def run_group(name: str, preset: str, out: Path, jobs: int,
              store: common.RunStore | None = None) -> Path:
    mod = _module(name)
    data = mod.run(preset, out, jobs, store)
    path = common.write_results(out, data)
    plots = mod.plot(data, out) if hasattr(mod, "plot") else []  # a table may say it all
    print(f"rabo experiment {name}: wrote {path}"
          + (f" and {len(plots)} plot(s)" if plots else "") + f" in {data['wall_s']:.0f}s",
          flush=True)
    return path


def cmd_experiment(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.name == "report":
        from rabo.experiments.report import write_report

        target = Path(args.report) if args.report else out.parent / "RESULTS.md"
        path = write_report(out, target)
        print(f"rabo experiment report: wrote {path} from the JSON files in {out}")
        return 0
    from rabo.provenance import provenance

    provenance()  # the commit and local changes as the grid starts (rabo.experiments.common)
    preset = args.preset or ("tiny" if args.quick else "full" if args.full else "reduced")
    names = BENCH_GROUPS if args.name == "all" else (args.name,)
    store = None if args.no_store else common.RunStore(Path(args.store))
    t0 = time.perf_counter()
    for name in names:
        run_group(name, preset, out, max(1, args.jobs), store)
    if len(names) > 1:
        print(f"rabo experiment all: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0
