"""Exact second-order products by autograd: the reference for tests and ablations.

Hv and Jv come from one double backward of <grad_y g(x, y), v> (Pearlmutter's trick): the
gradient of g is built with ``create_graph=True`` and differentiated again. Same v update and
hypergradient as the finite-difference estimators, so any difference between them is the
finite-difference error alone.
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
    v_step,
)


def second_order_products(problem: Problem, x: Mapping[str, torch.Tensor],
                          y: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor],
                          need_x: bool = True) -> GradPair:
    """(Jv, Hv) = (d/dx, d/dy) <grad_y g(x, y), v> by double backward."""
    xs = {k: t.detach().requires_grad_(need_x) for k, t in x.items()}
    ys = {k: t.detach().requires_grad_(True) for k, t in y.items()}
    gy = torch.autograd.grad(problem.g(xs, ys), list(ys.values()), create_graph=True)
    inner = torch.stack([torch.sum(g * v[k].detach()) for g, k in zip(gy, ys, strict=True)]).sum()
    wrt = (list(xs.values()) if need_x else []) + list(ys.values())
    out = torch.autograd.grad(inner, wrt, allow_unused=True)
    nx = len(xs) if need_x else 0
    jv = {k: (torch.zeros_like(xs[k]) if not need_x or out[i] is None else out[i])
          for i, k in enumerate(xs)}
    hv = {k: (torch.zeros_like(ys[k]) if out[nx + i] is None else out[nx + i])
          for i, k in enumerate(ys)}
    return {k: t.detach() for k, t in jv.items()}, {k: t.detach() for k, t in hv.items()}


class ExactProducts(Estimator):
    name = "exact"

    def estimate(self, problem: Problem, x: Mapping[str, torch.Tensor],
                 y: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor],
                 base: GradPair | None = None) -> Estimate:
        fx, fy = grads(problem.f, x, y)
        jv, hv = second_order_products(problem, x, y, v)
        return Estimate(hypergradient(fx, jv), v_step(v, hv, fy, self.eta_v, self.radius))
