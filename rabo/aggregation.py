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
    transport sums in the same order and produces bit-identical results. Slices made of a few
    dense blocks (static and rolling masks) are accumulated block by block at memory speed;
    scattered slices (random masks) through one flat ``index_add_``.
    """

    def __init__(self, like: Mapping[str, torch.Tensor]) -> None:
        self._sum = {k: torch.zeros_like(t) for k, t in like.items()}
        self._weight = {k: torch.zeros_like(t) for k, t in like.items()}
        self._count: dict[str, torch.Tensor] | None = None  # None: equal to _weight (all w = 1)
        # weight and count added to every coordinate of a tensor by updates that hold all of
        # it: kept as numbers and added once (a full-tensor pass per update saved)
        self._whole_weight = dict.fromkeys(self._sum, 0.0)
        self._whole_count = dict.fromkeys(self._sum, 0.0)
        self._avg: Params | None = None
        self._coverage_sum = 0  # sum of coverage over coordinates = total slice sizes added

    def add(self, slice_plan: SlicePlan, values: Mapping[str, torch.Tensor], weight: float = 1.0
            ) -> None:
        if self._avg is not None:
            raise RuntimeError("add() after average()")
        if weight != 1.0 and self._count is None:
            self._count = {k: w.clone() for k, w in self._weight.items()}
        self._coverage_sum += slice_plan.numel()
        for name in slice_plan.shapes:
            acc, wsum = self._sum[name], self._weight[name]
            cnt = self._count[name] if self._count is not None else None
            s = values[name].to(acc.device, acc.dtype)
            blocks = slice_plan.blocks[name]
            if slice_plan.whole[name]:
                acc.add_(s, alpha=weight)
                self._whole_weight[name] += weight
                self._whole_count[name] += 1.0
            elif blocks is not None:
                for full_sl, sub_sl in blocks:
                    acc[full_sl].add_(s[sub_sl], alpha=weight)
                    wsum[full_sl].add_(weight)
                    if cnt is not None:
                        cnt[full_sl].add_(1.0)
            else:
                idx = slice_plan.index[name]
                assert idx is not None
                flat = idx.to(s.device).reshape(-1)
                acc.view(-1).index_add_(0, flat, s.reshape(-1), alpha=weight)
                ones = torch.ones(1, dtype=s.dtype, device=s.device).expand(flat.numel())
                wsum.view(-1).index_add_(0, flat, ones, alpha=weight)
                if cnt is not None:
                    cnt.view(-1).index_add_(0, flat, ones)

    def _settle(self) -> None:
        """Add the whole-tensor weights and counts into the per-coordinate ones."""
        for name, w in self._whole_weight.items():
            if self._whole_count[name]:
                self._weight[name].add_(w)
                if self._count is not None:
                    self._count[name].add_(self._whole_count[name])
                self._whole_weight[name] = self._whole_count[name] = 0.0

    def average(self) -> Params:
        """Per coordinate: weighted mean over the clients that covered it, 0 where none did."""
        self._settle()
        if self._avg is None:
            # uncovered coordinates hold sum 0 and weight 0: 0 / tiny = 0, no mask needed
            self._avg = {k: self._sum[k].div_(self._weight[k].clamp(
                min=torch.finfo(self._sum[k].dtype).tiny)) for k in self._sum}
        return self._avg

    def counts(self) -> dict[str, torch.Tensor]:
        """Coverage: how many clients covered each coordinate."""
        self._settle()
        src = self._count if self._count is not None else self._weight
        return {k: c.round().to(torch.int32) for k, c in src.items()}

    def covered(self) -> dict[str, torch.Tensor]:
        self._settle()
        return {k: w > 0 for k, w in self._weight.items()}

    def stats(self) -> CoverageStats:
        self._settle()
        src = self._count if self._count is not None else self._weight
        total = sum(c.numel() for c in src.values())
        if total == 0:
            return CoverageStats(0, 0.0, 0, 0)
        nonzero = sum(int(torch.count_nonzero(c)) for c in src.values())
        cmin = 0.0 if nonzero < total else min(float(c.min()) for c in src.values() if c.numel())
        return CoverageStats(round(cmin), self._coverage_sum / total, total - nonzero, total)


def apply_average(full: Mapping[str, torch.Tensor], averager: CoverageAverager, step: float = 1.0
                  ) -> Params:
    """full + step * coverage-average of the accumulated deltas (uncovered: unchanged)."""
    avg = averager.average()
    return {k: full[k] + step * avg[k] for k in full}
