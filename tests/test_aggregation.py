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


def test_lazy_accumulators_match_a_dense_reference_on_random_rounds() -> None:
    """Whole and partial slices, blocks and scattered indices, weights of 1, other weights and
    0, tensors nobody covers: average, counts, covered and stats equal a plain dense
    computation over explicit masks."""
    layout = {"w": ParamLayout((6, 5), (Axis("h"), None)), "b": ParamLayout((6,), (Axis("h"),)),
              "u": ParamLayout((3,), (None,))}
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        full = {k: torch.randn(lay.shape, generator=gen) for k, lay in layout.items()}
        avg = CoverageAverager(full)
        ref_sum = {k: torch.zeros(lay.shape, dtype=torch.float64) for k, lay in layout.items()}
        ref_w = {k: torch.zeros(lay.shape, dtype=torch.float64) for k, lay in layout.items()}
        ref_c = {k: torch.zeros(lay.shape, dtype=torch.int32) for k, lay in layout.items()}
        cover_u = trial % 3 != 0  # "u" has no prunable axis: whole or absent
        for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
            k = int(torch.randint(1, 7, (1,), generator=gen))
            units = torch.randperm(6, generator=gen)[:k].sort().values
            if trial % 2:  # contiguous runs (blocks) instead of scattered units
                units = torch.arange(k)
            sp = plan({n: lay for n, lay in layout.items() if n != "u" or cover_u},
                      {"h": units})
            weight = [1.0, 2.5, 0.0][int(torch.randint(0, 3, (1,), generator=gen))]
            values = {n: torch.randn(shape, generator=gen) for n, shape in sp.shapes.items()}
            avg.add(sp, values, weight)
            for n in sp.shapes:
                mask = torch.zeros(layout[n].shape, dtype=torch.bool)
                if n == "u":
                    mask[:] = True
                else:
                    mask[units] = True
                ref_sum[n][mask] += weight * values[n].double().reshape(-1)
                ref_w[n][mask] += weight
                ref_c[n][mask] += 1
        stats = avg.stats()
        counts, covered = avg.counts(), avg.covered()
        out = avg.average()
        for n in layout:
            want = torch.where(ref_w[n] > 0, ref_sum[n] / ref_w[n].clamp(min=1e-300),
                               torch.zeros_like(ref_sum[n]))
            assert torch.allclose(out[n].double(), want, atol=1e-5), (trial, n)
            assert torch.equal(counts[n], ref_c[n]), (trial, n)
            assert torch.equal(covered[n], ref_w[n] > 0), (trial, n)
        flat_c = torch.cat([c.reshape(-1) for c in ref_c.values()])
        assert stats.total == flat_c.numel()
        assert stats.zero == int((flat_c == 0).sum())
        assert stats.min == int(flat_c.min())
        assert abs(stats.mean - float(flat_c.double().mean())) < 1e-12
