"""RABO: resource-adaptive distributed bilevel optimization with dual pruning.

The algorithm lives here, once, free of any transport: models and submodel masks, tasks,
hypergradient estimators, coverage aggregation and the round engine. ``coordinator`` and
``worker`` move its inputs and outputs over gRPC; ``rabo.dist`` over torch.distributed.
"""

__version__ = "0.1.0"
