"""Matplotlib helpers shared by the experiments (Agg backend, PNG files)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLORS = {
    "RABO": "C0", "RAFBO": "C1", "full": "C2", "exclusion": "C3", "RABO static": "C4",
    "RABO random": "C5", "RABO rolling, stride 1": "C6", "RABO no scaler": "C8",
"RABO static, no scaler": "C9",
    "RABO + forward scaler": "C1", "RABO inverse-ratio weighting": "C5", "RABO, x frozen": "C7",
    "fd-central": "C0", "fd-forward": "C1", "exact": "C2", "neumann": "C3",
}


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def color(name: str, i: int) -> str:
    return COLORS.get(name, f"C{i % 10}")


def band(ax: Any, xs: Sequence[float], mean: Sequence[float], std: Sequence[float], label: str,
         c: str, marker: str | None = None) -> None:
    pts = [(x, m, s) for x, m, s in zip(xs, mean, std, strict=False)
           if x is not None and m is not None and not math.isnan(m)]
    if not pts:
        return
    x = [p[0] for p in pts]
    m = [p[1] for p in pts]
    s = [p[2] for p in pts]
    ax.plot(x, m, label=label, color=c, marker=marker, markersize=3)
    ax.fill_between(x, [a - b for a, b in zip(m, s, strict=True)],
                    [a + b for a, b in zip(m, s, strict=True)], color=c, alpha=0.15, lw=0)


def save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path
