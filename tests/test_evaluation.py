"""The global model's measurements (rabo.evaluation) and the consistent scaler, by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from params_util import flat, unflat

from rabo import config
from rabo.evaluation import exact_hypergradient_norm
from rabo.job import Job
from rabo.runner import simulate
from rabo.tasks import Batch

TINY = ["data.dataset=digits", "model.hidden=[12, 8]", "clients.count=3",
        "data.batch_size=0", "outer.optimizer=sgd", "rounds=2", "estimator.radius=0"]

def _client_update(scaler: str, task: str = "A", inner_steps: int = 1):
    cfg = config.load(None, [*TINY, f"task={task}", f"model.scaler={scaler}",
                             f"inner.steps={inner_steps}", "clients.ratios=[0.25]",
                             "inner.lr=0.3", "estimator.eta_v=0.2"])
    job = Job.from_config(cfg)
    state = job.engine.init_state()
    gen = torch.Generator().manual_seed(5)
    state.v = {k: 0.1 * torch.randn(t.shape, generator=gen) for k, t in state.y.items()}
    plan = job.engine.plan(1, 0, 0.25)
    a = job.engine.assign(state, plan)
    return job, a, job.engine.client_step(a, job.data.clients[0])


@pytest.mark.parametrize("task", ["A", "B"])
def test_the_consistent_scaler_scales_each_tensors_steps_by_its_kept_fraction(task: str) -> None:
    """Against a hand computation: with one inner step the y delta is -lr * frac * grad_y g of
    the forward-scaled submodel; the v delta and the hypergradient are the forward scaler's
    times frac, tensor by tensor (frac = kept entries / full entries)."""
    job, a, cons = _client_update("consistent", task)
    _, _, fwd = _client_update("forward", task)
    full_y = {n: math.prod(lay.shape) for n, lay in job.task.y_layout.items()}
    full_x = {n: math.prod(lay.shape) for n, lay in job.task.x_layout.items()}
    frac_y = {n: t.numel() / full_y[n] for n, t in a.y.items()}
    frac_x = {n: t.numel() / full_x[n] for n, t in a.x.items()}
    assert min(frac_y.values()) < 0.3 and max(frac_y.values()) == 1.0  # biases of the head
    # hand: grad_y g on the client's whole train split (batch_size 0), forward scaler on
    train = job.data.clients[0].train
    batch = Batch(train.inputs, train.labels, torch.arange(len(train)))
    ys = {n: t.clone().requires_grad_(True) for n, t in a.y.items()}
    gy = torch.autograd.grad(job.task.g(a.x, ys, batch), list(ys.values()))
    for (n, g_n) in zip(ys, gy, strict=True):
        torch.testing.assert_close(cons.y[n], -0.3 * frac_y[n] * g_n, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(cons.v[n], frac_y[n] * fwd.v[n], rtol=1e-5, atol=1e-8)
    for n in cons.x:
        torch.testing.assert_close(cons.x[n], frac_x[n] * fwd.x[n], rtol=1e-5, atol=1e-9)


def test_the_consistent_scaler_leaves_a_full_width_client_unchanged() -> None:
    cfg = config.load(None, [*TINY, "clients.ratios=[1]", "inner.steps=2", "model.scaler=none"])
    plain = simulate(cfg)
    cons = simulate(config.load(None, [*TINY, "clients.ratios=[1]", "inner.steps=2",
                                       "model.scaler=consistent"]))
    for part in ("x", "y", "v"):
        for n, t in getattr(plain.state, part).items():
            assert torch.equal(t, getattr(cons.state, part)[n])


def test_the_forward_scaler_on_a_model_without_normalization_is_warned_about(caplog) -> None:
    with caplog.at_level("WARNING", logger="rabo"):
        Job.from_config(config.load(None, [*TINY, "model.scaler=forward"]))
    assert "without normalization" in caplog.text and "consistent" in caplog.text
    with pytest.raises(config.ConfigError, match="model.scaler"):
        config.load(None, [*TINY, "model.scaler=true"])


def test_upper_loss_is_the_global_models_validation_loss_and_clients_loss_is_apart() -> None:
    cfg = config.load(None, [*TINY, "clients.ratios=[1, 0.25]", "rounds=3"])
    res = simulate(cfg)
    job = Job.from_config(cfg)
    rec = res.records[-1]
    # by hand: cross-entropy of the full-width global model over every client's val split
    logits = [job.task.logits(res.state.x, res.state.y, c.val.inputs) for c in job.data.clients]
    labels = [c.val.labels for c in job.data.clients]
    want = float(F.cross_entropy(torch.cat(logits), torch.cat(labels)))
    assert rec["upper_loss"] == pytest.approx(want, rel=1e-5)
    assert rec["client_upper_loss"] != pytest.approx(rec["upper_loss"], rel=1e-3)
    assert res.summary["upper_loss"] == rec["upper_loss"]


def test_accuracy_per_class_and_per_width_of_the_global_model() -> None:
    cfg = config.load(None, [*TINY, "clients.ratios=[1, 0.5]", "rounds=3",
                             "policy.ladder=[1, 0.5, 0.25]", "mask.policy=static"])
    res = simulate(cfg)
    job = Job.from_config(cfg)
    rec = res.records[-1]
    per_class = rec["test_acc_per_class"]
    test = job.data.test
    counts = torch.bincount(test.labels, minlength=10)
    assert len(per_class) == 10
    # the per-class accuracies recombine into the accuracy
    recombined = sum(a * int(n) for a, n in zip(per_class, counts, strict=True)) / len(test)
    assert recombined == pytest.approx(rec["test_acc"])
    assert set(rec["test_acc_per_width"]) == {"1", "0.5", "0.25"}
    assert rec["test_acc_per_width"]["1"] == rec["test_acc"]
    # width 0.25 by hand: the static prefix submodel of the global state
    half = job.model.slice_plan(job.engine.plan(3, 0, 0.25).mask)
    sub = {**{n: res.state.x[n] for n in res.state.x}, **res.state.y}
    from rabo.submodel import extract

    small = extract(sub, half)
    pred = job.model.forward(small, test.inputs).argmax(1)
    assert rec["test_acc_per_width"]["0.25"] == pytest.approx(
        float((pred == test.labels).float().mean()))


def test_the_exact_hypergradient_norm_matches_dense_hessians() -> None:
    """Task A (g strongly convex in the head y): grad Phi = grad_x f - J^T H^-1 grad_y f by
    dense Hessian blocks, against the CG-based value."""
    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[4]", "clients.count=2",
                             "data.max_samples=300", "task=A", "rounds=1",
                             "hypergradient_every=1", "task_params.mu=0.1"])
    job = Job.from_config(cfg)
    state = job.engine.init_state()
    norm, residual = exact_hypergradient_norm(job, state, torch.device("cpu"), max_iters=500,
                                              tol=1e-7)
    n_train = sum(len(c.train) for c in job.data.clients)
    n_val = sum(len(c.val) for c in job.data.clients)

    def pooled(loss, split, n):
        def fn(xv, yv):
            x, y = unflat(xv, state.x), unflat(yv, state.y)
            total = 0
            for c in job.data.clients:
                s = getattr(c, split)
                total = total + len(s) / n * loss(x, y, Batch(s.inputs, s.labels,
                                                              torch.arange(len(s))))
            return total
        return fn

    g = pooled(job.task.g, "train", n_train)
    f = pooled(job.task.f, "val", n_val)
    xv, yv = flat(state.x), flat(state.y)
    fx, fy = torch.func.grad(f, argnums=(0, 1))(xv, yv)
    hyy = torch.func.hessian(g, argnums=1)(xv, yv)
    hxy = torch.func.jacrev(torch.func.grad(g, argnums=1), argnums=0)(xv, yv)  # (dy, dx)
    want = fx - hxy.T @ torch.linalg.solve(hyy, fy)
    assert residual < 1e-5
    assert norm == pytest.approx(float(want.norm()), rel=1e-3)
    # and the round loop reports it when asked
    rec = simulate(cfg).records[-1]
    assert rec["hypergradient_norm_exact"] is not None and rec["hypergradient_norm_exact"] > 0
