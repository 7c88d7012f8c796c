"""Per-client train (lower level) and val (upper level) sets, plus the global test set.

Each random step draws from its own stream derived from (seed, step, client), so that, e.g.,
turning on label noise changes only the corrupted labels and never the split itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rabo.config import DataConfig
from rabo.data.sources import TensorSet, load_pool
from rabo.data.splits import partition
from rabo.errors import DataError

# Stream tags: one independent random stream per step.
_TEST, _VAL, _NOISE = 1, 2, 3


@dataclass(frozen=True)
class ClientData:
    """One client's data: ``train`` feeds the lower level g_i, ``val`` the upper level f_i."""

    client_id: int
    train: TensorSet
    val: TensorSet


@dataclass(frozen=True)
class FederatedData:
    """All clients' data, the held-out test set and what a model needs to know of the inputs."""

    clients: list[ClientData]
    test: TensorSet
    num_classes: int
    input_shape: tuple[int, ...]


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *tags])))


def _subset(data: TensorSet, idx: np.ndarray) -> TensorSet:
    i = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    return TensorSet(data.inputs[i], data.labels[i])


def _corrupt(split: TensorSet, fraction: float, num_classes: int,
             rng: np.random.Generator) -> TensorSet:
    """Flip ``fraction`` of the labels, each to a different class chosen uniformly."""
    n = len(split)
    flip = rng.choice(n, size=int(round(fraction * n)), replace=False)
    labels = split.labels.clone()
    shift = torch.from_numpy(rng.integers(1, num_classes, size=len(flip)).astype(np.int64))
    idx = torch.from_numpy(flip.astype(np.int64))
    labels[idx] = (labels[idx] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return TensorSet(split.inputs, labels, mask)


def build_federated(cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """Load, hold out the test set, partition and split per client; deterministic in its args."""
    pool, own_test, num_classes, input_shape = load_pool(cfg.dataset, cfg.root, seed)
    if cfg.max_samples > 0 and cfg.max_samples < len(pool):
        pool = TensorSet(pool.inputs[:cfg.max_samples], pool.labels[:cfg.max_samples])
    n = len(pool)
    if own_test is not None:
        test = own_test
        rest = np.arange(n, dtype=np.int64)
    else:
        if n < 2:
            raise DataError(f"data set {cfg.dataset}: {n} samples leave none for a test set")
        n_test = min(max(1, int(round(cfg.test_fraction * n))), n - 1)
        perm = _rng(seed, _TEST).permutation(n)
        test = _subset(pool, np.sort(perm[:n_test]))
        rest = np.sort(perm[n_test:])

    labels = pool.labels.numpy()[rest]
    parts = partition(labels, num_clients, cfg.split, alpha=cfg.alpha,
                      shards_per_client=cfg.shards_per_client, seed=seed)
    clients = []
    for cid, local in enumerate(parts):
        idx = rest[local]
        if len(idx) < 2:
            raise DataError(
                f"client {cid} got {len(idx)} sample(s) from split={cfg.split}; each client "
                "needs at least 2 (one train, one val): use fewer clients or more samples "
                f"(pool after the test hold-out: {len(rest)} samples for {num_clients} clients)")
        n_val = min(max(1, int(round(cfg.val_fraction * len(idx)))), len(idx) - 1)
        shuffled = _rng(seed, _VAL, cid).permutation(idx)
        val = _subset(pool, np.sort(shuffled[:n_val]))
        train = _subset(pool, np.sort(shuffled[n_val:]))
        if cfg.label_noise > 0:
            train = _corrupt(train, cfg.label_noise, num_classes, _rng(seed, _NOISE, cid))
        clients.append(ClientData(client_id=cid, train=train, val=val))
    return FederatedData(clients=clients, test=test, num_classes=num_classes,
                         input_shape=tuple(input_shape))
