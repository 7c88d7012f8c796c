"""Coverage-normalized averaging of submodel updates [recon: HeteroFL / FedRolex].

Every coordinate is averaged over the clients whose submodel covered it this round (optionally
weighted by sample counts); a coordinate no client covered keeps its value. Coverage C[q, j] is
the number of participating clients whose submodel holds coordinate j in round q; the minimum
over coordinates and rounds is C_x* of the paper's rate O(1/sqrt(C_x* Q)) ("Every Parameter
Matters", Zhou et al., NeurIPS 2023, for the coverage notion).
"""

from __future__ import annotations

import math
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

    Nothing is allocated before it is needed: a tensor's sum starts as its first update (no
    zero-filled accumulator), and per-coordinate weights exist only for tensors that some
    update holds in part; an update that holds a whole tensor adds its weight as a number.
    Round time was dominated by such full-model passes when most updates are small.
    """

    def __init__(self, like: Mapping[str, torch.Tensor]) -> None:
        self._like = dict(like)
        self._sum: dict[str, torch.Tensor] = {}
        self._weight: dict[str, torch.Tensor] = {}  # weights of partial slices, per coordinate
        self._count: dict[str, torch.Tensor] = {}  # their counts, once a weight is not 1
        self._weighted = False  # some weight differs from 1 (counts differ from weights)
        self._positive = True  # every weight so far > 0
        self._whole_weight = dict.fromkeys(self._like, 0.0)  # of updates holding all of it
        self._whole_count = dict.fromkeys(self._like, 0)
        self._partial_numel = dict.fromkeys(self._like, 0)  # entries added by partial slices
        self._settled = False
        self._avg: Params | None = None
        self._coverage_sum = 0  # sum of coverage over coordinates = total slice sizes added

    def add(self, slice_plan: SlicePlan, values: Mapping[str, torch.Tensor], weight: float = 1.0
            ) -> None:
        if self._settled:
            raise RuntimeError("add() after average(), counts(), covered() or stats()")
        if weight != 1.0 and not self._weighted:
            self._weighted = True
            self._count = {k: w.clone() for k, w in self._weight.items()}
        self._positive = self._positive and weight > 0
        self._coverage_sum += slice_plan.numel()
        for name in slice_plan.shapes:
            like = self._like[name]
            s = values[name].to(like.device, like.dtype)
            if slice_plan.whole[name]:
                acc = self._sum.get(name)
                if acc is None:  # the first update of this tensor is its sum so far
                    self._sum[name] = s.clone() if weight == 1.0 else torch.mul(s, weight)
                else:
                    acc.add_(s, alpha=weight)
                self._whole_weight[name] += weight
                self._whole_count[name] += 1
                continue
            self._partial_numel[name] += s.numel()
            acc = self._sum.get(name)
            if acc is None:
                acc = self._sum[name] = torch.zeros_like(like)
            wsum = self._weight.get(name)
            if wsum is None:
                wsum = self._weight[name] = torch.zeros_like(like)
                if self._weighted:
                    self._count[name] = torch.zeros_like(like)
            cnt = self._count.get(name) if self._weighted else None
            blocks = slice_plan.blocks[name]
            if blocks is not None:
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
        """Add the whole-tensor weights and counts into the per-coordinate ones (once)."""
        if self._settled:
            return
        self._settled = True
        for name, wsum in self._weight.items():
            if self._whole_count[name]:
                wsum.add_(self._whole_weight[name])
                if self._weighted:
                    self._count[name].add_(float(self._whole_count[name]))

    def _counts_of(self, name: str) -> torch.Tensor | float:
        """Per-coordinate coverage of ``name`` (a number when the same everywhere)."""
        if name in self._weight:
            return self._count[name] if self._weighted else self._weight[name]
        return float(self._whole_count[name])

    def average(self) -> Params:
        """Per coordinate: weighted mean over the clients that covered it, 0 where none did.
        The result reuses the accumulators (no copy)."""
        self._settle()
        if self._avg is None:
            avg: Params = {}
            for name, like in self._like.items():
                acc = self._sum.get(name)
                wsum = self._weight.get(name)
                if acc is None:  # no update held any of it
                    avg[name] = torch.zeros_like(like)
                elif wsum is None:  # only whole updates: one weight for every coordinate
                    w = self._whole_weight[name]
                    avg[name] = acc.div_(w) if w > 0 else acc.zero_()
                elif self._whole_count[name] and self._positive:  # every coordinate weighs > 0
                    avg[name] = acc.div_(wsum)
                else:  # uncovered coordinates hold sum 0 and weight 0: 0 / tiny = 0
                    avg[name] = acc.div_(wsum.clamp(min=torch.finfo(acc.dtype).tiny))
            self._avg = avg
        return self._avg

    def counts(self) -> dict[str, torch.Tensor]:
        """Coverage: how many clients covered each coordinate."""
        self._settle()
        out = {}
        for name, like in self._like.items():
            c = self._counts_of(name)
            out[name] = (c.round().to(torch.int32) if isinstance(c, torch.Tensor)
                         else torch.full(like.shape, round(c), dtype=torch.int32))
        return out

    def covered(self) -> dict[str, torch.Tensor]:
        self._settle()
        out = {}
        for name, like in self._like.items():
            wsum = self._weight.get(name)
            out[name] = (wsum > 0 if wsum is not None else
                         torch.full(like.shape, self._whole_weight[name] > 0, dtype=torch.bool))
        return out

    def stats(self) -> CoverageStats:
        self._settle()
        total = sum(t.numel() for t in self._like.values())
        if total == 0:
            return CoverageStats(0, 0.0, 0, 0)
        nonzero, cmin = 0, math.inf
        for name, like in self._like.items():
            if not like.numel():
                continue
            c = self._counts_of(name)
            whole = self._whole_count[name]
            if isinstance(c, torch.Tensor) and whole and self._partial_numel[name] < like.numel():
                # every coordinate is covered (a whole update), and the partial slices hold
                # fewer entries than the tensor, so some coordinate has none of them: the
                # minimum is the whole updates' count, known without a pass over the counts
                nonzero += like.numel()
                cmin = min(cmin, float(whole))
            elif isinstance(c, torch.Tensor):
                nonzero += int(torch.count_nonzero(c))
                cmin = min(cmin, float(c.min()))
            else:
                nonzero += like.numel() if c else 0
                cmin = min(cmin, c)
        cmin = 0.0 if nonzero < total else cmin
        return CoverageStats(round(cmin), self._coverage_sum / total, total - nonzero, total)


def apply_average(full: Mapping[str, torch.Tensor], averager: CoverageAverager, step: float = 1.0
                  ) -> Params:
    """full + step * coverage-average of the accumulated deltas (uncovered: unchanged)."""
    avg = averager.average()
    return {k: torch.add(full[k], avg[k], alpha=step) for k in full}
