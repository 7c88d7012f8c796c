"""An experiment grid as data: named axes, each a list of levels, crossed.

A level is one value of an axis: the labels it sets on a run (``dataset="mnist"``), the part
of the run's key it contributes (``mnist``) and what it changes (config overrides, the ratios
the clients' memory budgets are chosen to produce, budgets sized as if other overrides held).
A :class:`Grid` is the product of its axes, first axis outermost, plus overrides that hold on
every run; an experiment is the union of one or more grids (:func:`specs`). The results file
records each grid's axes and values (:meth:`Grid.describe`), so what ran is read from the
data, not from loops in each experiment's code.

Overrides are applied in axis order and then the grid's ``extra``; a later override of the
same key wins, as on the command line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

from rabo.experiments.common import (
    DATASET_OVERRIDES,
    REPO,
    SPLIT_OVERRIDES,
    TIERS,
    RunSpec,
    spec,
)


@dataclass(frozen=True)
class Level:
    key: str
    labels: tuple[tuple[str, Any], ...]
    overrides: tuple[str, ...] = ()
    tiers: tuple[float, ...] | None = None  # replaces the grid's tier ratios
    budget_overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Axis:
    name: str
    levels: tuple[Level, ...]

    def __post_init__(self) -> None:
        keys = [lv.key for lv in self.levels]
        if len(set(keys)) != len(keys):
            raise ValueError(f"axis {self.name!r} lists a level twice: {keys}")


def axis(name: str, values: Iterable[Any],
         overrides: Mapping[Any, Sequence[str]] | Callable[[Any], Sequence[str]] | None = None,
         key: Callable[[Any], str] = str,
         tiers: Callable[[Any], Sequence[float]] | None = None) -> Axis:
    """An axis that sets the label ``name`` to each of ``values``; ``overrides`` maps a value
    to its config overrides (a mapping or a function)."""
    def ov(v: Any) -> tuple[str, ...]:
        if overrides is None:
            return ()
        return tuple(overrides[v] if isinstance(overrides, Mapping) else overrides(v))

    return Axis(name, tuple(
        Level(key(v), ((name, v),), ov(v), tuple(tiers(v)) if tiers else None)
        for v in values))


def tasks(values: Iterable[str]) -> Axis:
    """The task axis: its label also picks the config, ``configs/experiments/task-<t>.yaml``."""
    return axis("task", values)


def datasets(values: Iterable[str]) -> Axis:
    return axis("dataset", values,
                lambda d: (f"data.dataset={d}", *DATASET_OVERRIDES[d]))


def splits(values: Iterable[str]) -> Axis:
    return axis("split", values, SPLIT_OVERRIDES)


def seeds(values: Iterable[int]) -> Axis:
    return axis("seed", values, lambda s: (f"seed={s}",))


def settings(pairs: Iterable[tuple[str, str]]) -> Axis:
    """(dataset, split) pairs as one axis, for grids that do not cross the two."""
    return Axis("setting", tuple(
        Level(f"{d}/{s}", (("dataset", d), ("split", s)),
              (f"data.dataset={d}", *SPLIT_OVERRIDES[s], *DATASET_OVERRIDES[d]))
        for d, s in pairs))


@dataclass(frozen=True)
class Grid:
    axes: tuple[Axis, ...]
    extra: tuple[str, ...] = ()  # overrides on every run, after the axes'
    tiers: tuple[float, ...] | None = TIERS
    where: Callable[[dict[str, Any]], bool] | None = None  # keep only runs whose labels pass

    def runs(self) -> list[RunSpec]:
        out = []
        for levels in product(*(a.levels for a in self.axes)):
            labels = dict(lv for level in levels for lv in level.labels)
            if self.where is not None and not self.where(labels):
                continue
            if "task" not in labels:
                raise ValueError("a grid needs a 'task' label (the tasks() axis or a level "
                                 "that sets it) to pick its config")
            tiers = self.tiers
            for level in levels:
                if level.tiers is not None:
                    tiers = level.tiers
            out.append(spec("/".join(level.key for level in levels), labels["task"],
                            (*(o for level in levels for o in level.overrides), *self.extra),
                            tiers, tuple(o for level in levels for o in level.budget_overrides),
                            **labels))
        return out

    def describe(self) -> dict[str, Any]:
        return {"axes": {a.name: [lv.key for lv in a.levels] for a in self.axes},
                "extra_overrides": list(self.extra),
                "tier_ratios": list(self.tiers) if self.tiers is not None else None}


def _resolved(s: RunSpec) -> str:
    from rabo import config

    cfg = config.to_dict(config.load(REPO / s.config, s.overrides))
    return json.dumps([cfg, s.tier_ratios, s.budget_overrides], sort_keys=True)


def specs(*grids: Grid, dedupe: bool = False) -> list[RunSpec]:
    """The union of the grids' runs in order; a key listed twice runs once. With ``dedupe``,
    a run whose resolved config, tiers and budgets equal an earlier run's is left out too
    (a method that is another's setting under a different name)."""
    out: dict[str, RunSpec] = {}
    seen: set[str] = set()
    for g in grids:
        for s in g.runs():
            if s.key in out:
                continue
            if dedupe:
                r = _resolved(s)
                if r in seen:
                    continue
                seen.add(r)
            out[s.key] = s
    return list(out.values())


def describe(*grids: Grid) -> list[dict[str, Any]]:
    return [g.describe() for g in grids]
