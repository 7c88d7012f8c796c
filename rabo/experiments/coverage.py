"""``rabo experiment coverage``: convergence against the minimum coverage of x, C_x*.

Eight clients, of which k fit ratio 1 and the others only 1/8 (their memory budgets make the
policy pick those ratios); masks are static prefixes, so the last units of every hidden layer
are covered by the k ratio-1 clients only and C_x* = k. The data, the clients and the rounds are
the same for every k. The paper's rate is O(1/sqrt(C_x* Q)) for the average squared
hypergradient norm; the records carry the norm of the coverage-averaged *estimated*
hypergradient (``hypergradient_norm``), which is what is fitted here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rabo.experiments import common
from rabo.experiments.common import (
    DATASET_OVERRIDES,
    SPLIT_OVERRIDES,
    RunSpec,
    group,
    mean_curve,
    stats,
)

NAME = "coverage"
POOR_RATIO = 0.125
FIT_FROM_ROUND = 3


@dataclass(frozen=True)
class Preset:
    tasks: tuple[str, ...]
    datasets: tuple[str, ...]
    splits: tuple[str, ...]
    ks: tuple[int, ...]
    clients: int
    seeds: tuple[int, ...]
    rounds: int
    extra: tuple[str, ...] = ()


PRESETS = {
    "reduced": Preset(("A", "B"), ("mnist",), ("iid",), (1, 2, 4, 8), 8, (0, 1, 2), 25),
    "full": Preset(("A", "B"), ("mnist", "mnist1d"), ("iid", "dirichlet"),
                   (1, 2, 3, 4, 6, 8), 8, (0, 1, 2, 3, 4), 100),
    "tiny": Preset(("A",), ("digits",), ("iid",), (1, 4), 4, (0,), 4,
                   extra=("model.hidden=[16]", "data.batch_size=32")),
}


def build_specs(preset: str) -> list[RunSpec]:
    p = PRESETS[preset]
    specs = []
    for task in p.tasks:
        for ds in p.datasets:
            for split in p.splits:
                for k in p.ks:
                    tiers = [1.0] * k + [POOR_RATIO] * (p.clients - k)
                    for seed in p.seeds:
                        key = f"{task}/{ds}/{split}/k{k}/{seed}"
                        ov = (f"data.dataset={ds}", *SPLIT_OVERRIDES[split],
                              *DATASET_OVERRIDES[ds], f"seed={seed}", f"rounds={p.rounds}",
                              f"clients.count={p.clients}", "mask.policy=static", *p.extra)
                        specs.append(common.spec(key, task, ov, tiers, task=task, dataset=ds,
                                                 split=split, k=k, seed=seed))
    return specs


def run(preset: str, out: Path, jobs: int) -> dict[str, Any]:
    p = PRESETS[preset]
    return common.run_experiment(
        NAME, preset, build_specs(preset), jobs, p.tasks,
        {"seeds": list(p.seeds), "rounds": p.rounds, "clients": p.clients,
         "ratio_1_clients_k": list(p.ks), "other_clients_ratio": POOR_RATIO,
         "datasets": list(p.datasets), "splits": list(p.splits),
         "extra_overrides": list(p.extra), "jobs": jobs, "fit_from_round": FIT_FROM_ROUND})


# --------------------------------------------------------------------------- analysis


def running_mean_sq(norms: list[float | None]) -> list[float] | None:
    """M(q) = (1/q) sum_{t<=q} h_t^2; None for a run that diverged (a non-finite norm, stored
    as None), whose M is infinite from there on and has no place in a mean or a fit."""
    if any(h is None or not math.isfinite(h) for h in norms):
        return None
    out, total = [], 0.0
    for i, h in enumerate(norms, 1):
        total += float(h) ** 2  # type: ignore[arg-type]
        out.append(total / i)
    return out


def m_curves(runs: list[dict[str, Any]]) -> tuple[list[list[float]], int]:
    """M(q) of every run that stayed finite, and how many diverged."""
    ms = [running_mean_sq(r["curve"]["hypergradient_norm"]) for r in runs]
    kept = [m for m in ms if m is not None]
    return kept, len(ms) - len(kept)


def _finite_mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _lstsq(xs: list[float], ys: list[float], intercept: bool) -> dict[str, float]:
    import numpy as np

    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    a = np.stack([x, np.ones_like(x)], 1) if intercept else x[:, None]
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    pred = a @ coef
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"slope": float(coef[0]), "intercept": float(coef[1]) if intercept else 0.0,
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


def analyze(data: dict[str, Any]) -> dict[str, Any]:
    """Per setting and k: accuracy, C_x*, M(Q); the pooled fit of M(q) on 1/sqrt(C_x* q)."""
    out: dict[str, Any] = {"settings": []}
    by_setting = group(data["runs"], "task", "dataset", "split")
    for (task, ds, split), runs in sorted(by_setting.items()):
        per_k = []
        xs, ys = [], []
        for (k,), rs in sorted(group(runs, "k").items()):
            c_star = stats(r["final"]["C_x_star"] for r in rs)
            ms, diverged = m_curves(rs)
            n = min((len(m) for m in ms), default=0)
            mean_m = [sum(m[i] for m in ms) / len(ms) for i in range(n)]
            c = c_star["mean"] or k
            for q in range(FIT_FROM_ROUND, n + 1):
                xs.append(1.0 / math.sqrt(c * q))
                ys.append(mean_m[q - 1])
            # slope of log M(q) against log q (theory: -1/2 or steeper)
            qs = list(range(FIT_FROM_ROUND, n + 1))
            loglog = _lstsq([math.log(q) for q in qs],
                            [math.log(max(mean_m[q - 1], 1e-30)) for q in qs], True) \
                if len(qs) >= 2 else {"slope": float("nan"), "r2": float("nan")}
            per_k.append({
                "k": k, "C_x_star": c_star, "seeds": len(rs), "diverged": diverged,
                "test_acc": stats(r["final"]["test_acc"] for r in rs),
                "M_final": stats(m[-1] for m in ms),
                "M_final_times_sqrt_CQ": stats(m[-1] * math.sqrt(c * len(m)) for m in ms),
                "hypergradient_norm_last5": stats(
                    _finite_mean(r["curve"]["hypergradient_norm"][-5:]) for r in rs),
                "loglog_slope_M_vs_q": loglog["slope"],
                "loglog_r2": loglog["r2"],
            })
        # the C_x* dependence alone, at the last round: log M(Q) against log C_x*
        finite = [p for p in per_k if p["M_final"]["mean"] is not None]
        cs = [p["C_x_star"]["mean"] for p in finite]
        ms_q = [p["M_final"]["mean"] for p in finite]
        c_fit = (_lstsq([math.log(c) for c in cs], [math.log(max(m, 1e-300)) for m in ms_q],
                        True) if len(finite) >= 2 and all(c and c > 0 for c in cs) else {})
        fit = _lstsq(xs, ys, True) if len(xs) >= 3 else {}
        fit0 = _lstsq(xs, ys, False) if len(xs) >= 2 else {}
        accs = [p["test_acc"]["mean"] for p in per_k]
        mfin = [p["M_final"]["mean"] for p in per_k]
        pairs = [(i, j) for i in range(len(per_k)) for j in range(i + 1, len(per_k))]
        acc_ordered = sum(1 for i, j in pairs if None not in (accs[i], accs[j])
                          and accs[j] > accs[i])
        # a k whose every run diverged has no M(Q): its pairs count as not ordered
        m_ordered = sum(1 for i, j in pairs if None not in (mfin[i], mfin[j])
                        and mfin[j] < mfin[i])
        out["settings"].append({
            "task": task, "dataset": ds, "split": split, "per_k": per_k,
            "fit_affine": fit, "fit_through_origin": fit0, "fit_log_M_Q_vs_log_C": c_fit,
            "pairs": len(pairs), "acc_increasing_pairs": acc_ordered,
            "M_decreasing_pairs": m_ordered,
        })
    return out


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    from rabo.experiments.plots import band, pyplot, save

    plt = pyplot()
    an = analyze(data)
    paths = []
    for s in an["settings"]:
        task, ds, split = s["task"], s["dataset"], s["split"]
        runs = [r for r in data["runs"] if (r["labels"]["task"], r["labels"]["dataset"],
                                            r["labels"]["split"]) == (task, ds, split)]
        fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
        for i, (_, rs) in enumerate(sorted(group(runs, "k").items())):
            c = f"C{i}"
            rounds = rs[0]["curve"]["round"]
            cs = rs[0]["final"]["C_x_star"]
            mean, std = mean_curve(rs, "test_acc")
            band(axes[0], rounds, mean, std, f"C_x* = {cs}", c)
            hm, hs = mean_curve(rs, "hypergradient_norm")
            band(axes[1], rounds, hm, hs, f"C_x* = {cs}", c)
            ms, _ = m_curves(rs)
            n = min((len(m) for m in ms), default=0)
            mm = [sum(m[q] for m in ms) / len(ms) for q in range(n)]
            xs = [1 / math.sqrt(cs * (q + 1)) for q in range(FIT_FROM_ROUND - 1, n)]
            axes[2].scatter(xs, mm[FIT_FROM_ROUND - 1:], s=8, color=c, label=f"C_x* = {cs}")
        fit = s.get("fit_affine") or {}
        if fit:
            lo = min(1 / math.sqrt(max(p["C_x_star"]["mean"] or 1, 1) * len(runs[0]["curve"]
                                                                          ["round"]))
                     for p in s["per_k"])
            hi = 1 / math.sqrt(FIT_FROM_ROUND)
            axes[2].plot([lo, hi], [fit["intercept"] + fit["slope"] * lo,
                                    fit["intercept"] + fit["slope"] * hi], "k--",
                         label=f"fit a + b/sqrt(C q), R^2 = {fit['r2']:.2f}")
        axes[0].set_title(f"task {task}, {ds} {split}: test accuracy", fontsize=9)
        axes[1].set_title("norm of the averaged hypergradient estimate", fontsize=9)
        axes[1].set_yscale("log")
        axes[2].set_title("M(q) = mean of squared norms up to q, against 1/sqrt(C_x* q)",
                          fontsize=9)
        axes[2].set_xlabel("1 / sqrt(C_x* q)")
        for ax in axes[:2]:
            ax.set_xlabel("round")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        paths.append(save(fig, out / f"coverage_{task}_{ds}_{split}.png"))
    return paths
