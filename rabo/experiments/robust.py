"""``rabo experiment robust``: what robust aggregation costs honest runs.

``aggregation.clip_rms`` (norm clipping, after the "clipped" aggregation rules of the robust
federated learning literature, e.g. Sun et al., "Can You Really Backdoor Federated Learning?")
scales each update part down to at most ``c`` times the round's median RMS of that part before
coverage averaging. It bounds what one worker can do within the magnitude check; on honest
clients it can only lose accuracy, by clipping the larger updates of some clients (the small
clients' hypergradients on few coordinates, the clients with more skewed data). This
experiment measures that loss at convergence: RABO with and without clipping, three data
settings of task A (iid, Dirichlet label skew, shards), three seeds, 300 rounds.

Verdict rule (per setting and ``c``): the cost is mean(RABO) - mean(RABO clipped) in final
test accuracy; it is *no measurable cost* when the cost is at most the larger of the two seed
standard deviations, else *costs N points*. The default (off or on) follows from it in
docs/reliability.md.

This module owns its section of docs/RESULTS.md (:func:`section`); the report calls it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rabo.experiments import common
from rabo.experiments import grid as g
from rabo.experiments.common import TIERS, cost_against, group, stats
from rabo.experiments.grid import Grid

NAME = "robust"
CLIPS = (3.0, 1.5)  # clip_rms values measured
METHODS: dict[str, tuple[str, ...]] = {
    "RABO": (),
    **{f"RABO, clip_rms {c:g}": (f"aggregation.clip_rms={c:g}",) for c in CLIPS},
}
SETTINGS = (("mnist", "iid"), ("mnist", "dirichlet"), ("digits", "shards"))
PRESETS: dict[str, dict[str, Any]] = {
    "reduced": {"seeds": (0, 1, 2), "rounds": 300, "settings": SETTINGS,
                "extra": ("eval_every=10",)},
    "full": {"seeds": (0, 1, 2, 3, 4), "rounds": 500,
             "settings": tuple((d, s) for d in ("mnist", "digits", "mnist1d")
                               for s in ("iid", "dirichlet", "shards")),
             "extra": ("eval_every=10",)},
    "tiny": {"seeds": (0, 1), "rounds": 3, "settings": (("digits", "iid"),),
             "extra": ("model.hidden=[16]", "clients.count=4", "data.batch_size=32")},
}


def grid(preset: str) -> Grid:
    """Task A x (dataset, split) settings x methods x seeds."""
    p = PRESETS[preset]
    return Grid((g.tasks(("A",)), g.settings(p["settings"]), g.axis("method", METHODS, METHODS),
                 g.seeds(p["seeds"])), extra=(f"rounds={p['rounds']}", *p["extra"]), tiers=TIERS)


def build_specs(preset: str) -> list[common.RunSpec]:
    return g.specs(grid(preset))


def run(preset: str, out: Path, jobs: int,
        store: common.RunStore | None = None) -> dict[str, Any]:
    p = PRESETS[preset]
    return common.run_experiment(
        NAME, preset, build_specs(preset), jobs, ("A",),
        {"seeds": list(p["seeds"]), "rounds": p["rounds"],
         "methods": {m: list(v) for m, v in METHODS.items()},
         "settings": [list(s) for s in p["settings"]], "tier_ratios": list(TIERS),
         "extra_overrides": list(p["extra"]), "jobs": jobs,
         "grids": g.describe(grid(preset))},
        store=store)


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (dataset, split, method): final test accuracy over seeds, and how many update
    parts were clipped per round."""
    out = []
    for (ds, split, method), runs in sorted(group(data["runs"], "dataset", "split",
                                                  "method").items()):
        out.append({"dataset": ds, "split": split, "method": method, "seeds": len(runs),
                    "test_acc": stats(r["final"]["test_acc"] for r in runs),
                    "clipped_per_round": stats(r["final"].get("clipped_parts_per_round")
                                               for r in runs)})
    return out


def verdicts(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting and clipping method: its cost against plain RABO (rule in the module
    docstring)."""
    table = {(r["dataset"], r["split"], r["method"]): r for r in rows(data)}
    out = []
    for (ds, split, method), r in sorted(table.items()):
        base = table.get((ds, split, "RABO"))
        if method == "RABO" or base is None:
            continue
        measured = cost_against(base["test_acc"], r["test_acc"])
        if measured is None:
            continue
        cost, spread = measured
        out.append({"setting": f"A/{ds}/{split}", "method": method, "cost": cost,
                    "spread": spread, "measurable": cost > spread})
    return out


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    return []  # the table says it all: final accuracies of three methods


def section(data: dict[str, Any], rel: str) -> tuple[str, list[dict[str, str]]]:
    """The docs/RESULTS.md section and its headline rows."""
    from rabo.experiments.markdown import pct, produced_by, table

    lines = [
        "## 6. Robust aggregation: the cost of norm clipping on honest clients",
        "",
        produced_by(data) + " Not part of `make bench` (which already runs past its "
        "40-minute budget): run `rabo experiment robust` and then `rabo experiment report`.",
        "",
        "RABO (task A, ratios 1, 1/2, 1/4, 1/8, the claims setting) with and without "
        "`aggregation.clip_rms` (each update part scaled down to at most c times the round's "
        f"median RMS of that part), {data['settings']['rounds']} rounds, seeds "
        f"{data['settings']['seeds']}. Verdict rule: the cost is mean(RABO) - mean(clipped) "
        "in final test accuracy; *no measurable cost* when it is at most the larger seed "
        "standard deviation.",
        "",
    ]
    body = []
    for r in rows(data):
        body.append([f"A/{r['dataset']}/{r['split']}", r["method"], pct(r["test_acc"]),
                     f"{r['clipped_per_round']['mean']:.1f}"
                     if r["clipped_per_round"]["mean"] is not None else "-"])
    lines += [table(["setting", "method", "final test acc (mean ± std)",
                     "update parts clipped per round"], body), ""]
    vs = verdicts(data)
    vrows = [[v["setting"], v["method"], f"{100 * v['cost']:+.1f}", f"{100 * v['spread']:.1f}",
              f"costs {100 * v['cost']:.1f} points" if v["measurable"]
              else "no measurable cost"] for v in vs]
    lines += [table(["setting", "method", "cost (points)", "larger std (points)", "verdict"],
                    vrows), ""]
    costly = [v for v in vs if v["measurable"]]
    lower = [v for v in vs if v["cost"] > 0]
    if vs:
        lo, hi = min(v["cost"] for v in vs), max(v["cost"] for v in vs)
        lines += [f"Of {len(vs)} (setting, c) pairs, {len(costly)} cost more than the seed "
                  f"noise; the clipped mean is lower in {len(lower)} (cost "
                  f"{100 * lo:+.1f} to {100 * hi:+.1f} points).", ""]
    heads = [{"claim": "norm clipping (`aggregation.clip_rms`) costs honest clients no more "
                       "than seed noise",
              "verdict": f"{len(vs) - len(costly)} of {len(vs)} within noise; mean lower in "
                         f"{len(lower)} of {len(vs)}",
              "evidence": "section 6: " + ", ".join(
                  f"{v['setting']} {v['method'].split(', ')[1]}: {100 * v['cost']:+.1f}"
                  for v in vs)}] if vs else []
    return "\n".join(lines), heads
