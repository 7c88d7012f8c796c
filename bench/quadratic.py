"""A quadratic bilevel problem with a closed-form hypergradient (float64).

    g(x, y) = 1/2 y^T H y + x^T C y          (H symmetric positive definite)
    f(x, y) = 1/2 ||y - b||^2 + lam/2 ||x||^2

    y*(x) = -H^{-1} C^T x,   v* = H^{-1} (y* - b),   grad Phi(x) = lam x - C v*

On it the central finite difference is exact up to rounding (g's gradient is linear in y), so it
pins every estimator to the closed form; the Neumann series' truncation error is known exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rabo.estimators import Problem


@dataclass(frozen=True)
class Quadratic:
    H: torch.Tensor
    C: torch.Tensor
    b: torch.Tensor
    lam: float

    @classmethod
    def random(cls, nx: int = 6, ny: int = 8, seed: int = 0, cond: float = 10.0,
               dtype: torch.dtype = torch.float64) -> Quadratic:
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(ny, ny, generator=gen, dtype=dtype))
        eig = torch.linspace(1.0, cond, ny, dtype=dtype)
        H = q @ torch.diag(eig) @ q.T
        H = 0.5 * (H + H.T)
        C = torch.randn(nx, ny, generator=gen, dtype=dtype)
        b = torch.randn(ny, generator=gen, dtype=dtype)
        return cls(H, C, b, 0.1)

    def problem(self) -> Problem:
        def g(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> torch.Tensor:
            yy = y["y"]
            return 0.5 * yy @ self.H @ yy + x["x"] @ self.C @ yy

        def f(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> torch.Tensor:
            d = y["y"] - self.b
            return 0.5 * d @ d + 0.5 * self.lam * x["x"] @ x["x"]

        return Problem(f=f, g=g)

    def y_star(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.linalg.solve(self.H, self.C.T @ x)

    def v_star(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.H, self.y_star(x) - self.b)

    def hypergradient(self, x: torch.Tensor) -> torch.Tensor:
        return self.lam * x - self.C @ self.v_star(x)

    def neumann_hypergradient(self, x: torch.Tensor, y: torch.Tensor, terms: int, eta: float
                              ) -> torch.Tensor:
        """The exact value the N-term Neumann estimator must return at (x, y)."""
        fy = y - self.b
        step = torch.eye(len(fy), dtype=fy.dtype) - eta * self.H
        term, total = fy.clone(), fy.clone()
        for _ in range(terms - 1):
            term = step @ term
            total = total + term
        return self.lam * x - self.C @ (eta * total)
