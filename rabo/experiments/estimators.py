"""``rabo experiment estimators``: fd-central, fd-forward, exact and neumann in the same
resource-adaptive RABO job: accuracy reached and the compute each pays.

Every estimator gets memory budgets sized for itself, so all four train the same submodels
(ratios 1, 1/2, 1/4, 1/8): the comparison isolates the estimator. A second table applies the
ratio policy to budgets sized for fd-central: the larger footprint the policy assigns to
exact and neumann (a kept backward graph) can push their clients to smaller submodels.
The time and memory ratios on fixed workloads come from ``rabo bench estimator``
(``docs/results/bench_estimator.json`` when ``make bench`` wrote it).
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
    group,
    mean_curve,
    stats,
)

NAME = "estimators"
ESTIMATORS = ("fd-central", "fd-forward", "exact", "neumann")


@dataclass(frozen=True)
class Preset:
    tasks: tuple[str, ...]
    datasets: tuple[str, ...]
    splits: tuple[str, ...]
    seeds: tuple[int, ...]
    rounds: int
    fd_budget_runs: bool = False  # also run exact/neumann under budgets sized for fd-central
    extra: tuple[str, ...] = ()


PRESETS = {
    # at convergence: 300 rounds on the MNIST MLP (full's accuracy is flat from about 200)
    "reduced": Preset(("A", "B"), ("mnist",), ("iid",), (0, 1, 2), 300,
                      extra=("eval_every=10",)),
    "full": Preset(("A", "B"), ("mnist", "digits", "mnist1d"), ("iid", "dirichlet"),
                   (0, 1, 2, 3, 4), 500, fd_budget_runs=True, extra=("eval_every=10",)),
    "tiny": Preset(("A", "B"), ("digits",), ("iid",), (0,), 2, fd_budget_runs=True,
                   extra=("model.hidden=[16]", "clients.count=4", "data.batch_size=32")),
}


def build_specs(preset: str) -> list[RunSpec]:
    p = PRESETS[preset]
    specs = []
    for task in p.tasks:
        for ds in p.datasets:
            for split in p.splits:
                for est in ESTIMATORS:
                    variants: list[tuple[str, tuple[str, ...]]] = [("own", ())]
                    if p.fd_budget_runs and est in ("exact", "neumann"):
                        variants.append(("fd-central", ("estimator.name=fd-central",)))
                    for budget_label, budget_ov in variants:
                        for seed in p.seeds:
                            key = f"{task}/{ds}/{split}/{est}/{budget_label}/{seed}"
                            ov = (f"data.dataset={ds}", *SPLIT_OVERRIDES[split],
                                  *DATASET_OVERRIDES[ds], f"seed={seed}",
                                  f"rounds={p.rounds}", f"estimator.name={est}", *p.extra)
                            specs.append(common.spec(
                                key, task, ov, TIERS, budget_ov, task=task, dataset=ds,
                                split=split, estimator=est, budgets=budget_label, seed=seed))
    return specs


def policy_table(preset: str) -> list[dict[str, Any]]:
    """Ratios the policy picks for each estimator under budgets sized for fd-central, asked
    the way a simulation asks (``Job.ratio_for``: same ladder, safety and deadline)."""
    from rabo import config
    from rabo.job import Job
    from rabo.policy import Resources, estimate_memory
    from rabo.units import parse_bytes

    p = PRESETS[preset]
    out = []
    for task in p.tasks:
        ds = p.datasets[0]
        base = config.load(common.config_path(task), [f"data.dataset={ds}", *p.extra,
                                                       *DATASET_OVERRIDES[ds]])
        job = Job.from_config(base)
        budgets = common.tier_budgets(job, TIERS)
        for est in ESTIMATORS:
            data = config.apply_overrides(config.to_dict(base), [f"estimator.name={est}"])
            data["clients"].update(ratios=None, memory_budgets=budgets)
            cfg = config.from_dict(data)
            est_job = job.reconfigured(cfg)
            picks = [est_job.ratio_for(0, Resources(parse_bytes(b)))[0] or 0.0
                     for b in budgets]
            hp, batch = est_job.engine.hyper, est_job.step_batch(0)
            out.append({"task": task, "dataset": ds, "estimator": est, "budgets": budgets,
                        "ratios": picks,
                        "estimate_at_ratio_1_bytes": estimate_memory(job.task, hp, 1.0, batch),
                        "estimate_at_ratio_1_8_bytes": estimate_memory(job.task, hp, 0.125,
                                                                       batch)})
    return out


def run(preset: str, out: Path, jobs: int) -> dict[str, Any]:
    p = PRESETS[preset]
    return common.run_experiment(
        NAME, preset, build_specs(preset), jobs, p.tasks,
        {"seeds": list(p.seeds), "rounds": p.rounds, "datasets": list(p.datasets),
         "splits": list(p.splits), "tier_ratios": list(TIERS),
         "extra_overrides": list(p.extra), "jobs": jobs},
        {"policy_under_fd_central_budgets": policy_table(preset)})


# --------------------------------------------------------------------------- analysis


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    groups = group(data["runs"], "task", "dataset", "split", "estimator", "budgets")
    for key, runs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2], ESTIMATORS.index(kv[0][3]), kv[0][4])):
        task, ds, split, est, budgets = key
        rounds = len(runs[0]["curve"]["round"])
        by_ratio: dict[str, list[float]] = {}
        for r in runs:
            for k, v in r["final"]["compute_s_per_client_round_by_ratio"].items():
                by_ratio.setdefault(k, []).append(v)
        out.append({
            "task": task, "dataset": ds, "split": split, "estimator": est,
            "budgets": budgets, "seeds": len(runs), "ratios": runs[0]["ratios"],
            "test_acc": stats(r["final"]["test_acc"] for r in runs),
            "upper_loss": stats(r["final"]["upper_loss"] for r in runs),
            "compute_s_per_round": stats(r["final"]["compute_s_total"] / rounds for r in runs),
            "compute_s_client_round_ratio_1": stats(by_ratio.get("1", [])),
            "hypergradient_norm_last": stats(r["curve"]["hypergradient_norm"][-1]
                                             for r in runs),
        })
    return out


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    from rabo.experiments.plots import band, color, pyplot, save

    plt = pyplot()
    runs = [r for r in data["runs"] if r["labels"]["budgets"] == "own"]
    by = group(runs, "task", "dataset", "split", "estimator")
    settings = sorted({k[:3] for k in by})
    if not settings:
        return []
    fig, axes = plt.subplots(len(settings), 3, figsize=(15, 3.4 * len(settings)),
                             squeeze=False)
    for row, s in enumerate(settings):
        names, comp_m, comp_s = [], [], []
        for i, est in enumerate(ESTIMATORS):
            rs = by.get((*s, est))
            if not rs:
                continue
            c = color(est, i)
            mean, std = mean_curve(rs, "test_acc")
            band(axes[row][0], rs[0]["curve"]["round"], mean, std, est, c)
            hm, hs = mean_curve(rs, "hypergradient_norm")
            band(axes[row][1], rs[0]["curve"]["round"], hm, hs, est, c)
            rounds = len(rs[0]["curve"]["round"])
            st = stats(r["final"]["compute_s_total"] / rounds for r in rs)
            names.append(est)
            comp_m.append(st["mean"])
            comp_s.append(st["std"])
        axes[row][2].bar(names, comp_m, yerr=comp_s,
                         color=[color(n, i) for i, n in enumerate(names)], capsize=3)
        task, ds, split = s
        axes[row][0].set_title(f"task {task}, {ds} {split}: test accuracy", fontsize=9)
        axes[row][1].set_title(f"task {task}: norm of the averaged hypergradient", fontsize=9)
        axes[row][1].set_yscale("log")
        axes[row][2].set_title(f"task {task}: worker compute s per round (sum over clients)",
                               fontsize=9)
        for j in range(2):
            axes[row][j].set_xlabel("round")
            axes[row][j].grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
        axes[row][2].grid(axis="y", alpha=0.3)
    return [save(fig, out / "estimators.png")]
