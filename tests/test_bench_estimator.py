"""`rabo bench estimator` measures what it says (values, not just that it ran)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.estimator import flops_per_ratio, quadratic_errors


def test_quadratic_errors() -> None:
    errs = quadratic_errors()
    assert errs["exact"]["rel_error"] < 1e-12
    assert errs["fd-central"]["rel_error"] < 1e-8
    assert errs["fd-forward"]["rel_error"] < 1e-8
    assert 1e-6 < errs["neumann"]["rel_error"] < 1.0  # truncated: a real, bounded error


def test_flops_per_ratio_are_r_squared_on_the_layers_pruned_both_ways() -> None:
    out = flops_per_ratio()
    assert set(out) == {"mlp", "resnet", "vit"}
    # which layers are pruned on both sides, found from the FLOPs: the MLP's hidden-to-hidden
    # layers; every ResNet conv but the stem (input channels fixed) and the head (classes
    # fixed); the ViT's q/k/v, output and MLP projections (the attention products scale by
    # the heads alone)
    assert out["mlp"]["layers"] == 2 and out["vit"]["layers"] == 3 * 2
    assert out["resnet"]["layers"] == out["resnet"]["of_layers"] - 2
    for name, m in out.items():
        for r, row in m["ratios"].items():
            if name == "vit" and float(r) < 1 / 8:
                # 8 heads: ratio 1/16 keeps one head (an eighth), not a sixteenth
                assert row["pruned_vs_full"] > 1.4 * float(r) ** 2
                continue
            assert abs(row["off_r_squared"]) < 0.02, (name, r, row)  # issue 14's target
            assert row["total_vs_full"] >= row["pruned_vs_full"] - 1e-12


def test_bench_json_shape_on_a_small_workload() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rabo.cli", "bench", "estimator", "--json", "--workloads",
         "A/mlp", "--repeats", "1", "--batch", "16"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    per = out["workloads"]["A/mlp"]
    assert set(per) == {"fd-central", "fd-forward", "exact", "neumann"}
    assert per["exact"]["time_vs_exact"] == 1.0
    for r in per.values():
        assert r["time_s"] > 0 and r["peak_bytes"] >= 0
    assert set(out["quadratic"]) == set(per)
    assert {t["workload"] for t in out["targets"]} == {"A/mlp"}
