"""Which hidden units a submodel keeps: a pure function of (policy, ratio, round, seed, widths).

Only a :class:`MaskSpec` travels between coordinator and worker, never a boolean mask; both sides
(and every transport) derive the same indices from it.

Policies [recon]:
  * ``static``  - the first ``k`` units of every layer (HeteroFL, Diao et al., ICLR 2021).
  * ``rolling`` - a window of ``k`` units that moves ``stride`` units per round and wraps
    around (FedRolex, Alam et al., NeurIPS 2022); the same window for every client.
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
    stride: int = 1

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"mask policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"mask ratio must be in (0, 1], got {self.ratio}")
        if self.round < 0 or self.seed < 0 or self.stride < 1:
            raise ValueError("mask round and seed must be >= 0 and stride >= 1")


def kept_count(ratio: float, width: int) -> int:
    """ceil(ratio * width), at least 1; tolerant of float noise (0.1 * 30 keeps 3, not 4)."""
    return max(1, min(width, math.ceil(ratio * width - 1e-9)))


def client_mask_seed(run_seed: int, client_id: int) -> int:
    """The per-client seed of the ``random`` policy (also used, harmlessly, by the others)."""
    return (run_seed * 1_000_003 + client_id * 7_919 + 1) % (2**31 - 1)


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
            start = (spec.round * spec.stride) % width
            idx = np.sort((start + np.arange(k)) % width)
        else:
            rng = np.random.Generator(np.random.PCG64([spec.seed, spec.round, group_index]))
            idx = np.sort(rng.permutation(width)[:k])
        kept[group] = torch.from_numpy(idx.astype(np.int64))
    return kept
