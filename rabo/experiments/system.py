"""Plots of ``rabo bench system``'s results (``system.json``). The measurements themselves
live in ``coordinator/sysbench.py`` (they need gRPC, which ``rabo`` never imports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    from rabo.experiments.plots import pyplot, save

    plt = pyplot()
    paths = []
    grid = data.get("grid")
    if grid and grid.get("points"):
        fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
        by_params: dict[float, list[dict[str, Any]]] = {}
        for p in grid["points"]:
            by_params.setdefault(p["params_target"], []).append(p)
        for i, (params, pts) in enumerate(sorted(by_params.items())):
            pts = sorted(pts, key=lambda p: p["workers"])
            w = [p["workers"] for p in pts]
            label = f"{params / 1e6:g}M parameters"
            axes[0].plot(w, [p["round_overhead_s"] for p in pts], "o-", color=f"C{i}",
                         label=label)
            axes[0].plot(w, [p["loopback_transfer_s"] for p in pts], "x:", color=f"C{i}",
                         label=f"{label}: same bytes, loopback socket")
            axes[1].plot(w, [p["coordinator_cpu_s_per_round"] for p in pts], "o-",
                         color=f"C{i}", label=label)
            axes[2].plot(w, [p["payload_mb_per_s"] for p in pts], "o-", color=f"C{i}",
                         label=label)
        axes[0].set_title("round overhead (round time - slowest compute)", fontsize=9)
        axes[0].set_ylabel("s")
        axes[1].set_title("coordinator CPU s per round (getrusage of its process)", fontsize=9)
        axes[2].set_title("payload MB/s through the coordinator (both ways)", fontsize=9)
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("echo worker processes")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        paths.append(save(fig, out / f"{data.get('experiment', 'system')}_grid.png"))
    ratio = data.get("ratio")
    if ratio and ratio.get("workloads"):
        wls = ratio["workloads"]
        fig, axes = plt.subplots(1, 2, figsize=(13, 4))
        for i, wl in enumerate(wls):
            rows = wl["rows"]
            r = [x["ratio"] for x in rows]
            axes[0].plot(r, [x["time_vs_full"] for x in rows], "o-", color=f"C{i}",
                         label=wl["workload"])
            axes[1].plot(r, [x["peak_bytes"] / 2**20 for x in rows], "o-", color=f"C{i}",
                         label=f"{wl['workload']}: measured peak above baseline")
            axes[1].plot(r, [x["estimate_bytes"] / 2**20 for x in rows], "x--",
                         color=f"C{i}", label=f"{wl['workload']}: policy estimate")
        rr = sorted({x["ratio"] for wl in wls for x in wl["rows"]})
        axes[0].plot(rr, [x * x for x in rr], "k:", label="r^2")
        axes[0].plot(rr, rr, "k--", alpha=0.5, label="r")
        axes[0].set_title(f"client_step time relative to ratio 1 ({ratio['device']})",
                          fontsize=9)
        axes[1].set_title(f"client_step peak memory, MiB ({ratio['device']})", fontsize=9)
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("width ratio r")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        paths.append(save(fig, out / f"{data.get('experiment', 'system')}_ratio.png"))
    return paths
