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


def test_flops_per_ratio_are_r_squared_on_hidden_layers() -> None:
    for r, row in flops_per_ratio().items():
        assert abs(row["hidden_vs_full"] - float(r) ** 2) < 1e-9


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
