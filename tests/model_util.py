"""What every model's tests check the same way: fd-central's hypergradient against exact
second-order products on task A or B of that model, on random 8x8 batches."""

from __future__ import annotations

import torch
from params_util import flat

from rabo.estimators import ESTIMATORS, Problem
from rabo.tasks import Batch, HyperparameterLearning, HyperRepresentation


def fd_central_error(model, task_kind: str, seed: int = 1) -> float:
    """Relative error of fd-central (delta 1e-2) against exact products."""
    task = (HyperRepresentation(model, mu=0.05) if task_kind == "A"
            else HyperparameterLearning(model, log_l2_init=-2.0))
    x, y = task.init(0)
    gen = torch.Generator().manual_seed(seed)
    tr = Batch(torch.randn(32, 1, 8, 8, generator=gen),
               torch.randint(0, 10, (32,), generator=gen), torch.arange(32))
    va = Batch(torch.randn(16, 1, 8, 8, generator=gen),
               torch.randint(0, 10, (16,), generator=gen), torch.arange(16))
    problem = Problem(f=lambda a, b: task.f(a, b, va), g=lambda a, b: task.g(a, b, tr))
    v = {k: torch.randn(t.shape, generator=gen) * 0.1 for k, t in y.items()}
    exact = ESTIMATORS["exact"](eta_v=0.1, radius=0.0).estimate(problem, x, y, v)
    fd = ESTIMATORS["fd-central"](eta_v=0.1, radius=0.0, delta=1e-2).estimate(problem, x, y, v)
    return float(torch.linalg.norm(flat(fd.hypergradient) - flat(exact.hypergradient))
                 / torch.linalg.norm(flat(exact.hypergradient)))


def shipped_config_curve(name: str, overrides: list[str]) -> list[float]:
    """Test accuracy every 5 rounds of 30 rounds of ``configs/<name>`` on digits; asserts
    that every client kept its ratio of 1, 1/2, 1/4, 1/8."""
    from pathlib import Path

    from rabo import config
    from rabo.runner import simulate

    root = Path(__file__).resolve().parents[1]
    cfg = config.load(root / "configs" / name,
                      ["data.dataset=digits", "rounds=30", "eval_every=5", *overrides])
    records = simulate(cfg).records
    assert [c["ratio"] for c in records[-1]["clients"]] == [1.0, 0.5, 0.25, 0.125]
    return [r["test_acc"] for r in records if r["test_acc"] is not None]


def assert_scatter_restores(params, slice_plan, sub) -> None:
    """Scattering a submodel into a NaN-filled model writes exactly its kept entries, and
    they equal the full model's."""
    from rabo.submodel import scatter

    back = scatter({k: torch.full_like(t, float("nan")) for k, t in params.items()},
                   slice_plan, sub)
    kept = {k: ~torch.isnan(t) for k, t in back.items()}
    assert all(torch.equal(back[k][kept[k]], params[k][kept[k]]) for k in back)
    assert sum(int(m.sum()) for m in kept.values()) == slice_plan.numel()
