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
    # MNIST; see the curves), 3 seeds.
    "reduced": Preset(
        blocks=(Block(("mnist", "digits", "mnist1d"), ("iid",), BASELINES),
                Block(("mnist",), ("dirichlet",), BASELINES, ("A",)),
                Block(("digits",), ("shards",), BASELINES, ("A",)),
                Block(("mnist",), ("iid",), ("RAFBO", *CONTROLS), ("A",)),
                Block(("mnist",), ("iid",), ("RABO static", "RABO rolling, stride 1",
                                              "RABO no scaler", "RABO static, no scaler",
                                              "RABO + forward scaler"), ("A",)),
                Block(("digits",), ("shards",), ("RABO static", "RABO rolling, stride 1",
                                                 "RABO no scaler", *SKEW), ("A",)),
                Block(("mnist",), ("dirichlet",), SKEW, ("A",))),
        seeds=(0, 1, 2), rounds=300, extra=EVAL_EVERY),
    "full": Preset(
        blocks=(Block(("mnist", "digits", "mnist1d"), ("iid", "shards", "dirichlet"),
                      CORE + CONTROLS + MASKS + MASKS_SCALER + SKEW),),
        seeds=(0, 1, 2, 3, 4), rounds=500, extra=EVAL_EVERY),
    "tiny": Preset(
        blocks=(Block(("digits",), ("iid",), CORE + CONTROLS + ("RABO static",)),),
        seeds=(0, 1), rounds=3,
        extra=("model.hidden=[16]", "clients.count=4", "data.batch_size=32")),
}


def _resolved(task: str, overrides: tuple[str, ...]) -> str:
    import json

    from rabo import config

    cfg = config.to_dict(config.load(common.config_path(task), overrides))
    return json.dumps(cfg, sort_keys=True)


def build_specs(preset: str) -> list[RunSpec]:
    """Every run of the preset. A method whose resolved config equals one already listed for
    the same setting and seed is left out, so nothing runs twice."""
    p = PRESETS[preset]
    specs: dict[str, RunSpec] = {}
    seen: set[str] = set()
    for block in p.blocks:
        for task in block.tasks:
            for ds in block.datasets:
                for split in block.splits:
                    for method in block.methods:
                        for seed in p.seeds:
                            key = f"{task}/{ds}/{split}/{method}/{seed}"
                            ov = (f"data.dataset={ds}", *SPLIT_OVERRIDES[split],
                                  *DATASET_OVERRIDES[ds], f"seed={seed}", f"rounds={p.rounds}",
                                  *METHODS[method], *p.extra)
                            resolved = _resolved(task, ov)
                            if resolved in seen:
                                continue
                            seen.add(resolved)
                            specs[key] = common.spec(key, task, ov, TIERS, task=task,
                                                     dataset=ds, split=split, method=method,
                                                     seed=seed)
    return list(specs.values())


def run(preset: str, out: Path, jobs: int) -> dict[str, Any]:
    p = PRESETS[preset]
    return common.run_experiment(
        NAME, preset, build_specs(preset), jobs, ("A", "B"),
        {"seeds": list(p.seeds), "rounds": p.rounds,
         "methods": {m: list(METHODS[m]) for m in METHODS},
         "dataset_overrides": {k: list(v) for k, v in DATASET_OVERRIDES.items()},
         "split_overrides": {k: list(v) for k, v in SPLIT_OVERRIDES.items()},
         "tier_ratios": list(TIERS), "extra_overrides": list(p.extra), "jobs": jobs})


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
    by = group(runs, "task", "dataset", "split", "method")
    tasks = sorted({r["labels"]["task"] for r in runs})
    # (1) curves of the core methods, one figure per task, one row per (dataset, split)
    for task in tasks:
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
        paths.append(save(fig, out / f"claims_curves_{task}.png"))
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
        paths.append(save(fig, out / f"claims_final_{task}.png"))
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
        paths.append(save(fig, out / "claims_masks.png"))
    return paths
