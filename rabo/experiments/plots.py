"""Matplotlib helpers shared by the experiments and ``rabo report`` (Agg backend, PNG files).

matplotlib is an optional dependency (``pip install 'rabo[plots]'``; a worker never plots):
:func:`pyplot` is the one place it is imported, and :func:`matplotlib_missing` lets a command
that exists to plot refuse before it does any work, and one that plots on the side skip them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rabo.errors import RaboError
from rabo.extras import package_missing

INSTALL_HINT = "pip install 'rabo[plots]'"

COLORS = {
    "RABO": "C0", "RAFBO": "C1", "full": "C2", "exclusion": "C3", "RABO static": "C4",
    "RABO random": "C5", "RABO rolling, stride 1": "C6", "RABO no scaler": "C8",
"RABO static, no scaler": "C9",
    "RABO + forward scaler": "C1", "RABO inverse-ratio weighting": "C5", "RABO, x frozen": "C7",
    "fd-central": "C0", "fd-forward": "C1", "exact": "C2", "neumann": "C3",
}


class PlotsUnavailable(RaboError):
    """A plot was asked for where matplotlib is not installed (or does not import)."""


def matplotlib_missing() -> str | None:
    """Why plots cannot be drawn here (None: matplotlib is installed). Cheap: it looks the
    package up without importing it."""
    return package_missing("matplotlib", f"matplotlib is not installed ({INSTALL_HINT})")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; :class:`PlotsUnavailable` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotsUnavailable(f"matplotlib does not import ({exc}); {INSTALL_HINT}") from None
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
