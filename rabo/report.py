"""``rabo report DIR``: a run folder as a terminal table and PNG plots.

Plots: test accuracy against rounds and against cumulative bytes (on the wire where measured,
else tensor payload), and bytes per worker against its ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rabo.metrics import read_metrics


def _round_bytes(rec: dict[str, Any]) -> tuple[float, str]:
    if rec.get("wire_bytes") is not None:
        return float(rec["wire_bytes"]), "wire"
    payload = sum(c.get("payload_down_bytes", 0) + c.get("payload_up_bytes", 0)
                  for c in rec.get("clients", []))
    return float(payload), "payload"


def table(records: list[dict[str, Any]]) -> str:
    head = (f"{'round':>5} {'test_acc':>8} {'upper':>8} {'cov_x':>6} {'cov_y':>6} "
            f"{'workers':>7} {'MiB':>9} {'round_s':>8} {'compute_s':>9}")
    lines = [head, "-" * len(head)]
    for r in records:
        b, _ = _round_bytes(r)
        acc, loss = r.get("test_acc"), r.get("upper_loss")
        compute = r.get("compute_s",
                        max((c.get("compute_s", 0) for c in r.get("clients", [])), default=0))
        lines.append(
            f"{r['round']:>5} {'-' if acc is None else f'{acc:.4f}':>8} "
            f"{'-' if loss is None else f'{loss:.4f}':>8} "
            f"{r['coverage_x_min']:>6} {r['coverage_y_min']:>6} "
            f"{len(r.get('clients', [])):>7} {b / 2**20:>9.2f} {r.get('round_s', 0):>8.2f} "
            f"{compute:>9.2f}")
    return "\n".join(lines)


def write_plots(run_dir: str | Path) -> list[Path]:
    """Write the PNG plots next to the metrics; returns their paths ([] without metrics).
    Raises :class:`rabo.experiments.plots.PlotsUnavailable` without matplotlib."""
    from rabo.experiments.plots import pyplot

    run_dir = Path(run_dir)
    try:
        records = read_metrics(run_dir)
    except FileNotFoundError:
        return []
    if not records:
        return []
    plt = pyplot()

    evaluated = [r for r in records if r.get("test_acc") is not None]
    cumulative, total = [], 0.0
    kind = "payload"
    for r in records:
        b, kind = _round_bytes(r)
        total += b
        cumulative.append(total)
    cum_at = {r["round"]: c for r, c in zip(records, cumulative, strict=True)}
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot([r["round"] for r in evaluated], [r["test_acc"] for r in evaluated], marker=".")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("test accuracy")
    axes[0].grid(alpha=0.3)
    axes[1].plot([cum_at[r["round"]] / 2**20 for r in evaluated],
                 [r["test_acc"] for r in evaluated], marker=".")
    axes[1].set_xlabel(f"cumulative {kind} bytes (MiB)")
    axes[1].set_ylabel("test accuracy")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    p = run_dir / "accuracy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(5, 4))
    points: dict[float, list[float]] = {}
    for r in records:
        for c in r.get("clients", []):
            down = c.get("wire_down_bytes") or c.get("payload_down_bytes", 0)
            up = c.get("wire_up_bytes") or c.get("payload_up_bytes", 0)
            points.setdefault(c["ratio"], []).append((down + up) / 2**20)
    ratios = sorted(points)
    ax.scatter([r for r in ratios for _ in points[r]], [v for r in ratios for v in points[r]],
               alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width ratio")
    ax.set_ylabel(f"{kind} bytes per worker per round (MiB)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = run_dir / "bytes_per_ratio.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def plots_line(run_dir: str | Path) -> str | None:
    """For a command that plots on the side (``rabo local``): write the run's plots and
    return the line that names them, or the line that says why they were skipped (matplotlib
    is an extra); None when there was nothing to plot."""
    from rabo.experiments.plots import matplotlib_missing

    missing = matplotlib_missing()
    if missing:
        return f"plots skipped: {missing}"
    paths = write_plots(run_dir)
    return "plots: " + ", ".join(str(p) for p in paths) if paths else None


def report(run_dir: str | Path) -> str:
    records = read_metrics(run_dir)
    text = table(records)
    paths = write_plots(run_dir)
    return text + ("\nplots: " + ", ".join(str(p) for p in paths) if paths else "")


# --------------------------------------------------------------------------- several runs

CSV_COLUMNS = ("run", "round", "wall_s", "round_s", "test_acc", "test_loss", "upper_loss",
               "client_upper_loss", "coverage_x_min", "coverage_x_mean", "coverage_y_min",
               "participants", "compute_s", "transfer_s", "aggregation_s", "payload_bytes",
               "wire_bytes", "cumulative_bytes", "bytes_kind")


def run_name(run_dir: Path, taken: set[str]) -> str:
    """A legend label: the folder's name, with its parent's where two runs share a name."""
    name = run_dir.name or str(run_dir)
    if name in taken:
        name = f"{run_dir.parent.name}/{run_dir.name}"
    base, n = name, 2
    while name in taken:  # a third clash, or the same folder twice
        name, n = f"{base} ({n})", n + 1
    taken.add(name)
    return name


def load_runs(run_dirs: list[str | Path]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label, records) per run folder; FileNotFoundError names a folder without metrics."""
    taken: set[str] = set()
    runs = []
    for d in run_dirs:
        path = Path(d)
        if not (path / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{path} has no metrics.jsonl")
        runs.append((run_name(path, taken), read_metrics(path)))
    return runs


def csv_rows(runs: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    rows = []
    for name, records in runs:
        total = 0.0
        for r in records:
            b, kind = _round_bytes(r)
            total += b
            rows.append({**{k: r.get(k) for k in CSV_COLUMNS}, "run": name,
                         "cumulative_bytes": int(total), "bytes_kind": kind})
    return rows


def write_csv(runs: list[tuple[str, list[dict[str, Any]]]], path: str | Path) -> Path:
    """One row per run and round, the scalar figures of ``metrics.jsonl`` (``CSV_COLUMNS``)."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for row in csv_rows(runs):
            w.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def _final(records: list[dict[str, Any]]) -> dict[str, Any]:
    evaluated = [r for r in records if r.get("test_acc") is not None]
    last = evaluated[-1] if evaluated else {}
    total = sum(_round_bytes(r)[0] for r in records)
    return {"rounds": records[-1]["round"] if records else 0,
            "test_acc": last.get("test_acc"),
            "best_test_acc": max((r["test_acc"] for r in evaluated), default=None),
            "upper_loss": last.get("upper_loss"),
            "bytes": total, "bytes_kind": _round_bytes(records[-1])[1] if records else "payload",
            "wall_s": records[-1].get("wall_s") if records else None}


def compare_table(runs: list[tuple[str, list[dict[str, Any]]]]) -> str:
    width = max(12, *(len(n) for n, _ in runs))
    head = (f"{'run':<{width}} {'rounds':>6} {'test acc':>9} {'best acc':>9} {'upper loss':>10} "
            f"{'MiB moved':>10} {'wall s':>8}")
    lines = [head, "-" * len(head)]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    for name, records in runs:
        f = _final(records)
        loss = "-" if f["upper_loss"] is None else f"{f['upper_loss']:.4f}"
        wall = "-" if f["wall_s"] is None else f"{f['wall_s']:.1f}"
        lines.append(f"{name:<{width}} {f['rounds']:>6} {pct(f['test_acc']):>9} "
                     f"{pct(f['best_test_acc']):>9} {loss:>10} {f['bytes'] / 2**20:>10.2f} "
                     f"{wall:>8}")
    kinds = {_final(r)["bytes_kind"] for _, r in runs}
    lines.append(f"(MiB moved: {' / '.join(sorted(kinds))} bytes of every round, both ways)")
    return "\n".join(lines)


def write_compare_plots(runs: list[tuple[str, list[dict[str, Any]]]], out: str | Path
                        ) -> list[Path]:
    """The runs overlaid: test accuracy and upper loss against rounds, accuracy against the
    bytes moved and the wall time, and each run's final accuracy per width where recorded;
    PNG and PDF each."""
    from rabo.experiments.plots import pyplot

    plt = pyplot()
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = sorted({_final(r)["bytes_kind"] for _, r in runs})
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (a_round, a_loss), (a_bytes, a_wall) = axes
    for i, (name, records) in enumerate(runs):
        ev = [r for r in records if r.get("test_acc") is not None]
        cum, total = {}, 0.0
        for r in records:
            total += _round_bytes(r)[0]
            cum[r["round"]] = total
        acc = [100 * r["test_acc"] for r in ev]
        c = f"C{i % 10}"
        a_round.plot([r["round"] for r in ev], acc, marker=".", color=c, label=name)
        losses = [r for r in records if r.get("upper_loss") is not None]
        a_loss.plot([r["round"] for r in losses], [r["upper_loss"] for r in losses], color=c,
                    label=name)
        a_bytes.plot([cum[r["round"]] / 2**20 for r in ev], acc, marker=".", color=c, label=name)
        a_wall.plot([r.get("wall_s") or 0.0 for r in ev], acc, marker=".", color=c, label=name)
    a_round.set(title="Test accuracy", xlabel="round", ylabel="test accuracy (%)")
    a_loss.set(title="Upper-level loss (clients' validation splits)", xlabel="round",
               ylabel="upper-level loss f")
    a_bytes.set(title="Accuracy against communication",
                xlabel=f"cumulative {' / '.join(kinds)} bytes (MiB)",
                ylabel="test accuracy (%)")
    a_wall.set(title="Accuracy against wall time", xlabel="wall time (s)",
               ylabel="test accuracy (%)")
    for ax in (a_round, a_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (a_round, a_bytes, a_wall):
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"compare.{ext}"
        fig.savefig(p, dpi=110)
        paths.append(p)
    plt.close(fig)
    widths: list[tuple[str, dict[str, float]]] = []
    for name, recs in runs:
        last = next((x for x in reversed(recs) if x.get("test_acc_per_width")), None)
        if last is not None:
            widths.append((name, last["test_acc_per_width"]))
    if widths:
        ladder = sorted({float(k) for _, w in widths for k in w}, reverse=True)
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ladder) + 2), 4))
        step = 0.8 / len(widths)
        for i, (name, w) in enumerate(widths):
            xs = [j + (i - (len(widths) - 1) / 2) * step for j in range(len(ladder))]
            ax.bar(xs, [100 * w.get(f"{r:g}", float("nan")) for r in ladder], width=step,
                   label=name, color=f"C{i % 10}")
        ax.set_xticks(range(len(ladder)), [f"{r:g}" for r in ladder])
        ax.set(title="The global model at each width (last evaluated round)",
               xlabel="width ratio", ylabel="test accuracy (%)")
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        fig.tight_layout()
        for ext in ("png", "pdf"):
            p = out / f"compare_per_width.{ext}"
            fig.savefig(p, dpi=110)
            paths.append(p)
        plt.close(fig)
    return paths
