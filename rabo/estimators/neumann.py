"""Truncated Neumann series, FedNest-style (Tarzanagh et al., ICML 2022): the baseline.

    v_N = eta * sum_{n=0}^{N-1} (I - eta H)^n grad_y f,      h = grad_x f - J v_N

v is rebuilt from scratch every call (no state carried between rounds) and projected onto the
same ball as the other estimators' v (``estimator.radius``). Each term costs one
Hessian-vector product by double backward, recomputed per term as FedNest does (it draws a new
sample per term); N terms cost N-1 Hessian products plus one cross-Jacobian product. For
0 < eta < 2 / L the truncation error is ||(I - eta H)^N H^{-1} grad_y f||, which shrinks
geometrically with N.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rabo.estimators.base import (
    Estimate,
    Estimator,
    GradPair,
    Problem,
    grads,
    hypergradient,
    project,
)
from rabo.estimators.exact import second_order_products


class NeumannSeries(Estimator):
    name = "neumann"

    def estimate(self, problem: Problem, x: Mapping[str, torch.Tensor],
                 y: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor],
                 base: GradPair | None = None) -> Estimate:
        fx, fy = grads(problem.f, x, y)
        eta = self.neumann_eta
        term = {k: t.clone() for k, t in fy.items()}
        total = {k: t.clone() for k, t in fy.items()}
        for _ in range(self.neumann_terms - 1):
            _, h_term = second_order_products(problem, x, y, term, need_x=False)
            term = {k: term[k] - eta * h_term[k] for k in term}
            total = {k: total[k] + term[k] for k in total}
        # projected like the other estimators' v: with eta above 2/L the series diverges, and
        # the ball keeps one bad client from wrecking the aggregate
        v_new = project({k: eta * t for k, t in total.items()}, self.radius)
        jv, _ = second_order_products(problem, x, y, v_new)
        return Estimate(hypergradient(fx, jv), v_new)
