"""What the coordinator measures of the global model, the same on every transport.

Every figure here is of the *full-width global model* (x, y), never of a client's submodel:

* ``test_acc`` / ``test_loss`` on the global test set, and ``test_acc_per_class`` (where a
  non-iid gap comes from);
* ``upper_loss``: the upper-level objective, the cross-entropy of the global model on the
  pooled validation splits of all clients (the clients' own submodel losses, reported with their
  updates, are a different quantity: ``client_upper_loss`` in the round record);
* ``test_acc_per_width``: the accuracy of the global model's submodel at each ratio of the
  ladder, as HeteroFL reports it (the round's mask for client 0, so rolling windows move);
* ``hypergradient_norm_exact`` (every ``hypergradient_every`` rounds): the norm of the exact,
  full-batch hypergradient of Phi at the global (x, y), grad_x f - J^T H^-1 grad_y f with H v =
  grad_y f solved by conjugate gradients on exact Hessian-vector products. The coverage
  experiment fits the convergence rate on it (not on the clients' stochastic estimates).

The coordinator builds the same :class:`rabo.job.Job` as every worker, so it holds every
client's validation and train split without any of it crossing the wire.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from rabo.engine import GlobalState
from rabo.estimators import Problem, grads
from rabo.estimators.exact import second_order_products
from rabo.params import Params
from rabo.submodel import extract
from rabo.tasks import Batch


@dataclass(frozen=True)
class Evaluation:
    """One round's measurements of the global model (see the module docstring)."""

    test_acc: float
    test_loss: float
    upper_loss: float
    test_acc_per_class: list[float | None]  # None: the class has no test sample
    test_acc_per_width: dict[str, float] = field(default_factory=dict)  # "0.125" -> accuracy
    hypergradient_norm_exact: float | None = None
    cg_residual: float | None = None  # relative residual of the CG solve behind it

    def as_record(self) -> dict[str, Any]:
        return {"test_acc": self.test_acc, "test_loss": self.test_loss,
                "upper_loss": self.upper_loss,
                "test_acc_per_class": self.test_acc_per_class,
                "test_acc_per_width": self.test_acc_per_width,
                "hypergradient_norm_exact": self.hypergradient_norm_exact,
                "hypergradient_cg_residual": self.cg_residual}


EMPTY_RECORD: dict[str, Any] = {k: None for k in Evaluation(0.0, 0.0, 0.0, []).as_record()}


def due(cfg: Any, round: int) -> bool:
    """Whether round ``round`` evaluates the global model: every ``eval_every`` and the last."""
    return round % cfg.eval_every == 0 or round == cfg.rounds


def evaluate_round(job: Any, state: GlobalState, device: torch.device | str = "cpu"
                   ) -> Evaluation:
    """Every measurement of the global ``state`` that ``job``'s config asks for this round."""
    cfg, task, data = job.cfg, job.task, job.data
    device = torch.device(device)
    classes = data.num_classes
    if state.y_clients:  # personalized: each trained client's own head (the shared y never trains)
        scored = [score(task, state.x, y, data.test, classes, device)
                  for _, y in sorted(state.y_clients.items())]
        acc = sum(s[0] for s in scored) / len(scored)
        loss = sum(s[1] for s in scored) / len(scored)
        per_class = _mean_per_class([s[2] for s in scored])
        widths: dict[str, float] = {}
    else:
        acc, loss, per_class = score(task, state.x, state.y, data.test, classes, device)
        # ratio 1 is the full model just scored: not evaluated a second time
        widths = {f"{r:g}": acc if r == 1.0 else accuracy_at_width(job, state, r, device)
                  for r in width_ratios(cfg)}
    norm = residual = None
    every = cfg.hypergradient_every
    if every and (state.round % every == 0 or state.round == cfg.rounds) and not state.y_clients:
        norm, residual = exact_hypergradient_norm(job, state, device)
    return Evaluation(acc, loss, upper_loss(job, state, device), per_class, widths, norm,
                      residual)


def width_ratios(cfg: Any) -> list[float]:
    """The ratios whose submodels are scored: the ladder and any fixed client ratios."""
    return sorted({*cfg.policy.ladder, *(cfg.clients.ratios or [])}, reverse=True)


@torch.no_grad()
def score(task: Any, x: Params, y: Params, test: Any, classes: int,
          device: torch.device, batch: int = 2048) -> tuple[float, float, list[float | None]]:
    """(accuracy, mean cross-entropy, accuracy per class) of the model (x, y) on ``test``."""
    xs = {k: t.to(device) for k, t in x.items()}
    ys = {k: t.to(device) for k, t in y.items()}
    correct = torch.zeros(classes, dtype=torch.int64)
    total = torch.zeros(classes, dtype=torch.int64)
    loss = 0.0
    n = len(test)
    for i in range(0, n, batch):
        inputs = test.inputs[i:i + batch].to(device)
        labels = test.labels[i:i + batch].to(device)
        logits = task.logits(xs, ys, inputs)
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        hit = (logits.argmax(1) == labels).cpu()
        lab = labels.cpu()
        total += torch.bincount(lab, minlength=classes)[:classes]
        correct += torch.bincount(lab[hit], minlength=classes)[:classes]
    per_class = [None if int(t) == 0 else int(c) / int(t)
                 for c, t in zip(correct.tolist(), total.tolist(), strict=True)]
    return int(correct.sum()) / max(n, 1), loss / max(n, 1), per_class


def _mean_per_class(rows: list[list[float | None]]) -> list[float | None]:
    out: list[float | None] = []
    for values in zip(*rows, strict=True):
        known = [v for v in values if v is not None]
        out.append(sum(known) / len(known) if known else None)
    return out


@torch.no_grad()
def accuracy_at_width(job: Any, state: GlobalState, ratio: float, device: torch.device
                      ) -> float:
    """Test accuracy of the global model's submodel at ``ratio`` (the round's mask of client
    0; the model's scaler applies as on a client)."""
    plan = job.engine.plan(max(state.round, 1), 0, ratio)
    x = extract(state.x, plan.x) if set(plan.x.shapes) == set(state.x) else state.x
    y = extract(state.y, plan.y)
    acc, _, _ = score(job.task, x, y, job.data.test, job.data.num_classes, device)
    return acc


def _lower(state: GlobalState, client_id: int) -> Params:
    return state.y_clients.get(client_id, state.y)


@torch.no_grad()
def upper_loss(job: Any, state: GlobalState, device: torch.device) -> float:
    """Mean cross-entropy of the global model over every client's validation samples (under
    ``lower_level: personalized``, each client's own y on its own samples)."""
    task = job.task
    total, count = 0.0, 0
    xs = {k: t.to(device) for k, t in state.x.items()}
    for cid, client in enumerate(job.data.clients):
        val = client.val
        if len(val) == 0:
            continue
        ys = {k: t.to(device) for k, t in _lower(state, cid).items()}
        logits = task.logits(xs, ys, val.inputs.to(device))
        total += float(F.cross_entropy(logits, val.labels.to(device), reduction="sum"))
        count += len(val)
    return total / max(count, 1)


def _pooled_problem(job: Any, device: torch.device) -> Problem:
    """f and g over every client's whole split: the sample-weighted means of the f_i and g_i
    (each g_i sees only its own client's part of x, as on a worker)."""
    task = job.task
    parts = []
    n_train = sum(len(c.train) for c in job.data.clients)
    n_val = sum(len(c.val) for c in job.data.clients)
    for cid, c in enumerate(job.data.clients):
        train, val = c.train.to(device), c.val.to(device)
        parts.append((task.x_names_for(cid),
                      Batch(train.inputs, train.labels, torch.arange(len(train), device=device)),
                      len(train) / max(n_train, 1),
                      Batch(val.inputs, val.labels, torch.arange(len(val), device=device)),
                      len(val) / max(n_val, 1)))

    def f(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * task.f({n: x[n] for n in names}, y, b)
                   for names, _, _, b, w in parts if w > 0)  # type: ignore[return-value]

    def g(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * task.g({n: x[n] for n in names}, y, b)
                   for names, b, w, _, _ in parts if w > 0)  # type: ignore[return-value]

    return Problem(f=f, g=g)


def exact_hypergradient_norm(job: Any, state: GlobalState, device: torch.device,
                             max_iters: int = 100, tol: float = 1e-6
                             ) -> tuple[float, float]:
    """(||grad Phi||, relative CG residual) at the global (x, y), full batch.

    grad Phi = grad_x f - (d2 g / dx dy) v with (d2 g / dy2) v = grad_y f, solved by conjugate
    gradients (g is strongly convex in y for tasks A and B) to ``tol`` relative residual or
    ``max_iters`` exact Hessian-vector products, whichever comes first.
    """
    problem = _pooled_problem(job, device)
    x = {k: t.to(device) for k, t in state.x.items()}
    y = {k: t.to(device) for k, t in state.y.items()}
    fx, fy = grads(problem.f, x, y)

    def hvp(p: Params) -> Params:
        return second_order_products(problem, x, y, p, need_x=False)[1]

    v = {k: torch.zeros_like(t) for k, t in fy.items()}
    r = {k: t.clone() for k, t in fy.items()}
    p = {k: t.clone() for k, t in r.items()}
    b_norm = math.sqrt(sum(float(torch.sum(t * t)) for t in fy.values())) or 1.0
    rr = sum(float(torch.sum(t * t)) for t in r.values())
    for _ in range(max_iters):
        if math.sqrt(rr) <= tol * b_norm:
            break
        hp = hvp(p)
        php = sum(float(torch.sum(p[k] * hp[k])) for k in p)
        if php <= 0:  # not positive definite along p: stop with what we have
            break
        alpha = rr / php
        v = {k: v[k] + alpha * p[k] for k in v}
        r = {k: r[k] - alpha * hp[k] for k in r}
        rr_new = sum(float(torch.sum(t * t)) for t in r.values())
        p = {k: r[k] + (rr_new / rr) * p[k] for k in p}
        rr = rr_new
    jv, _ = second_order_products(problem, x, y, v)
    h2 = sum(float(torch.sum((fx[k] - jv[k]) ** 2)) for k in fx)
    return math.sqrt(h2), math.sqrt(rr) / b_norm
