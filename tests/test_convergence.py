"""Task A on the real MNIST test set: the central claim, pinned past the warm-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import mnist_available

from rabo import config
from rabo.runner import simulate

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 100  # past the warm-up of this setting (accuracy rises steeply until about round 50)
MARGIN_OVER_EXCLUSION = 0.01  # measured 0.023 and 0.0245 (seeds 0 and 1)
GAP_TO_FULL = 0.025  # measured 0.0105 and 0.0025


@pytest.mark.slow
@pytest.mark.skipif(not mnist_available(), reason="the bundled MNIST test set is not present")
def test_small_clients_improve_the_model_past_the_warm_up() -> None:
    """The project's central claim at reduced size (configs/mnist-10clients.yaml: 10 clients at
    ratios 1, 1/2, 1/4, 1/8, rolling masks, consistent scaler), past the warm-up: training
    the small clients' submodels beats leaving them out, and stays near the full model.
    Measured on this project's CPU machines at 100 rounds: mixed 0.9175, exclusion 0.8945,
    full 0.928 (seed 0); 0.925 / 0.9005 / 0.9275 (seed 1). At 20 rounds the three were
    within 1.4 points of each other (0.861 / 0.8545 / 0.8685): the warm-up."""
    base = ROOT / "configs" / "mnist-10clients.yaml"
    common = [f"rounds={ROUNDS}", f"eval_every={ROUNDS}"]

    def acc(*over: str) -> float:
        return simulate(config.load(base, [*common, *over])).summary["test_acc"]

    mixed = acc()
    excl = acc("clients.mode=exclusion")
    full = acc("clients.mode=full")
    assert full >= 0.90, f"all-ratio-1 accuracy regressed: {full:.4f}"
    assert mixed >= 0.89, f"mixed-ratio accuracy regressed: {mixed:.4f}"
    assert mixed - excl >= MARGIN_OVER_EXCLUSION, (
        f"mixed {mixed:.4f} vs exclusion {excl:.4f} (full {full:.4f})")
    assert full - mixed <= GAP_TO_FULL, f"mixed {mixed:.4f} vs full {full:.4f}"
