"""Which hidden units a submodel keeps: a pure function of (policy, ratio, round, seed, widths).

Only a :class:`MaskSpec` travels between coordinator and worker, never a boolean mask; both sides
(and every transport) derive the same indices from it.

Policies [recon]:
  * ``static``  - the first ``k`` units of every layer (HeteroFL, Diao et al., ICLR 2021).
  * ``rolling`` - a window of ``k`` units that moves every round and wraps around (FedRolex,
    Alam et al., NeurIPS 2022); the same window for every client. By default the step is tied
    to the layer: ``ceil(width / sweep_rounds)`` units per round, so a window sweeps every
    layer in ``sweep_rounds`` rounds whatever its width (measured here: FedRolex's one unit per
    round leaves a 1/8 window of 256 units on units 1-51 after 20 rounds, i.e. static in
    practice; see docs/method.md). A fixed ``stride`` in units overrides it.
  * ``random``  - ``k`` units drawn per round and per client (Federated Dropout, Caldas et al.
    2018); the client enters through ``seed`` (see :func:`client_mask_seed`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

POLICIES = ("static", "rolling", "random")


@dataclass(frozen=True)
class MaskSpec:
    """Everything needed to rebuild a submodel's indices."""

    policy: str
    ratio: float
    round: int
    seed: int = 0
    stride: int = 0  # rolling: units per round; 0: ceil(width / sweep_rounds) per layer
    sweep_rounds: int = 8  # rolling with stride 0: rounds a window takes to sweep a layer
    layer_shift: bool = True  # rolling: shift each layer's window by its index once a sweep

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"mask policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"mask ratio must be in (0, 1], got {self.ratio}")
        if self.round < 0 or self.seed < 0 or self.stride < 0:
            raise ValueError("mask round, seed and stride must be >= 0")
        if self.sweep_rounds < 1:
            raise ValueError(f"mask sweep_rounds must be >= 1, got {self.sweep_rounds}")

    def step(self, width: int, kept: int) -> int:
        """Units a rolling window of ``kept`` units moves per round in a layer of ``width``:
        ``stride`` if set, else ceil(width / sweep_rounds) but never more than ``kept`` (a
        smaller window moves by its own size, so that it skips no unit)."""
        return self.stride or max(1, min(kept, math.ceil(width / self.sweep_rounds)))


def kept_count(ratio: float, width: int) -> int:
    """ceil(ratio * width), at least 1; tolerant of float noise (0.1 * 30 keeps 3, not 4)."""
    return max(1, min(width, math.ceil(ratio * width - 1e-9)))


def client_mask_seed(run_seed: int, client_id: int) -> int:
    """The per-client seed of the ``random`` policy (also used, harmlessly, by the others)."""
    return (run_seed * 1_000_003 + client_id * 7_919 + 1) % (2**31 - 1)


def rounds_to_visit_all(spec: MaskSpec, width: int) -> int | None:
    """Consecutive rounds after which a rolling window of ``spec`` has visited every unit of a
    layer of ``width`` units: ceil((width - k) / step) + 1 for k kept units; None when the step
    exceeds the window (a fixed ``stride`` larger than k skips units)."""
    k = kept_count(spec.ratio, width)
    step = spec.step(width, k)
    if k == width:
        return 1
    if step > k:
        return None
    sweep = math.ceil((width - k) / step) + 1
    # with layer_shift a sweep starts only at multiples of the positions per layer, so any
    # 2 sweeps - 1 consecutive rounds hold a whole one
    return 2 * sweep - 1 if spec.layer_shift else sweep


def kept_units(spec: MaskSpec, widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Sorted int64 indices of the kept units of every group (in ``widths`` order)."""
    kept: dict[str, torch.Tensor] = {}
    for group_index, (group, width) in enumerate(widths.items()):
        k = kept_count(spec.ratio, width)
        if k == width:
            idx = np.arange(width)
        elif spec.policy == "static":
            idx = np.arange(k)
        elif spec.policy == "rolling":
            step = spec.step(width, k)
            position = spec.round
            if spec.layer_shift:  # after each sweep, layer g moves g more positions ahead
                position += group_index * (spec.round // math.ceil(width / step))
            start = (position * step) % width
            idx = np.sort((start + np.arange(k)) % width)
        else:
            rng = np.random.Generator(np.random.PCG64([spec.seed, spec.round, group_index]))
            idx = np.sort(rng.permutation(width)[:k])
        kept[group] = torch.from_numpy(idx.astype(np.int64))
    return kept
