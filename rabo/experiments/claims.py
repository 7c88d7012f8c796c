"""``rabo experiment claims``: resource-adaptive RABO and RAFBO against the full model, the
exclusion baseline and each mask policy, on tasks A and B, three data sets, iid and non-iid.

Clients are heterogeneous: their simulated memory budgets (``clients.memory_budgets``, derived
from ``rabo.policy.estimate_memory``) make the ratio policy pick 1, 1/2, 1/4, 1/8 (cycled over
10 clients: 3, 3, 2, 2 clients). ``full`` puts every client at ratio 1 (upper bound),
``exclusion`` keeps only the clients that fit ratio 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rabo.experiments import common
from rabo.experiments import grid as g
from rabo.experiments.common import (
    DATASET_OVERRIDES,
    SPLIT_OVERRIDES,
    TIERS,
    RunSpec,
    cumulative,
    group,
    mean_curve,
    stats,
)
from rabo.experiments.grid import Grid
from rabo.experiments.markdown import (
    image,
    mean_of,
    pct,
    pct1,
    produced_by,
    ratios_str,
    settings_line,
    table,
    verdict_word,
)

NAME = "claims"
METHODS: dict[str, tuple[str, ...]] = {
    "RABO": (),  # the task configs: rolling masks tied to the width, see configs/experiments
    "RAFBO": ("algorithm=rafbo", "outer.local_steps=2", "outer.lr=0.02"),
    "full": ("clients.mode=full",),
    "exclusion": ("clients.mode=exclusion",),
    # control: the upper level switched off (x stays at its initialisation)
    "RABO, x frozen": ("outer.lr=1.0e-9",),
    # mask policies and scalers against RABO's own setting
    "RABO static": ("mask.policy=static",),
    "RABO random": ("mask.policy=random",),
    "RABO rolling, stride 1": ("mask.policy=rolling", "mask.rolling_stride=1"),  # FedRolex's
    "RABO no scaler": ("model.scaler=none",),
    "RABO static, no scaler": ("mask.policy=static", "model.scaler=none"),  # the old default
    "RABO + forward scaler": ("model.scaler=forward",),
    # label skew that follows client size: each client weighs 1/ratio on what it covers
    "RABO inverse-ratio weighting": ("aggregation.weighting=inverse-ratio",),
}
CORE = ("RABO", "RAFBO", "full", "exclusion")
BASELINES = ("RABO", "full", "exclusion")
CONTROLS = ("RABO, x frozen",)
MASKS = ("RABO static", "RABO random", "RABO rolling, stride 1")
MASKS_SCALER = ("RABO no scaler", "RABO static, no scaler", "RABO + forward scaler")
SKEW = ("RABO inverse-ratio weighting",)
# Targets of the method (issue 10): final accuracy of the full-width global model, RABO's gap
# to the full model at most this many points, by split
GAP_TARGET = {"iid": 0.01, "dirichlet": 0.03, "shards": 0.08}
EVAL_EVERY = ("eval_every=10",)  # curves at 10-round resolution (round 20 = "early" included)


@dataclass(frozen=True)
class Block:
    datasets: tuple[str, ...]
    splits: tuple[str, ...]
    methods: tuple[str, ...]
    tasks: tuple[str, ...] = ("A", "B")


@dataclass(frozen=True)
class Preset:
    blocks: tuple[Block, ...]
    seeds: tuple[int, ...]
    rounds: int
    extra: tuple[str, ...] = ()  # overrides on every run (tiny models for tests)


PRESETS = {
    # At convergence: 300 rounds (full's validation accuracy is flat from about round 200 on
    # MNIST; see the curves), 3 seeds. The mask, scaler and weighting ablations and the
    # x-frozen control are ``rabo experiment ablations`` (rabo/experiments/ablations.py).
    "reduced": Preset(
        blocks=(Block(("mnist", "digits", "mnist1d"), ("iid",), BASELINES),
                Block(("mnist",), ("dirichlet",), BASELINES, ("A",)),
                Block(("digits",), ("shards",), BASELINES, ("A",)),
                Block(("mnist",), ("iid",), ("RAFBO",), ("A",))),
        seeds=(0, 1, 2), rounds=300, extra=EVAL_EVERY),
    "full": Preset(
        blocks=(Block(("mnist", "digits", "mnist1d"), ("iid", "shards", "dirichlet"), CORE),),
        seeds=(0, 1, 2, 3, 4), rounds=500, extra=EVAL_EVERY),
    "tiny": Preset(
        blocks=(Block(("digits",), ("iid",), CORE),),
        seeds=(0, 1), rounds=3,
        extra=("model.hidden=[16]", "clients.count=4", "data.batch_size=32")),
}


def grids(preset: str, presets: dict[str, Preset] | None = None) -> list[Grid]:
    """The preset as grids: per block, tasks x datasets x splits x methods x seeds."""
    p = (presets or PRESETS)[preset]
    return [Grid((g.tasks(b.tasks), g.datasets(b.datasets), g.splits(b.splits),
                  g.axis("method", b.methods, METHODS), g.seeds(p.seeds)),
                 extra=(f"rounds={p.rounds}", *p.extra), tiers=TIERS)
            for b in p.blocks]


def build_specs(preset: str, presets: dict[str, Preset] | None = None) -> list[RunSpec]:
    """Every run of the preset. A method whose resolved config equals one already listed for
    the same setting and seed is left out, so nothing runs twice."""
    return g.specs(*grids(preset, presets), dedupe=True)


def run(preset: str, out: Path, jobs: int, store: common.RunStore | None = None,
        name: str = NAME, presets: dict[str, Preset] | None = None) -> dict[str, Any]:
    p = (presets or PRESETS)[preset]
    return common.run_experiment(
        name, preset, build_specs(preset, presets), jobs, ("A", "B"),
        {"seeds": list(p.seeds), "rounds": p.rounds,
         "methods": {m: list(METHODS[m]) for m in METHODS},
         "dataset_overrides": {k: list(v) for k, v in DATASET_OVERRIDES.items()},
         "split_overrides": {k: list(v) for k, v in SPLIT_OVERRIDES.items()},
         "tier_ratios": list(TIERS), "extra_overrides": list(p.extra), "jobs": jobs,
         "grids": g.describe(*grids(preset, presets))},
        store=store)


# --------------------------------------------------------------------------- analysis


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, dataset, split, method): statistics over seeds."""
    out = []
    for (task, ds, split, method), runs in sorted(
            group(data["runs"], "task", "dataset", "split", "method").items(),
            key=lambda kv: (kv[0][0], _setting_order((kv[0][1], kv[0][2])),
                            _method_order(kv[0][3]))):
        rounds = len(runs[0]["curve"]["round"])
        out.append({
            "task": task, "dataset": ds, "split": split, "method": method,
            "seeds": len(runs),
            "ratios": runs[0]["ratios"],
            "test_acc": stats(r["final"]["test_acc"] for r in runs),
            "best_test_acc": stats(r["final"]["best_test_acc"] for r in runs),
            "early_test_acc": stats(r["final"].get("early_test_acc") for r in runs),
            "upper_loss": stats(r["final"]["upper_loss"] for r in runs),
            "client_upper_loss": stats(r["final"].get("client_upper_loss") for r in runs),
            "test_acc_per_class": _mean_lists([r["final"].get("test_acc_per_class")
                                               for r in runs]),
            "test_acc_per_width": _mean_dicts([r["final"].get("test_acc_per_width")
                                               for r in runs]),
            "C_x_star": stats(r["final"]["C_x_star"] for r in runs),
            "payload_mib_per_round": stats(r["final"]["payload_bytes_per_round"] / 2**20
                                           for r in runs),
            "compute_s_per_round": stats(r["final"]["compute_s_total"] / rounds for r in runs),
            "x_rel_change": stats(r["final"]["x_rel_change"] for r in runs),
        })
    return out


def _mean_lists(rows: list[list[float | None] | None]) -> list[float | None] | None:
    """Element-wise mean over seeds (None entries skipped); None if no run has the list."""
    known = [r for r in rows if r]
    if not known:
        return None
    out: list[float | None] = []
    for values in zip(*known, strict=False):
        vals = [v for v in values if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def _mean_dicts(rows: list[dict[str, float] | None]) -> dict[str, float] | None:
    known = [r for r in rows if r]
    if not known:
        return None
    return {k: sum(r[k] for r in known) / len(known) for k in known[0]
            if all(k in r for r in known)}


def _mask_label(data: dict[str, Any], task: str) -> str:
    """'rolling, consistent scaler' and the like: RABO's own mask and scaler in ``task``."""
    for cfg in data.get("base_configs", {}).values():
        if cfg.get("task") == task:
            scaler = cfg["model"]["scaler"]
            return (f"{cfg['mask']['policy']}, "
                    f"{'no scaler' if scaler in ('none', False) else scaler + ' scaler'}")
    return "config"


def _setting_order(c: tuple[str, str]) -> tuple[int, int]:
    """mnist, digits, mnist1d; iid, shards, dirichlet."""
    ds = ("mnist", "digits", "mnist1d")
    splits = ("iid", "shards", "dirichlet")
    return (ds.index(c[0]) if c[0] in ds else len(ds),
            splits.index(c[1]) if c[1] in splits else len(splits))


def _method_order(m: str) -> int:
    order = list(METHODS)
    return order.index(m) if m in order else len(order)


def verdicts(data: dict[str, Any]) -> dict[str, Any]:
    """Per setting (task, dataset, split): RABO against full, exclusion and RAFBO."""
    table = {(r["task"], r["dataset"], r["split"], r["method"]): r for r in rows(data)}
    settings = sorted({k[:3] for k in table})
    close, beats, rafbo, upper = [], [], [], []
    for s in settings:
        rabo = table.get((*s, "RABO"))
        if rabo is None or rabo["test_acc"]["mean"] is None:
            continue
        ra = rabo["test_acc"]
        full = table.get((*s, "full"))
        if full and full["test_acc"]["mean"] is not None:
            gap = full["test_acc"]["mean"] - ra["mean"]
            target = GAP_TARGET.get(s[2], 0.01)
            close.append({"setting": "/".join(s), "gap": gap, "target": target,
                          "ok": gap <= target})
        excl = table.get((*s, "exclusion"))
        if excl and excl["test_acc"]["mean"] is not None:
            diff = ra["mean"] - excl["test_acc"]["mean"]
            spread = max(ra["std"] or 0.0, excl["test_acc"]["std"] or 0.0)
            beats.append({"setting": "/".join(s), "diff": diff, "spread": spread,
                          "ok": diff > spread})
        fz = table.get((*s, "RABO, x frozen"))
        if fz and fz["test_acc"]["mean"] is not None:
            d = ra["mean"] - fz["test_acc"]["mean"]
            spread = max(ra["std"] or 0.0, fz["test_acc"]["std"] or 0.0)
            upper.append({"setting": "/".join(s), "diff": d, "spread": spread,
                          "ok": d > spread})
        rf = table.get((*s, "RAFBO"))
        if rf and rf["test_acc"]["mean"] is not None:
            d = rf["test_acc"]["mean"] - ra["mean"]
            rafbo.append({"setting": "/".join(s), "diff": d, "ok": abs(d) <= 0.02})
    return {"close_to_full": close, "beats_exclusion": beats, "rafbo_vs_rabo": rafbo,
            "upper_level_helps": upper}


# --------------------------------------------------------------------------- plots


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    from rabo.experiments.plots import band, color, pyplot, save

    plt = pyplot()
    paths = []
    runs = data["runs"]
    prefix = data["experiment"]  # claims, or ablations (which reuses this module)
    by = group(runs, "task", "dataset", "split", "method")
    tasks = sorted({r["labels"]["task"] for r in runs})
    # (1) curves of the core methods, one figure per task, one row per (dataset, split)
    for task in tasks:
        if not any(k[0] == task and k[3] in CORE and k[3] != "RABO" for k in by):
            continue  # RABO alone: the final-accuracy and mask figures show it
        combos = sorted({(k[1], k[2]) for k in by if k[0] == task and k[3] == "RABO"},
                        key=_setting_order)
        combos = [c for c in combos if c[0] == combos[0][0]][:3] if combos else []
        if not combos:
            continue
        fig, axes = plt.subplots(len(combos), 4, figsize=(16, 3.4 * len(combos)),
                                 squeeze=False)
        for row, (ds, split) in enumerate(combos):
            for i, method in enumerate(CORE):
                rs = by.get((task, ds, split, method))
                if not rs:
                    continue
                c = color(method, i)
                rounds = rs[0]["curve"]["round"]
                acc_m, acc_s = mean_curve(rs, "test_acc")
                up_m, up_s = mean_curve(rs, "upper_loss")
                mib = [b / 2**20 for b in cumulative(rs[0]["curve"]["payload_bytes"])]
                comp = [sum(v) / len(rs) for v in zip(*(cumulative(r["curve"]["compute_s_sum"])
                                                        for r in rs), strict=False)]
                band(axes[row][0], rounds, acc_m, acc_s, method, c)
                band(axes[row][1], rounds, up_m, up_s, method, c)
                band(axes[row][2], mib, acc_m, acc_s, method, c)
                band(axes[row][3], comp, acc_m, acc_s, method, c)
            titles = ("test accuracy", "upper-level loss (global model, validation)",
                      "test accuracy", "test accuracy")
            xlabels = ("round", "round", "cumulative payload MiB (tensor bytes, no wire)",
                       "cumulative worker compute s (sum over clients)")
            for j in range(4):
                ax = axes[row][j]
                ax.set_title(f"task {task}, {ds} {split}: {titles[j]}", fontsize=9)
                ax.set_xlabel(xlabels[j], fontsize=8)
                ax.grid(alpha=0.3)
            axes[row][1].set_yscale("log")
            axes[row][2].set_xscale("log")
            axes[row][0].legend(fontsize=7)
        paths.append(save(fig, out / f"{prefix}_curves_{task}.png"))
    # (2) final accuracy per setting and method, one figure per task
    for task in tasks:
        settings = sorted({(k[1], k[2]) for k in by if k[0] == task}, key=_setting_order)
        methods = [m for m in METHODS if any(k[0] == task and k[3] == m for k in by)]
        if not settings:
            continue
        fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(settings) * max(1, len(methods)) / 3),
                                        4))
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            xs, ms, lo, hi = [], [], [], []
            for j, s in enumerate(settings):
                rs = by.get((task, *s, m))
                if not rs:
                    continue
                st = stats(r["final"]["test_acc"] for r in rs)
                if st["mean"] is None:
                    continue
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ms.append(st["mean"])
                lo.append(st["mean"] - st["min"])
                hi.append(st["max"] - st["mean"])
            ax.bar(xs, ms, width, yerr=[lo, hi], label=m, color=color(m, i), capsize=2)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels([f"{d}\n{s}" for d, s in settings], fontsize=8)
        ax.set_ylabel("final test accuracy (mean, min-max bars)")
        ax.set_title(f"task {task}: final test accuracy over seeds")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
        paths.append(save(fig, out / f"{prefix}_final_{task}.png"))
    # (3) mask policies
    mask_methods = ["RABO", *MASKS, *MASKS_SCALER, *SKEW]
    mask_sets = sorted({(k[0], k[1], k[2]) for k in by if k[3] in MASKS + MASKS_SCALER + SKEW})
    if mask_sets:
        fig, axes = plt.subplots(1, len(mask_sets), figsize=(5 * len(mask_sets), 3.5),
                                 squeeze=False)
        for j, (task, ds, split) in enumerate(mask_sets):
            ax = axes[0][j]
            for i, m in enumerate(mask_methods):
                rs = by.get((task, ds, split, m))
                if not rs:
                    continue
                mean, std = mean_curve(rs, "test_acc")
                label = f"RABO ({_mask_label(data, task)})" if m == "RABO" else m
                band(ax, rs[0]["curve"]["round"], mean, std, label, color(m, i))
            ax.set_title(f"task {task}, {ds} {split}: mask policies", fontsize=9)
            ax.set_xlabel("round")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        paths.append(save(fig, out / f"{prefix}_masks.png"))
    return paths


# --------------------------------------------------------------------------- report section


def _class_and_width_tables(rows: list[dict[str, Any]], task: str) -> list[str]:
    """Per-class accuracy of the core methods in the non-iid settings (where a gap comes
    from), and RABO's global model at each width (HeteroFL's per-width accuracy)."""
    out: list[str] = []
    skewed = [r for r in rows if r["task"] == task and r["split"] != "iid"
              and r["method"] in BASELINES and r.get("test_acc_per_class")]
    if skewed:
        classes = len(skewed[0]["test_acc_per_class"])
        out.append(f"Task {task}, non-iid settings: final test accuracy per class (%, mean over "
                   "seeds), which shows where the gap to the full model comes from:")
        out.append("")
        out.append(table(["data", "split", "method", *[str(c) for c in range(classes)]],
                         [[r["dataset"], r["split"], r["method"],
                           *["-" if a is None else f"{100 * a:.0f}"
                             for a in r["test_acc_per_class"]]] for r in skewed]))
        out.append("")
    widths = [r for r in rows if r["task"] == task and r["method"] == "RABO"
              and r.get("test_acc_per_width")]
    if widths:
        keys = sorted(widths[0]["test_acc_per_width"], key=float, reverse=True)
        out.append(f"Task {task}, RABO: test accuracy of the global model's submodel at each "
                   "width (%, mean over seeds; the mask of the last round):")
        out.append("")
        out.append(table(["data", "split", *[f"r = {k}" for k in keys]],
                         [[r["dataset"], r["split"],
                           *[f"{100 * r['test_acc_per_width'][k]:.1f}" for k in keys]]
                          for r in widths]))
        out.append("")
    return out


def section(data: dict[str, Any], rel: str,
            title: str = "## 1. RABO and RAFBO against the full model and exclusion"
            ) -> tuple[str, list[dict[str, str]]]:
    s = data["settings"]
    prefix = data["experiment"]
    lines = [title, ""]
    lines.append(produced_by(data))
    lines.append("")
    lines.append("Settings: " + "; ".join(settings_line(c) for c in data["base_configs"].values())
                 + ".")
    if s.get("extra_overrides"):
        lines.append(f"Overrides on every run of this preset: "
                     f"`{' '.join(s['extra_overrides'])}`.")
    lines.append(f"Seeds {s['seeds']}, {s['rounds']} rounds. Per method overrides: "
                 + "; ".join(f"{m}: `{' '.join(v) or '(none)'}`" for m, v in s["methods"].items())
                 + ". Per data set: " + "; ".join(f"{k}: `{' '.join(v) or '(none)'}`"
                                                 for k, v in s["dataset_overrides"].items())
                 + ". Splits: " + "; ".join(f"{k}: `{' '.join(v)}`"
                                            for k, v in s["split_overrides"].items()) + ".")
    lines.append(f"Clients' memory budgets (`clients.memory_budgets`) are derived per run from "
                 f"`rabo.policy.estimate_memory` so that the ratio policy picks "
                 f"{', '.join(f'{r:g}' for r in s['tier_ratios'])} (cycled over the clients); "
                 "the chosen ratios are checked and listed. `full` puts every client at ratio 1; "
                 "`exclusion` keeps only the clients that fit ratio 1.")
    lines.append("")
    rs = rows(data)
    for task in sorted({r["task"] for r in rs}):
        lines.append(f"**Task {task}** (final test accuracy of the full-width global model "
                     f"in %, mean ± std (min–max) over seeds, at round {s['rounds']}; early = "
                     f"at round {common.EARLY_ROUND}, still warming up; upper loss = the global "
                     "model's validation loss over every client's split; clients' f = the "
                     "clients' own submodel losses at the start of the last round (a "
                     "different quantity); payload = tensor bytes of all clients per round, "
                     "both ways; worker compute = sum over clients of `compute_s` per round; "
                     "x change = ||x_Q - x_0|| / ||x_0||):")
        lines.append("")
        lines.append(table(
            ["data", "split", "method", "ratios", "test acc %", "best acc %", "early acc %",
             "upper loss", "clients' f", "C_x*", "payload MiB/round",
             "worker compute s/round", "x change"],
            [[r["dataset"], r["split"], r["method"], ratios_str(r["ratios"]),
              pct(r["test_acc"]), pct1(r["best_test_acc"]), pct1(r["early_test_acc"]),
              mean_of(r["upper_loss"], 3), mean_of(r["client_upper_loss"], 3),
              mean_of(r["C_x_star"], 1),
              mean_of(r["payload_mib_per_round"], 2), mean_of(r["compute_s_per_round"], 3),
              mean_of(r["x_rel_change"], 3)] for r in rs if r["task"] == task]))
        lines.append("")
        if any(r["task"] == task and r["method"] in ("full", "exclusion") for r in rs):
            lines.extend(_class_and_width_tables(rs, task))
        for name in (f"{prefix}_curves_{task}.png", f"{prefix}_final_{task}.png"):
            if any(r["task"] == task and r["method"] in CORE and r["method"] != "RABO"
                   for r in rs) or "curves" not in name:
                lines.append(image(name, rel, name))
        lines.append("")
    if any(r["method"] in MASKS + MASKS_SCALER + SKEW for r in rs):
        lines.append(image(f"{prefix}_masks.png", rel, "mask policies"))
        lines.append("")
    v = verdicts(data)
    heads: list[dict[str, str]] = []

    def summarize(items: list[dict[str, Any]], key: str) -> str:
        by_split: dict[str, list[dict[str, Any]]] = {}
        for it in items:
            by_split.setdefault("iid" if it["setting"].endswith("/iid") else "non-iid",
                                []).append(it)
        return "; ".join(f"{k}: {sum(1 for i in its if i['ok'])} of {len(its)}"
                         for k, its in sorted(by_split.items()))

    close = v["close_to_full"]
    if close:
        worst = max(close, key=lambda c: c["gap"])
        ok = sum(1 for c in close if c["ok"])
        rule = ", ".join(f"{k} {100 * t:g}" for k, t in GAP_TARGET.items())
        each = "; ".join(f"{c['setting']} {100 * c['gap']:+.1f} (target <= "
                         f"{100 * c['target']:g}{'' if c['ok'] else ': MISSED'})"
                         for c in close)
        text = (f"RABO within its target of the full model in {ok} of {len(close)} settings "
                f"({summarize(close, 'gap')}); largest gap {100 * worst['gap']:.1f} points "
                f"({worst['setting']}). Gap full - RABO in points: {each}")
        lines.append(f"- **Mixed ratios close to the full model** (rule: mean gap at most, in "
                     f"points, {rule}): {verdict_word(ok, len(close))}. {text}.")
        heads.append({"claim": "Resource-adaptive RABO (ratios 1..1/8) is close to the full "
                               "model (all at ratio 1)",
                      "verdict": verdict_word(ok, len(close)), "evidence": text})
    beats = v["beats_exclusion"]
    if beats:
        ok = sum(1 for b in beats if b["ok"])
        best = max(beats, key=lambda b: b["diff"])
        worst = min(beats, key=lambda b: b["diff"])
        text = (f"RABO above exclusion by more than the seeds' std in {ok} of {len(beats)} "
                f"settings ({summarize(beats, 'diff')}); differences from "
                f"{100 * worst['diff']:+.1f} ({worst['setting']}) to {100 * best['diff']:+.1f} "
                f"points ({best['setting']})")
        lines.append(f"- **Training the small clients' submodels beats excluding them** (rule: "
                     f"mean difference > the larger std): {verdict_word(ok, len(beats))}. "
                     f"{text}.")
        heads.append({"claim": "Including resource-limited clients (dual pruning) beats "
                               "excluding them", "verdict": verdict_word(ok, len(beats)),
                      "evidence": text})
    rf = v["rafbo_vs_rabo"]
    if rf:
        ok = sum(1 for b in rf if b["ok"])
        text = "; ".join(f"{b['setting']}: {100 * b['diff']:+.1f}" for b in rf)
        lines.append(f"- **RAFBO matches RABO** (rule: |mean difference| <= 2 points): "
                     f"{verdict_word(ok, len(rf))}. RAFBO - RABO in points: {text}.")
        heads.append({"claim": "RAFBO reaches what RABO reaches",
                      "verdict": verdict_word(ok, len(rf)),
                      "evidence": f"RAFBO - RABO (points): {text}"})
        t_steps = [o.split("=", 1)[1] for o in s["methods"].get("RAFBO", [])
                   if o.startswith("outer.local_steps=")]
        if t_steps:
            lines.append(f"  (RAFBO runs `outer.local_steps={t_steps[0]}` local iterations per "
                         f"round, each with the K inner steps, so its clients do "
                         f"{t_steps[0]}x RABO's lower-level work per round: see the worker "
                         f"compute column. Equal rounds are not equal work.)")
    mask_names = MASKS + MASKS_SCALER + SKEW
    masks = [r for r in rs if r["method"] in ("RABO", *mask_names)
             and any(x["method"] in mask_names and x["task"] == r["task"]
                     and x["dataset"] == r["dataset"] and x["split"] == r["split"]
                     for x in rs)]
    if masks:
        text = "; ".join(f"{r['task']}/{r['dataset']}/{r['split']} "
                         + (f"RABO ({_mask_label(data, r['task'])})"
                            if r["method"] == "RABO" else r["method"])
                         + f": {pct(r['test_acc'])}" for r in masks)
        lines.append(f"- **Masks, scalers and weighting against RABO's own setting** (final "
                     f"test accuracy %; the table above has the spread): {text}.")
    up = v["upper_level_helps"]
    if up:
        ok = sum(1 for b in up if b["ok"])
        text = "; ".join(f"{b['setting']}: {100 * b['diff']:+.1f} points (std "
                         f"{100 * b['spread']:.1f})" for b in up)
        lines.append(f"- **The upper level contributes** (control: the same run with x frozen "
                     f"at its initialisation, `outer.lr=1.0e-9`; rule: RABO - frozen > the "
                     f"larger std): {verdict_word(ok, len(up))}. {text}.")
        heads.append({"claim": "Optimizing x (the upper level) improves on leaving it at its "
                               "initialisation (control)",
                      "verdict": verdict_word(ok, len(up)), "evidence": text})
    still = [r for r in rs if r["method"] not in CONTROLS
             and r["x_rel_change"]["mean"] is not None and r["x_rel_change"]["mean"] < 1e-4]
    if still:
        lines.append("- **x did not move** (||x_Q - x_0|| / ||x_0|| < 1e-4) in: "
                     + ", ".join(f"{r['task']}/{r['dataset']}/{r['split']} {r['method']} "
                                 f"({r['x_rel_change']['mean']:.1e})" for r in still)
                     + ": there the upper level had no effect on the result.")
    blown = [r for r in rs if (r["x_rel_change"]["max"] or 0) > 2.0]
    if blown:
        lines.append("- **x grew to more than twice its initial norm** (a sign of "
                     "instability) in: " + ", ".join(
                         f"{r['task']}/{r['dataset']}/{r['split']} {r['method']} (largest "
                         f"{r['x_rel_change']['max']:.3g}, test acc {pct(r['test_acc'])})"
                         for r in blown) + ".")
    lines.append("")
    lines.append("*What this shows*: final (at convergence), best and early test accuracy "
                 "of the full-width global model, its validation loss, accuracy per class and "
                 "per width, coverage, payload bytes and worker compute of each method over "
                 "seeds, with the ratio policy really choosing the ratios from memory budgets. "
                 "*What it does not show*: wall-clock speed of a real deployment (simulated "
                 "clients run one after the other in one process); memory per ratio (a simulated "
                 "client's step peak is the simulator process's RSS high-water mark, which "
                 "holds every client's data and the runtime, so the ratio barely shows in it; "
                 "section 5 measures it per ratio in a process of its own); FedNest's "
                 "reference numbers (500 epochs, 100 clients) are another protocol.")
    lines.append("")
    return "\n".join(lines), heads
