"""Federated data: local sources, client partitions and per-client train/val splits.

Nothing here downloads anything: MNIST's test set is bundled, digits ships with scikit-learn,
MNIST-1D is generated locally and the larger sets are read from ``data.root``.
"""

from rabo.data.federated import ClientData, FederatedData, build_federated
from rabo.data.sources import TensorSet, load_pool, resolve_root
from rabo.data.splits import partition

__all__ = [
    "ClientData",
    "FederatedData",
    "TensorSet",
    "build_federated",
    "load_pool",
    "partition",
    "resolve_root",
]
