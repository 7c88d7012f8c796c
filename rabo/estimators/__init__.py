"""Hypergradient estimators behind one interface: adding one is adding a module here."""

from __future__ import annotations

from rabo.config import EstimatorConfig
from rabo.estimators.base import Estimate, Estimator, Problem, grads, project
from rabo.estimators.exact import ExactProducts
from rabo.estimators.finite_difference import CentralDifference, ForwardDifference
from rabo.estimators.neumann import NeumannSeries

ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (CentralDifference, ForwardDifference, ExactProducts, NeumannSeries)
}

__all__ = ["ESTIMATORS", "Estimate", "Estimator", "Problem", "grads", "make_estimator",
           "project"]


def make_estimator(cfg: EstimatorConfig) -> Estimator:
    try:
        cls = ESTIMATORS[cfg.name]
    except KeyError:
        raise ValueError(f"estimator {cfg.name!r} is not one of {', '.join(ESTIMATORS)}") from None
    return cls(eta_v=cfg.eta_v, radius=cfg.radius, delta=cfg.delta,
               neumann_terms=cfg.neumann_terms, neumann_eta=cfg.neumann_eta)
