"""Dealing samples to clients: iid, label-sorted shards and Dirichlet label skew.

``partition`` is a pure function of its arguments (one ``Generator(PCG64(seed))``), so a
split can be reproduced from the config alone, and every sample goes to exactly one client.
"""

from __future__ import annotations

import numpy as np

from rabo.errors import DataError

SCHEMES = ("iid", "shards", "dirichlet")
DIRICHLET_MIN_SAMPLES = 2  # a client needs one train and one val sample
DIRICHLET_ATTEMPTS = 1000


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(n), num_clients))


def _shards(labels: np.ndarray, num_clients: int, per_client: int,
            rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al. / FedNest: label-sorted shards, ``per_client`` random shards each."""
    count = num_clients * per_client
    if len(labels) < count:
        raise DataError(f"split=shards: {len(labels)} samples cannot be cut into {num_clients} "
                        f"clients x {per_client} shards = {count} non-empty shards; use fewer "
                        "clients or shards_per_client, or more samples")
    shuffled = rng.permutation(len(labels))  # ties in the sort break at random, not by index
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, count)
    dealt = rng.permutation(count)
    return [np.concatenate([shards[s] for s in dealt[c * per_client:(c + 1) * per_client]])
            for c in range(num_clients)]


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Hsu et al. (2019): per class, client shares ~ Dir(alpha); redraw until none is too small."""
    need = DIRICHLET_MIN_SAMPLES * num_clients
    if len(labels) < need:
        raise DataError(f"split=dirichlet: {len(labels)} samples cannot give {num_clients} "
                        f"clients at least {DIRICHLET_MIN_SAMPLES} samples each")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for c, piece in enumerate(np.split(idx, cuts)):
                parts[c].append(piece)
        out = [np.concatenate(p) for p in parts]
        if min(len(p) for p in out) >= DIRICHLET_MIN_SAMPLES:
            return out
    raise DataError(
        f"split=dirichlet: after {DIRICHLET_ATTEMPTS} draws with alpha={alpha}, some of the "
        f"{num_clients} clients still got fewer than {DIRICHLET_MIN_SAMPLES} of the "
        f"{len(labels)} samples; alpha is too small for this many clients and samples "
        "(raise data.alpha or data.max_samples, or use fewer clients)")


def partition(labels: np.ndarray, num_clients: int, scheme: str, *, alpha: float,
              shards_per_client: int, seed: int) -> list[np.ndarray]:
    """Sorted int64 sample indices per client; together they hold every index exactly once."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"partition: labels must be 1-D, got shape {labels.shape}")
    if num_clients < 1:
        raise DataError(f"partition: need at least one client, got {num_clients}")
    if scheme not in SCHEMES:
        raise DataError(f"partition: unknown split {scheme!r}; choose one of "
                        + ", ".join(SCHEMES))
    rng = np.random.Generator(np.random.PCG64(seed))
    if scheme == "iid":
        if len(labels) < num_clients:
            raise DataError(f"split=iid: {len(labels)} samples cannot be dealt to "
                            f"{num_clients} clients")
        parts = _iid(len(labels), num_clients, rng)
    elif scheme == "shards":
        if shards_per_client < 1:
            raise DataError(f"split=shards: shards_per_client must be >= 1, got "
                            f"{shards_per_client}")
        parts = _shards(labels, num_clients, shards_per_client, rng)
    else:
        if not alpha > 0:
            raise DataError(f"split=dirichlet: alpha must be > 0, got {alpha}")
        parts = _dirichlet(labels, num_clients, alpha, rng)
    return [np.sort(p).astype(np.int64) for p in parts]
