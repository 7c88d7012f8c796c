"""``rabo bench policy``: the ratio policy's memory estimate against what real workers use.

For every workload (task A and B, MLP and CNN, every estimator) and every ratio of the ladder,
a real coordinator (this process) runs a short job with one real gRPC worker process
(``python -m worker``, pinned to that ratio through ``clients.ratios``). The worker reports,
with every update, its peak resident set above its start-up footprint during the round (what
``policy.calibrate`` uses and what a memory budget is counted against): the received slices,
the transport's buffers and the step's own tensors. The bench prints the largest of those
peaks over the job's rounds next to ``rabo.policy.estimate_memory`` and their ratio.

Subsets (to measure one part again): ``--tasks A,B``, ``--models mlp,cnn`` (a prefix of a
model's name), ``--estimators fd-central,exact`` and ``--ratios 1,0.125`` keep only those of
the preset's points; ``--rounds N`` overrides the preset's rounds per point.

Rule (the policy issue's target): measured / estimate between 0.75 and 1.0 at every point; an
estimate below the measurement is the worse error (a worker given more than it can hold is
OOM-killed), one far above it gives workers smaller submodels than they could train.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LADDER = (1.0, 0.5, 0.25, 0.125)
ESTIMATORS = ("fd-central", "fd-forward", "exact", "neumann")
MODELS = {
    "mlp 784-1024-1024-10": ["model.hidden=[1024, 1024]"],
    "cnn 32-64": ["model.kind=cnn", "model.hidden=[]", "model.channels=[32, 64]"],
}
PRESETS: dict[str, dict[str, Any]] = {
    "reduced": {"tasks": ("A", "B"), "models": tuple(MODELS), "estimators": ESTIMATORS,
                "ladder": LADDER, "rounds": 3, "dataset": "mnist"},
    # what the test suite runs: scikit-learn's digits, which every machine has
    "tiny": {"tasks": ("A",), "models": ("mlp 784-1024-1024-10",),
             "estimators": ("fd-central",), "ladder": (1.0, 0.25), "rounds": 2,
             "dataset": "digits"},
}
LOW, HIGH = 0.75, 1.0


def add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="reduced",
                   help="reduced: 2 tasks x 2 models x 4 estimators x 4 ratios on MNIST "
                        "(default); tiny: two points on digits (what the test suite runs)")
    p.add_argument("--tasks", default=None, metavar="A,B",
                   help="only these tasks of the preset (comma-separated)")
    p.add_argument("--models", default=None, metavar="mlp,cnn",
                   help="only the preset's models whose name starts with one of these")
    p.add_argument("--estimators", default=None, metavar="NAME,...",
                   help="only these estimators of the preset (comma-separated)")
    p.add_argument("--ratios", default=None, metavar="1,0.5,...",
                   help="only these ratios of the preset's ladder (comma-separated)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds per point (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="also write the JSON result to FILE")


def measure_point(task: str, model: str, estimator: str, ratio: float, rounds: int,
                  dataset: str = "mnist") -> dict[str, Any]:
    """One short job with one real worker at ``ratio``; its reported peaks and the estimate."""
    from coordinator.local import run_local
    from rabo import config
    from rabo.job import Job
    from rabo.policy import estimate_memory

    # aggregation.max_update_rms=0: memory is what is measured here, and an estimator that
    # diverges on a workload (the Neumann series on the CNN with these step sizes: RMS 143 at
    # round 2) holds the same tensors; the bound would refuse its updates and end the job
    overrides = [f"data.dataset={dataset}", *MODELS[model], f"estimator.name={estimator}",
                 "clients.count=1", f"clients.ratios=[{ratio}]", f"rounds={rounds}",
                 f"eval_every={rounds}", "aggregation.max_update_rms=0"]
    cfg = config.load(REPO / "configs" / "experiments" / f"task-{task.lower()}.yaml", overrides)
    job = Job.from_config(cfg)
    batch = job.step_batch(0)
    estimate = estimate_memory(job.task, job.hyper, ratio, batch)
    with tempfile.TemporaryDirectory(prefix="rabo-bench-policy-") as tmp:
        server = run_local(cfg, 1, Path(tmp), threads=max(1, (os.cpu_count() or 1) // 2))
        records = server.driver.records
    peaks = [c["peak_mem_bytes"] for r in records for c in r["clients"]
             if c.get("peak_mem_bytes")]
    if not peaks:
        raise RuntimeError(f"{task}/{model} {estimator} r={ratio:g}: the worker reported no "
                           "peak (not Linux, or /proc unavailable)")
    peak = max(peaks)
    return {"task": task, "model": model, "estimator": estimator, "ratio": ratio,
            "batch": batch, "rounds": len(records), "peaks_bytes": peaks,
            "measured_bytes": peak, "estimate_bytes": estimate,
            "measured_vs_estimate": peak / estimate}


def _subset(preset: dict[str, Any], tasks: str | None = None, models: str | None = None,
            estimators: str | None = None, ratios: str | None = None,
            rounds: int | None = None) -> dict[str, Any]:
    """The preset ``preset`` restricted to the named tasks, models, estimators and ratios."""
    def names(arg: str | None) -> list[str] | None:
        return None if arg is None else [a.strip() for a in arg.split(",") if a.strip()]

    p = dict(preset)
    if (t := names(tasks)) is not None:
        p["tasks"] = tuple(x for x in p["tasks"] if x.lower() in {a.lower() for a in t})
    if (m := names(models)) is not None:
        p["models"] = tuple(x for x in p["models"] if any(x.startswith(a) for a in m))
    if (e := names(estimators)) is not None:
        p["estimators"] = tuple(x for x in p["estimators"] if x in e)
    if (r := names(ratios)) is not None:
        wanted = [float(a) for a in r]
        p["ladder"] = tuple(x for x in p["ladder"] if any(abs(x - w) < 1e-9 for w in wanted))
    if rounds is not None:
        p["rounds"] = rounds
    for key in ("tasks", "models", "estimators", "ladder"):
        if not p[key]:
            raise SystemExit(f"rabo bench policy: no {key} of the preset left to measure")
    return p


def run_policy(preset: str, **subset: Any) -> dict[str, Any]:
    p = _subset(PRESETS[preset], **subset)
    points = []
    t0 = time.perf_counter()
    for task in p["tasks"]:
        for model in p["models"]:
            for estimator in p["estimators"]:
                for ratio in p["ladder"]:
                    pt = measure_point(task, model, estimator, ratio, p["rounds"],
                                       p["dataset"])
                    points.append(pt)
                    print(f"  {task}/{model} {estimator:10s} r={ratio:<6g} measured "
                          f"{pt['measured_bytes'] / 2**20:8.1f} MiB, estimate "
                          f"{pt['estimate_bytes'] / 2**20:8.1f} MiB: "
                          f"{pt['measured_vs_estimate']:.2f}", file=sys.stderr, flush=True)
    ratios = [pt["measured_vs_estimate"] for pt in points]
    inside = sum(1 for v in ratios if LOW <= v <= HIGH)
    from rabo.provenance import provenance

    return {"preset": preset, "selection": {k: list(p[k]) if isinstance(p[k], tuple) else p[k]
                                            for k in ("tasks", "models", "estimators",
                                                      "ladder", "rounds")},
            "points": points, "wall_s": time.perf_counter() - t0,
            "provenance": provenance(),
            "rule": f"{LOW} <= measured / estimate <= {HIGH} at every point",
            "min": min(ratios), "max": max(ratios), "median": statistics.median(ratios),
            "inside": inside, "above": sum(1 for v in ratios if v > HIGH),
            "count": len(ratios)}


def cmd_bench_policy(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    result = run_policy(args.preset, tasks=args.tasks, models=args.models,
                        estimators=args.estimators, ratios=args.ratios, rounds=args.rounds)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{'workload':32s} {'estimator':10s} {'ratio':>6s} {'measured MiB':>13s} "
          f"{'estimate MiB':>13s} {'meas/est':>9s}")
    for pt in result["points"]:
        v = pt["measured_vs_estimate"]
        flag = "" if LOW <= v <= HIGH else ("  ABOVE" if v > HIGH else "  low")
        print(f"{pt['task'] + '/' + pt['model']:32s} {pt['estimator']:10s} {pt['ratio']:6g} "
              f"{pt['measured_bytes'] / 2**20:13.1f} {pt['estimate_bytes'] / 2**20:13.1f} "
              f"{v:9.2f}{flag}")
    met = result["inside"] == result["count"]
    print(f"measured / estimate from {result['min']:.2f} to {result['max']:.2f} (median "
          f"{result['median']:.2f}); inside [{LOW}, {HIGH}] at {result['inside']} of "
          f"{result['count']} points, above {HIGH} at {result['above']}")
    print(f"    {'met ' if met else 'MISS'} {result['rule']}")
    return 0
