"""Hypergradient estimators against closed forms and against each other."""

from __future__ import annotations

import pytest
import torch

from bench.quadratic import Quadratic
from rabo.config import EstimatorConfig
from rabo.estimators import ESTIMATORS, Problem, grads, make_estimator, project
from rabo.estimators.exact import second_order_products
from rabo.models import build_model
from rabo.tasks import Batch, HyperparameterLearning, HyperRepresentation

torch.set_default_dtype(torch.float32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture
def quad() -> Quadratic:
    return Quadratic.random(nx=6, ny=8, seed=3, cond=8.0)


@pytest.mark.parametrize("name", ["exact", "fd-central"])
def test_exact_and_central_match_closed_form(quad: Quadratic, name: str) -> None:
    x = torch.linspace(-1, 2, 6, dtype=torch.float64)
    est = ESTIMATORS[name](eta_v=0.1, radius=0.0, delta=1e-2)
    out = est.estimate(quad.problem(), {"x": x}, {"y": quad.y_star(x)}, {"y": quad.v_star(x)})
    assert _rel(out.hypergradient["x"], quad.hypergradient(x)) < 1e-8
    # v* solves H v = grad_y f, so the v step leaves it where it is
    assert _rel(out.v["y"], quad.v_star(x)) < 1e-8


def test_products_are_exact_for_any_v(quad: Quadratic) -> None:
    """At an arbitrary (y, v) the central difference equals H v and C v (g is quadratic)."""
    x = torch.randn(6, dtype=torch.float64)
    y = torch.randn(8, dtype=torch.float64)
    v = torch.randn(8, dtype=torch.float64) * 3
    est = ESTIMATORS["fd-central"](eta_v=0.25, radius=0.0, delta=1e-2)
    out = est.estimate(quad.problem(), {"x": x}, {"y": y}, {"y": v})
    fx = quad.lam * x
    fy = y - quad.b
    assert _rel(out.hypergradient["x"], fx - quad.C @ v) < 1e-8
    assert _rel(out.v["y"], v - 0.25 * (quad.H @ v - fy)) < 1e-8
    jv, hv = second_order_products(quad.problem(), {"x": x}, {"y": y}, {"y": v})
    assert _rel(hv["y"], quad.H @ v) < 1e-12 and _rel(jv["x"], quad.C @ v) < 1e-12


def test_forward_difference_within_rounding_bound(quad: Quadratic) -> None:
    """Forward differences are exact on a quadratic up to rounding: error ~ eps * |grad| / d."""
    x = torch.linspace(-1, 2, 6, dtype=torch.float64)
    y, v = quad.y_star(x), quad.v_star(x)
    est = ESTIMATORS["fd-forward"](eta_v=0.1, radius=0.0, delta=1e-2)
    out = est.estimate(quad.problem(), {"x": x}, {"y": y}, {"y": v})
    bound = 1e3 * torch.finfo(torch.float64).eps / 1e-2
    assert _rel(out.hypergradient["x"], quad.hypergradient(x)) < bound
    # given the inner step's gradient, the result is the same
    base = grads(quad.problem().g, {"x": x}, {"y": y})
    out2 = est.estimate(quad.problem(), {"x": x}, {"y": y}, {"y": v}, base)
    assert torch.allclose(out.hypergradient["x"], out2.hypergradient["x"], rtol=1e-12)


@pytest.mark.parametrize("terms", [1, 3, 5, 20])
def test_neumann_equals_truncated_series_and_its_bound(quad: Quadratic, terms: int) -> None:
    x = torch.linspace(-1, 2, 6, dtype=torch.float64)
    y = quad.y_star(x)
    eta = 0.1
    est = ESTIMATORS["neumann"](eta_v=0.1, radius=0.0, neumann_terms=terms, neumann_eta=eta)
    h = est.estimate(quad.problem(), {"x": x}, {"y": y}, {"y": torch.zeros(8, dtype=x.dtype)}
                     ).hypergradient["x"]
    assert _rel(h, quad.neumann_hypergradient(x, y, terms, eta)) < 1e-10
    # analytic truncation error: ||C (I - eta H)^N v*|| <= ||C|| (1 - eta * lambda_min)^N ||v*||
    lam_min = float(torch.linalg.eigvalsh(quad.H).min())
    bound = (torch.linalg.matrix_norm(quad.C, 2) * (1 - eta * lam_min) ** terms
             * torch.linalg.norm(quad.v_star(x)))
    err = torch.linalg.norm(h - quad.hypergradient(x))
    assert err <= bound * (1 + 1e-9)
    if terms == 20:
        assert err < torch.linalg.norm(quad.hypergradient(x))  # converging


def test_projection_onto_ball() -> None:
    v = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    p = project(v, 1.0)
    assert torch.allclose(p["a"], torch.tensor([0.6, 0.8]))
    assert project(v, 10.0)["a"] is v["a"]
    assert project(v, 0.0)["a"] is v["a"]  # 0: no projection


def test_v_step_is_projected(quad: Quadratic) -> None:
    x = torch.zeros(6, dtype=torch.float64)
    y = torch.ones(8, dtype=torch.float64) * 50
    est = ESTIMATORS["exact"](eta_v=1.0, radius=0.5)
    out = est.estimate(quad.problem(), {"x": x}, {"y": y}, {"y": torch.zeros(8, dtype=x.dtype)})
    assert float(torch.linalg.norm(out.v["y"])) == pytest.approx(0.5)


def _task_a_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 8, 8), 10, [32, 24])
    task = HyperRepresentation(model, mu=0.05)
    x, y = task.init(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tr = Batch(torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen),
               torch.arange(64))
    va = Batch(torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen),
               torch.arange(32))
    v = {k: torch.randn(t.shape, generator=gen) for k, t in y.items()}
    return task, Problem(f=lambda a, b: task.f(a, b, va), g=lambda a, b: task.g(a, b, tr)), x, y, v


def test_central_matches_exact_on_task_a_mlp_float32() -> None:
    task, problem, x, y, v = _task_a_problem()
    exact = ESTIMATORS["exact"](eta_v=0.3, radius=0.0).estimate(problem, x, y, v)
    fd = ESTIMATORS["fd-central"](eta_v=0.3, radius=0.0, delta=1e-2).estimate(problem, x, y, v)
    flat = lambda p: torch.cat([t.reshape(-1) for t in p.values()])  # noqa: E731
    assert _rel(flat(fd.hypergradient), flat(exact.hypergradient)) < 1e-3
    assert _rel(flat(fd.v), flat(exact.v)) < 1e-3
    # and a wrong products would be caught: the hypergradient is not just grad_x f
    fx, _ = grads(problem.f, x, y)
    assert _rel(flat(fx), flat(exact.hypergradient)) > 1e-2


def test_forward_is_first_order_accurate_on_task_a() -> None:
    task, problem, x, y, v = _task_a_problem(1)
    exact = ESTIMATORS["exact"](eta_v=0.3, radius=0.0).estimate(problem, x, y, v)
    flat = lambda p: torch.cat([t.reshape(-1) for t in p.values()])  # noqa: E731
    errs = []
    for delta in (1e-1, 1e-2):
        fwd = ESTIMATORS["fd-forward"](eta_v=0.3, radius=0.0, delta=delta)
        errs.append(_rel(flat(fwd.estimate(problem, x, y, v).hypergradient),
                         flat(exact.hypergradient)))
    assert errs[1] < errs[0] and errs[1] < 2e-2


def test_estimators_on_task_b_cnn_agree() -> None:
    model = build_model("cnn", (1, 8, 8), 10, [], [4, 6])
    task = HyperparameterLearning(model, log_l2_init=-2.0)
    x, y = task.init(0)
    gen = torch.Generator().manual_seed(5)
    b = Batch(torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen),
              torch.arange(16))
    problem = Problem(f=lambda a, c: task.f(a, c, b), g=lambda a, c: task.g(a, c, b))
    v = {k: torch.randn(t.shape, generator=gen) * 0.1 for k, t in y.items()}
    ref = ESTIMATORS["exact"](eta_v=0.1, radius=0.0).estimate(problem, x, y, v)
    flat = lambda p: torch.cat([t.reshape(-1) for t in p.values()])  # noqa: E731
    fd = make_estimator(EstimatorConfig(name="fd-central", eta_v=0.1, radius=0.0)
                        ).estimate(problem, x, y, v)
    assert _rel(flat(fd.hypergradient), flat(ref.hypergradient)) < 5e-3


def test_zero_v_gives_grad_x_f() -> None:
    task, problem, x, y, v = _task_a_problem(2)
    zero = {k: torch.zeros_like(t) for k, t in v.items()}
    fx, fy = grads(problem.f, x, y)
    for name in ("fd-central", "fd-forward", "exact"):
        out = ESTIMATORS[name](eta_v=0.5, radius=0.0).estimate(problem, x, y, zero)
        for k in fx:
            assert torch.allclose(out.hypergradient[k], fx[k], atol=1e-7)
        for k in fy:  # v <- 0 - eta (0 - fy)
            assert torch.allclose(out.v[k], 0.5 * fy[k], atol=1e-7)
