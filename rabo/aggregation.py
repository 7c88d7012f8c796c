"""Coverage-normalized averaging of submodel updates [recon: HeteroFL / FedRolex].

Every coordinate is averaged over the clients whose submodel covered it this round (optionally
weighted by sample counts); a coordinate no client covered keeps its value. Coverage C[q, j] is
the number of participating clients whose submodel holds coordinate j in round q; the minimum
over coordinates and rounds is C_x* of the paper's rate O(1/sqrt(C_x* Q)) ("Every Parameter
Matters", Zhou et al., NeurIPS 2023, for the coverage notion).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rabo.params import Params
from rabo.submodel import SlicePlan


@dataclass(frozen=True)
class CoverageStats:
    """Per-round coverage of one variable (x or y)."""

    min: int
    mean: float
    zero: int  # coordinates no participant covered
    total: int  # coordinates in the variable

    def as_dict(self, prefix: str) -> dict[str, float | int]:
        return {f"{prefix}_min": self.min, f"{prefix}_mean": self.mean,
                f"{prefix}_zero": self.zero}


class CoverageAverager:
    """Accumulates weighted slices of one variable and returns their coverage average.

    ``add`` is called once per client update, in a fixed order (client id) so that every
    transport sums in the same order and produces bit-identical results.
    """

    def __init__(self, like: Mapping[str, torch.Tensor]) -> None:
        self._sum = {k: torch.zeros_like(t) for k, t in like.items()}
        self._weight = {k: torch.zeros_like(t) for k, t in like.items()}
        self._count = {k: torch.zeros(t.shape, dtype=torch.int32, device=t.device)
                       for k, t in like.items()}

    def add(self, slice_plan: SlicePlan, values: Mapping[str, torch.Tensor], weight: float = 1.0
            ) -> None:
        for name, idx in slice_plan.index.items():
            s = values[name].to(self._sum[name].device, self._sum[name].dtype)
            if idx is None:
                self._sum[name].add_(s, alpha=weight)
                self._weight[name].add_(weight)
                self._count[name].add_(1)
                continue
            flat = idx.to(s.device).reshape(-1)
            self._sum[name].view(-1).index_add_(0, flat, s.reshape(-1), alpha=weight)
            self._weight[name].view(-1).index_add_(
                0, flat, torch.full((flat.numel(),), weight, dtype=s.dtype, device=s.device))
            self._count[name].view(-1).index_add_(
                0, flat, torch.ones(flat.numel(), dtype=torch.int32, device=s.device))

    def average(self) -> Params:
        """Per coordinate: weighted mean over the clients that covered it, 0 where none did."""
        return {k: torch.where(self._weight[k] > 0, self._sum[k] / self._weight[k].clamp_min(
            torch.finfo(self._sum[k].dtype).tiny), torch.zeros_like(self._sum[k]))
            for k in self._sum}

    def covered(self) -> dict[str, torch.Tensor]:
        return {k: c > 0 for k, c in self._count.items()}

    def counts(self) -> dict[str, torch.Tensor]:
        return dict(self._count)

    def stats(self) -> CoverageStats:
        total = sum(c.numel() for c in self._count.values())
        if total == 0:
            return CoverageStats(0, 0.0, 0, 0)
        cmin = min(int(c.min()) for c in self._count.values() if c.numel())
        csum = sum(int(c.sum()) for c in self._count.values())
        zero = sum(int((c == 0).sum()) for c in self._count.values())
        return CoverageStats(cmin, csum / total, zero, total)


def apply_average(full: Mapping[str, torch.Tensor], averager: CoverageAverager, step: float = 1.0
                  ) -> Params:
    """full + step * coverage-average of the accumulated deltas (uncovered: unchanged)."""
    avg = averager.average()
    return {k: full[k] + step * avg[k] for k in full}
