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
    """Write the PNG plots next to the metrics; returns their paths ([] without metrics)."""
    run_dir = Path(run_dir)
    try:
        records = read_metrics(run_dir)
    except FileNotFoundError:
        return []
    if not records:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def report(run_dir: str | Path) -> str:
    records = read_metrics(run_dir)
    text = table(records)
    paths = write_plots(run_dir)
    return text + ("\nplots: " + ", ".join(str(p) for p in paths) if paths else "")
