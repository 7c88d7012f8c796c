"""Second-order-free estimators: Hv and Jv from differences of ordinary gradients of g.

With d = delta / max(||v||, eps) [recon: FdeHBO (NeurIPS 2023), and the central form of the
BOAT library's finite-difference estimator],

    central:  [grad g(x, y + d v) - grad g(x, y - d v)] / (2 d)   (error O(d^2), 2 gradients)
    forward:  [grad g(x, y + d v) - grad g(x, y)]       / d       (error O(d),   1 gradient
              beyond grad g(x, y), which the inner step computes anyway)

One ordinary backward of g at a perturbed point returns grad_x g and grad_y g together, so
neither form builds a double-backward graph: they work for kernels without second derivatives
and never hold the graph of a backward pass. On a quadratic g both are exact up to rounding.
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
from rabo.params import norm

_EPS = 1e-12


def _shifted(y: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor], step: float
             ) -> dict[str, torch.Tensor]:
    return {k: y[k] + step * v[k] for k in y}


def _difference_(plus: dict[str, torch.Tensor], minus: Mapping[str, torch.Tensor], step: float
                 ) -> None:
    """plus <- (plus - minus) / step, in place."""
    for k in plus:
        plus[k].sub_(minus[k]).div_(step)


def _zero_products(x: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor]) -> GradPair:
    return ({k: torch.zeros_like(t) for k, t in x.items()},
            {k: torch.zeros_like(t) for k, t in v.items()})


class CentralDifference(Estimator):
    name = "fd-central"

    def estimate(self, problem: Problem, x: Mapping[str, torch.Tensor],
                 y: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor],
                 base: GradPair | None = None) -> Estimate:
        fx, fy = grads(problem.f, x, y)
        v_norm = norm(v)
        if v_norm == 0.0:
            jv, hv = _zero_products(x, v)
        else:
            d = self.delta / max(v_norm, _EPS)
            jv, hv = grads(problem.g, x, _shifted(y, v, d))
            gx_m, gy_m = grads(problem.g, x, _shifted(y, v, -d))
            _difference_(jv, gx_m, 2 * d)  # in place: one x-sized tensor fewer at the peak
            _difference_(hv, gy_m, 2 * d)
            del gx_m, gy_m
        return Estimate(hypergradient(fx, jv), v_step(v, hv, fy, self.eta_v, self.radius))


class ForwardDifference(Estimator):
    name = "fd-forward"
    uses_base = True

    def estimate(self, problem: Problem, x: Mapping[str, torch.Tensor],
                 y: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor],
                 base: GradPair | None = None) -> Estimate:
        fx, fy = grads(problem.f, x, y)
        v_norm = norm(v)
        if v_norm == 0.0:
            jv, hv = _zero_products(x, v)
        else:
            gx_0, gy_0 = base if base is not None else grads(problem.g, x, y)
            d = self.delta / max(v_norm, _EPS)
            jv, hv = grads(problem.g, x, _shifted(y, v, d))
            _difference_(jv, gx_0, d)  # the base is the inner step's: never modified
            _difference_(hv, gy_0, d)
        return Estimate(hypergradient(fx, jv), v_step(v, hv, fy, self.eta_v, self.radius))
