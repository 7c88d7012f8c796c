"""Coverage-normalized averaging on hand-built cases."""

from __future__ import annotations

import torch

from rabo.aggregation import CoverageAverager, apply_average
from rabo.submodel import Axis, ParamLayout, plan


def _layout():
    return {"w": ParamLayout((4, 3), (Axis("h"), None)), "b": ParamLayout((4,), (Axis("h"),))}


def _plan(units):
    return plan(_layout(), {"h": torch.tensor(units)})


def test_single_cover_takes_that_clients_value_and_uncovered_stay() -> None:
    full = {"w": torch.zeros(4, 3), "b": torch.full((4,), 7.0)}
    avg = CoverageAverager(full)
    avg.add(_plan([0, 1]), {"w": torch.ones(2, 3), "b": torch.tensor([1.0, 2.0])})
    avg.add(_plan([1, 2]), {"w": 3 * torch.ones(2, 3), "b": torch.tensor([4.0, 5.0])})
    out = apply_average(full, avg)
    assert torch.equal(out["b"], torch.tensor([8.0, 10.0, 12.0, 7.0]))
    # unit 0 by client 1 only; unit 1 averaged (1+3)/2; unit 2 by client 2 only; unit 3 untouched
    assert torch.equal(out["w"][:, 0], torch.tensor([1.0, 2.0, 3.0, 0.0]))
    counts = avg.counts()
    assert counts["b"].tolist() == [1, 2, 1, 0]
    stats = avg.stats()
    assert stats.min == 0 and stats.zero == 3 + 1  # row 3 of w (3 entries) and b[3]
    assert stats.total == 16
    assert abs(stats.mean - (3 * (1 + 2 + 1) + (1 + 2 + 1)) / 16) < 1e-12


def test_weights_are_honoured() -> None:
    full = {"w": torch.zeros(4, 3), "b": torch.zeros(4)}
    avg = CoverageAverager(full)
    avg.add(_plan([0]), {"w": torch.ones(1, 3), "b": torch.tensor([1.0])}, weight=3.0)
    avg.add(_plan([0]), {"w": 5 * torch.ones(1, 3), "b": torch.tensor([5.0])}, weight=1.0)
    out = apply_average(full, avg)
    assert float(out["b"][0]) == (3 * 1 + 1 * 5) / 4


def test_whole_tensors_without_an_index() -> None:
    layout = {"c": ParamLayout((2,), (None,))}
    p = plan(layout, {})
    avg = CoverageAverager({"c": torch.zeros(2)})
    avg.add(p, {"c": torch.tensor([2.0, 4.0])})
    avg.add(p, {"c": torch.tensor([4.0, 8.0])})
    assert torch.equal(avg.average()["c"], torch.tensor([3.0, 6.0]))
    assert avg.stats().min == 2


def test_full_coverage_is_plain_averaging() -> None:
    gen = torch.Generator().manual_seed(0)
    deltas = [{"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen)}
              for _ in range(3)]
    avg = CoverageAverager({"w": torch.zeros(4, 3), "b": torch.zeros(4)})
    for d in deltas:
        avg.add(_plan([0, 1, 2, 3]), d)
    mean_w = sum(d["w"] for d in deltas) / 3
    assert torch.allclose(avg.average()["w"], mean_w)
    assert avg.stats().min == 3 and avg.stats().zero == 0
