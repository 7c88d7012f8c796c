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

Saved runs (``--out FILE``) are read back without measuring again (a point's measurement
does not depend on the estimate: every point's ratio is pinned): ``--score FILE...`` scores
them against the current estimate, ``--fit FILE...`` fits the estimate's calibrated constants
to them (``fit_constants``).

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

# the rule's band, shared with docs/RESULTS.md's section
from rabo.experiments.calibration import HIGH, LOW

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
    p.add_argument("--score", nargs="+", metavar="FILE", default=None,
                   help="measure nothing: score these saved runs (--out) against the current "
                        "estimate")
    p.add_argument("--fit", nargs="+", metavar="FILE", default=None,
                   help="measure nothing: fit the estimate's constants to these saved runs "
                        "(the widest margin below 1.0 with every point at or above "
                        f"{LOW}) and print them")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="also write the JSON result to FILE")


def _point_job(task: str, model: str, estimator: str, ratio: float, rounds: int,
               dataset: str) -> Any:
    """The resolved config of one point's job and its :class:`rabo.job.Job`."""
    from rabo import config
    from rabo.job import Job

    # aggregation.max_update_rms=0: memory is what is measured here, and an estimator that
    # diverges on a workload (the Neumann series on the CNN with these step sizes: RMS 143 at
    # round 2) holds the same tensors; the bound would refuse its updates and end the job
    overrides = [f"data.dataset={dataset}", *MODELS[model], f"estimator.name={estimator}",
                 "clients.count=1", f"clients.ratios=[{ratio}]", f"rounds={rounds}",
                 f"eval_every={rounds}", "aggregation.max_update_rms=0"]
    cfg = config.load(REPO / "configs" / "experiments" / f"task-{task.lower()}.yaml", overrides)
    return cfg, Job.from_config(cfg)


def measure_point(task: str, model: str, estimator: str, ratio: float, rounds: int,
                  dataset: str = "mnist") -> dict[str, Any]:
    """One short job with one real worker at ``ratio``; its reported peaks and the estimate."""
    from coordinator.local import run_local
    from rabo.policy import estimate_memory

    cfg, job = _point_job(task, model, estimator, ratio, rounds, dataset)
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


def load_runs(files: list[str]) -> list[dict[str, Any]]:
    """The points of saved runs (``--out``), one per workload and ratio, with the smallest and
    the largest of its measured peaks over the runs and the estimate's parts there
    (:func:`rabo.policy.memory_terms`)."""
    from rabo.policy import memory_terms

    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for name in files:
        try:
            run = json.loads(Path(name).read_text())
            dataset = PRESETS[run["preset"]]["dataset"]
            points = run["points"]
            for pt in points:
                key = (pt["task"], pt["model"], pt["estimator"], float(pt["ratio"]))
                if key[1] not in MODELS:
                    raise ValueError(f"model {key[1]!r} is not one of the bench's")
                m = int(pt["measured_bytes"])
                if key not in merged:
                    merged[key] = {"task": key[0], "model": key[1], "estimator": key[2],
                                   "ratio": key[3], "dataset": dataset, "low": m, "high": m,
                                   "runs": 1}
                else:
                    e = merged[key]
                    e["low"], e["high"] = min(e["low"], m), max(e["high"], m)
                    e["runs"] += 1
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"rabo bench policy: {name}: not a saved run of this bench ({e})"
                             ) from e
    for pt in merged.values():
        _, job = _point_job(pt["task"], pt["model"], pt["estimator"], pt["ratio"], 1,
                            pt["dataset"])
        pt["terms"] = memory_terms(job.task, job.hyper, pt["ratio"], job.step_batch(0))
    return list(merged.values())


# constants counted from the code rather than fitted (docs/method.md section 6): a worker holds
# its received slices, its previous update and the transport's copies whatever the fit says
HELD = ("TRANSPORT_PAYLOAD_COPIES",)


def fit_constants(points: list[dict[str, Any]], low: float = LOW) -> dict[str, Any]:
    """The estimate's constants that keep every point's measured / estimate at or above
    ``low`` (its smallest measured peak) and as far below 1.0 as these terms allow (its largest
    peak): a linear program over the constants (the estimate is linear in them), which
    maximises h with estimate >= h x largest peak. Constants in :data:`HELD` keep their value.
    Returns the constants, the band reached (``high`` = 1 / h) and whether it was feasible."""
    import numpy as np
    from scipy.optimize import linprog

    from rabo.policy import memory_constants

    current = memory_constants()
    free = sorted({k for pt in points for k, b in pt["terms"].items()
                   if k != "counted" and k not in HELD and b})
    mib = float(2**20)
    # in MiB: a *_BYTES constant's variable is MiB (its term is 1), a count's term MiB per copy
    scale = [1.0 if k.endswith("_BYTES") else 1.0 / mib for k in free]
    t = np.array([[pt["terms"].get(k, 0.0) * f for k, f in zip(free, scale, strict=True)]
                  for pt in points])
    base = np.array([(pt["terms"]["counted"]
                      + sum(current[k] * pt["terms"].get(k, 0.0) for k in HELD)) / mib
                     for pt in points])
    lo_m = np.array([pt["low"] for pt in points]) / mib
    hi_m = np.array([pt["high"] for pt in points]) / mib
    # variables: the free constants (MiB or counts), then h; minimise -h
    n = len(free)
    a_ub = np.vstack([np.hstack([t, np.zeros((len(points), 1))]),       # est <= low peak / low
                      np.hstack([-t, hi_m[:, None]])])                 # h x high peak <= est
    b_ub = np.concatenate([lo_m / low - base, base])
    cost = np.zeros(n + 1)
    cost[-1] = -1.0
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=[(0, None)] * n + [(0, None)],
                  method="highs")
    if res.status != 0 or res.x[-1] <= 0:
        return {"feasible": False, "message": str(res.message), "low": low}
    # the widest margin leaves the constants that bind no point free; among those within
    # 0.1% of it, the smallest estimates (each point's relative to its peak): the largest
    # submodels the margin allows
    h = res.x[-1] * 0.999
    res2 = linprog((t / hi_m[:, None]).sum(axis=0), A_ub=a_ub[:, :n],
                   b_ub=np.concatenate([lo_m / low - base, base - h * hi_m]),
                   bounds=[(0, None)] * n, method="highs")
    x = res2.x if res2.status == 0 else res.x[:n]
    constants = dict(current)
    for k, v in zip(free, x, strict=True):
        constants[k] = float(v * mib) if k.endswith("_BYTES") else float(v)
    return {"feasible": True, "low": low, "high": 1.0 / h, "fitted": free,
            "constants": constants}


def _score_table(points: list[dict[str, Any]], constants: dict[str, float] | None) -> None:
    from rabo.policy import memory_from_terms

    vals = []
    inside = 0
    print(f"{'workload':32s} {'estimator':10s} {'ratio':>6s} {'measured MiB':>17s} "
          f"{'estimate MiB':>13s} {'meas/est':>11s}")
    for pt in points:
        est = memory_from_terms(pt["terms"], constants)
        lo, hi = pt["low"] / est, pt["high"] / est
        vals += [lo, hi]
        inside += lo >= LOW and hi <= HIGH
        flag = "" if lo >= LOW and hi <= HIGH else ("  ABOVE" if hi > HIGH else "  low")
        span = f"{pt['low'] / 2**20:.1f}-{pt['high'] / 2**20:.1f}"
        print(f"{pt['task'] + '/' + pt['model']:32s} {pt['estimator']:10s} {pt['ratio']:6g} "
              f"{span:>17s} {est / 2**20:13.1f} {lo:5.2f}-{hi:.2f}{flag}")
    print(f"measured / estimate from {min(vals):.2f} to {max(vals):.2f}; inside [{LOW}, {HIGH}]"
          f" at {inside} of {len(points)} points (every run's peak)")


def cmd_score_or_fit(args: argparse.Namespace) -> int:
    points = load_runs(args.fit or args.score)
    if args.score:
        _score_table(points, None)
        return 0
    fit = fit_constants(points)
    if args.json:
        print(json.dumps(fit, indent=1))
        return 0
    if not fit["feasible"]:
        print(f"no constants keep every point at or above {LOW}: {fit['message']}")
        return 1
    print(f"fitted to {len(points)} points: measured / estimate from {fit['low']:.3f} to "
          f"{fit['high']:.3f} at best")
    for k in fit["fitted"]:
        v = fit["constants"][k]
        print(f"  {k:40s} {v / 2**20:8.3f} MiB" if k.endswith("_BYTES") else
              f"  {k:40s} {v:8.3f}")
    _score_table(points, fit["constants"])
    if fit["high"] > HIGH:
        print(f"    MISS no constants keep every point inside [{LOW}, {HIGH}]: the runs' peaks "
              "differ more than the band allows, or these terms do not follow them")
    return 0


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

    return {"preset": preset,
            "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "selection": {k: list(p[k]) if isinstance(p[k], tuple) else p[k]
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
    if args.fit or args.score:
        return cmd_score_or_fit(args)
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
