"""The optional parts of the install (pyproject.toml's extras): whether one is here."""

from __future__ import annotations

import importlib.util


def package_missing(module: str, why: str) -> str | None:
    """``why`` when ``module`` cannot be found (an extra that is not installed), else None.
    Cheap: it looks the package up without importing it (or what it imports)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else why
