"""The hypergradient estimator interface, shared by every estimator module.

At a point (x, y) with the current linear-system variable v, an estimator returns

    h     ~ grad_x f(x, y) - (d2 g / dx dy) v          (the hypergradient estimate)
    v_new = Proj_{||v|| <= R}( v - eta_v ((d2 g / dy2) v - grad_y f(x, y)) )

Estimators differ only in how they get the Hessian-vector product Hv and the cross-Jacobian-
vector product Jv (finite differences of gradients, or autograd second derivatives), in the
style of benchopt's benchmark_bilevel: one file per estimator behind this small interface.
Everything runs on the device and in the dtype of the tensors it is given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from rabo.params import Params

Loss = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """The two losses at fixed mini-batches, as functions of (x, y)."""

    f: Loss
    g: Loss


@dataclass(frozen=True)
class Estimate:
    hypergradient: Params  # x-shaped
    v: Params  # y-shaped: the updated linear-system variable


GradPair = tuple[Params, Params]


def grads(loss: Loss, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor],
          wrt_x: bool = True) -> GradPair:
    """(grad_x loss, grad_y loss) from one backward pass; zeros where loss ignores a tensor.

    ``wrt_x=False`` treats x as constant (grad_x is returned as zeros), which saves the
    backward pass through x when only grad_y is needed (task A's inner steps).
    """
    xs = {k: t.detach().requires_grad_(wrt_x) for k, t in x.items()}
    ys = {k: t.detach().requires_grad_(True) for k, t in y.items()}
    leaves = (list(xs.values()) if wrt_x else []) + list(ys.values())
    out = torch.autograd.grad(loss(xs, ys), leaves, allow_unused=True)
    nx = len(xs) if wrt_x else 0
    gx = {k: (_or_zeros(out[i], xs[k]) if wrt_x else torch.zeros_like(xs[k]))
          for i, k in enumerate(xs)}
    gy = {k: _or_zeros(out[nx + i], ys[k]) for i, k in enumerate(ys)}
    return gx, gy


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def project(v: Mapping[str, torch.Tensor], radius: float) -> Params:
    """Projection onto the ball ||v|| <= radius (radius 0: no projection)."""
    if radius <= 0:
        return dict(v)
    sq = sum((torch.sum(t * t) for t in v.values()), torch.zeros(()))
    n = float(torch.sqrt(sq))
    if n <= radius:
        return dict(v)
    s = radius / n
    return {k: t * s for k, t in v.items()}


def v_step(v: Mapping[str, torch.Tensor], hv: Mapping[str, torch.Tensor],
           fy: Mapping[str, torch.Tensor], eta_v: float, radius: float) -> Params:
    """v <- Proj(v - eta_v (Hv - grad_y f))."""
    return project({k: v[k] - eta_v * (hv[k] - fy[k]) for k in v}, radius)


def hypergradient(fx: Params, jv: Mapping[str, torch.Tensor]) -> Params:
    """grad_x f - Jv, computed in place in ``fx`` (a fresh gradient the caller gives up): at the
    estimator's peak every x-sized tensor counts against a worker's memory budget."""
    for k in fx:
        fx[k].sub_(jv[k])
    return fx


class Estimator(ABC):
    """Computes an :class:`Estimate` at (x, y, v) for a :class:`Problem`.

    ``base``, when given, is (grad_x g, grad_y g) at (x, y) on the same batch, as the inner step
    already computed it; estimators that can reuse it (``uses_base``) do so.
    """

    name: ClassVar[str]
    uses_base: ClassVar[bool] = False

    def __init__(self, *, eta_v: float, radius: float, delta: float = 1e-2,
                 neumann_terms: int = 5, neumann_eta: float = 0.5) -> None:
        self.eta_v = eta_v
        self.radius = radius
        self.delta = delta
        self.neumann_terms = neumann_terms
        self.neumann_eta = neumann_eta

    @abstractmethod
    def estimate(self, problem: Problem, x: Mapping[str, torch.Tensor],
                 y: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor],
                 base: GradPair | None = None) -> Estimate:
        """The hypergradient and the updated v. Blocks until computed; raises nothing of its
        own (autograd errors propagate)."""
