"""Masks, submodel extraction and scattering, dual pruning."""

from __future__ import annotations

import math

import pytest
import torch

from rabo.errors import ShapeError
from rabo.masks import MaskSpec, client_mask_seed, kept_count, kept_units
from rabo.models import build_model
from rabo.submodel import check_slices, extract, plan, scatter
from rabo.tasks import HyperparameterLearning, HyperRepresentation

WIDTHS = {"fc0": 40, "fc1": 24}


def test_kept_count() -> None:
    assert kept_count(1.0, 200) == 200
    assert kept_count(0.125, 200) == 25
    assert kept_count(0.1, 30) == 3  # not 4 from 0.1 * 30 = 3.0000000000000004
    assert kept_count(0.01, 30) == 1  # never empty
    assert kept_count(0.5, 7) == 4  # ceil


@pytest.mark.parametrize("policy", ["static", "rolling", "random"])
def test_indices_are_deterministic_sorted_and_sized(policy: str) -> None:
    spec = MaskSpec(policy, 0.25, round=3, seed=11)
    a, b = kept_units(spec, WIDTHS), kept_units(spec, WIDTHS)
    for g, w in WIDTHS.items():
        assert torch.equal(a[g], b[g])
        assert a[g].numel() == kept_count(0.25, w)
        assert torch.all(a[g][1:] > a[g][:-1])  # sorted, no repeats
        assert int(a[g].min()) >= 0 and int(a[g].max()) < w


def test_static_is_a_prefix_and_round_independent() -> None:
    a = kept_units(MaskSpec("static", 0.5, 1), WIDTHS)
    b = kept_units(MaskSpec("static", 0.5, 9), WIDTHS)
    assert torch.equal(a["fc0"], torch.arange(20)) and torch.equal(a["fc0"], b["fc0"])


def test_rolling_with_a_fixed_stride_moves_with_the_round_and_wraps() -> None:
    def window(q: int) -> torch.Tensor:
        return kept_units(MaskSpec("rolling", 0.25, q, stride=1), WIDTHS)["fc0"]

    assert not torch.equal(window(1), window(2))
    assert torch.equal(window(1), torch.arange(1, 11))
    assert torch.equal(window(35), torch.tensor([0, 1, 2, 3, 4, 35, 36, 37, 38, 39]))
    # over `width` rounds every unit is covered equally often
    counts = torch.zeros(40)
    for q in range(40):
        counts[window(q)] += 1
    assert torch.all(counts == 10)


def test_the_default_rolling_step_is_tied_to_the_layer_width() -> None:
    spec = MaskSpec("rolling", 0.125, round=1)
    assert spec.step(256, kept_count(0.125, 256)) == 32  # ceil(256 / 8)
    assert spec.step(250, kept_count(0.125, 250)) == 32
    assert spec.step(256, kept_count(0.0625, 256)) == 16  # a smaller window moves by its size
    assert MaskSpec("rolling", 0.125, 1, stride=3).step(256, 32) == 3  # a fixed stride wins
    assert torch.equal(kept_units(spec, {"fc0": 256})["fc0"], torch.arange(32, 64))


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125, 0.0625])
@pytest.mark.parametrize("widths", [{"fc0": 256, "fc1": 256}, {"fc0": 200, "fc1": 37},
                                    {"conv0": 32, "conv1": 64, "fc0": 1000}])
@pytest.mark.parametrize("layer_shift", [False, True])
def test_a_rolling_window_visits_every_unit_within_the_stated_rounds(
        ratio: float, widths: dict[str, int], layer_shift: bool) -> None:
    """The documented rule: with the default step a window visits every unit of every layer
    within ceil((width - k) / step) + 1 consecutive rounds, at most max(8, ceil(width / k))
    (twice that less one with layer_shift, whose sweeps start at fixed rounds)."""
    from rabo.masks import rounds_to_visit_all

    def spec(q: int) -> MaskSpec:
        return MaskSpec("rolling", ratio, q, layer_shift=layer_shift)

    for group, width in widths.items():
        k = kept_count(ratio, width)
        bound = rounds_to_visit_all(spec(0), width)
        one_sweep = max(8, math.ceil(width / k))
        assert bound is not None and bound <= (2 * one_sweep - 1 if layer_shift else one_sweep)
        for first in (1, 5, 13, 40):  # from any starting round
            seen = torch.zeros(width, dtype=torch.bool)
            for q in range(first, first + bound):
                seen[kept_units(spec(q), widths)[group]] = True
            assert bool(seen.all()), (group, width, ratio, first)
            # and not before: one round fewer leaves a unit out (the bound is tight)
            if bound > 1 and not layer_shift:
                seen[:] = False
                for q in range(first, first + bound - 1):
                    seen[kept_units(spec(q), widths)[group]] = True
                assert not bool(seen.all())


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125])
def test_layer_shift_lets_a_small_window_reach_every_block_of_a_hidden_weight(
        ratio: float) -> None:
    """Without the shift, consecutive layers' windows move together, so a 1/8 client only
    ever touches the diagonal blocks (1/8) of a 256x256 hidden-to-hidden weight; with it,
    every entry within (sweep positions)^2 rounds."""
    widths = {"fc0": 256, "fc1": 256}
    spec = MaskSpec("rolling", ratio, 0)
    positions = math.ceil(256 / spec.step(256, kept_count(ratio, 256)))  # 8 sweep positions

    def covered(layer_shift: bool, rounds: int) -> float:
        seen = torch.zeros(256, 256, dtype=torch.bool)
        for q in range(1, rounds + 1):
            k = kept_units(MaskSpec("rolling", ratio, q, layer_shift=layer_shift), widths)
            seen[k["fc1"][:, None], k["fc0"][None, :]] = True
        return float(seen.float().mean())

    assert covered(True, positions * positions + positions) == 1.0
    without = covered(False, 200)
    assert without < 1.0
    if ratio == 0.125:
        assert without == 0.125  # exactly the 8 diagonal 32x32 blocks


def test_a_stride_larger_than_the_window_is_reported_as_skipping_units() -> None:
    from rabo.masks import rounds_to_visit_all

    assert rounds_to_visit_all(MaskSpec("rolling", 0.125, 0, stride=64), 256) is None


def test_random_differs_across_rounds_and_clients() -> None:
    base = kept_units(MaskSpec("random", 0.25, 1, seed=client_mask_seed(0, 1)), WIDTHS)["fc0"]
    other_round = kept_units(MaskSpec("random", 0.25, 2, seed=client_mask_seed(0, 1)), WIDTHS)
    other_client = kept_units(MaskSpec("random", 0.25, 1, seed=client_mask_seed(0, 2)), WIDTHS)
    assert not torch.equal(base, other_round["fc0"])
    assert not torch.equal(base, other_client["fc0"])


def test_bad_mask_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="policy"):
        MaskSpec("bogus", 0.5, 0)
    with pytest.raises(ValueError, match="ratio"):
        MaskSpec("static", 0.0, 0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("policy", ["static", "rolling", "random"])
def test_scatter_extract_roundtrip(kind: str, policy: str) -> None:
    model = build_model(kind, (1, 8, 8), 10, [24, 16] if kind == "mlp" else [12], [6, 8])
    full = model.init(0)
    mask = MaskSpec(policy, 0.5, round=4, seed=7)
    sp = model.slice_plan(mask)
    sub = extract(full, sp)
    marked = {k: t + 100.0 for k, t in sub.items()}
    out = scatter(full, sp, marked)
    changed = sum(int((out[k] != full[k]).sum()) for k in full)
    assert changed == sp.numel()  # exactly the kept entries changed ...
    again = extract(out, sp)
    for k in sub:
        assert torch.equal(again[k], marked[k])  # ... to the scattered values
    # adding deltas back
    added = scatter(full, sp, {k: torch.ones_like(t) for k, t in sub.items()}, add=True)
    assert sum(float((added[k] - full[k]).sum()) for k in full) == pytest.approx(sp.numel())


def test_ratio_one_is_the_whole_model() -> None:
    model = build_model("mlp", (1, 8, 8), 10, [24, 16])
    full = model.init(0)
    sub = model.extract(full, 1.0, "random", round=3, seed=2)
    assert all(torch.equal(sub[k], full[k]) for k in full)


def test_submodel_is_the_pruned_network() -> None:
    """The slices are contiguous and run forward as the network restricted to kept units."""
    model = build_model("mlp", (1, 4, 4), 3, [8, 6])
    full = model.init(1)
    mask = MaskSpec("rolling", 0.5, round=3)
    kept = model.kept(mask)
    sub = extract(full, model.slice_plan(mask))
    assert sub["fc0.weight"].shape == (4, 16) and sub["fc1.weight"].shape == (3, 4)
    assert sub["head.weight"].shape == (3, 3) and sub["head.bias"].shape == (3,)
    assert all(t.is_contiguous() for t in sub.values())
    assert torch.equal(sub["fc1.weight"], full["fc1.weight"][kept["fc1"]][:, kept["fc0"]])
    # zeroing dropped units in the full model gives the same logits as the submodel
    masked = {k: t.clone() for k, t in full.items()}
    drop0 = torch.ones(8, dtype=torch.bool)
    drop0[kept["fc0"]] = False
    drop1 = torch.ones(6, dtype=torch.bool)
    drop1[kept["fc1"]] = False
    masked["fc0.weight"][drop0] = 0
    masked["fc0.bias"][drop0] = 0
    masked["fc1.weight"][drop1] = 0
    masked["fc1.bias"][drop1] = 0
    inputs = torch.randn(5, 1, 4, 4)
    assert torch.allclose(model.forward(sub, inputs), model.forward(masked, inputs), atol=1e-6)


def test_cnn_flatten_columns_follow_channels() -> None:
    model = build_model("cnn", (1, 8, 8), 10, [], [4, 6])  # 8x8 -> 4x4 -> 2x2
    full = model.init(0)
    mask = MaskSpec("static", 0.5, 0)
    sub = extract(full, model.slice_plan(mask))
    assert sub["conv1.weight"].shape == (3, 2, 3, 3)
    assert sub["head.weight"].shape == (10, 3 * 4)
    assert torch.equal(sub["head.weight"], full["head.weight"][:, :12])  # channels 0..2 x 4 px


def test_dual_pruning_task_a_head_follows_backbone() -> None:
    model = build_model("mlp", (1, 4, 4), 5, [10, 8])
    task = HyperRepresentation(model, mu=0.1)
    mask = MaskSpec("rolling", 0.25, round=2)
    xp, yp = task.x_plan(mask, 0), task.y_plan(mask)
    assert xp.shapes["fc1.weight"] == (2, 3)
    assert yp.shapes["head.weight"] == (5, 2)  # head columns = kept units of fc1
    kept = model.kept(mask)["fc1"]
    x, y = task.init(0)
    assert torch.equal(extract(y, yp)["head.weight"], y["head.weight"][:, kept])


def test_dual_pruning_task_b_same_indices_for_x_and_y() -> None:
    model = build_model("mlp", (1, 4, 4), 5, [10, 8])
    task = HyperparameterLearning(model, log_l2_init=-3.0)
    mask = MaskSpec("random", 0.5, round=1, seed=3)
    xp, yp = task.x_plan(mask, 0), task.y_plan(mask)
    for k in yp.index:
        assert xp.shapes[k] == yp.shapes[k]
        if yp.index[k] is not None:
            assert torch.equal(xp.index[k], yp.index[k])


def test_check_slices_names_the_problem() -> None:
    model = build_model("mlp", (1, 4, 4), 5, [10])
    sp = model.slice_plan(MaskSpec("static", 0.5, 0))
    sub = extract(model.init(0), sp)
    sub["fc0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ShapeError, match="fc0.weight has shape"):
        check_slices(sub, sp)
    del sub["fc0.weight"]
    with pytest.raises(ShapeError, match="missing tensors"):
        check_slices(sub, sp)


def test_plan_handles_unpruned_tensors() -> None:
    model = build_model("mlp", (1, 4, 4), 5, [10])
    sp = plan(model.layout, model.kept(MaskSpec("static", 0.3, 0)))
    assert sp.index["head.bias"] is None  # classes are never pruned
    assert sp.shapes["fc0.weight"] == (3, 16)  # inputs are never pruned
