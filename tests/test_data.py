"""Data package: real MNIST, partitions, federated splits, bad files, CIFAR-10 and MNIST-1D."""

from __future__ import annotations

import gzip
import random
import struct
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rabo.config import DataConfig
from rabo.data import (
    ClientData,
    FederatedData,
    TensorSet,
    build_federated,
    load_pool,
    partition,
    resolve_root,
    sources,
)
from rabo.data.sources import load_idx_pair, read_cifar_batch, read_idx
from rabo.errors import DataError

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _bundled_mnist() -> Path | None:
    for candidate in sources._bundled_mnist_candidates():
        if (candidate / "t10k-images-idx3-ubyte.gz").is_file():
            return candidate
    return None


# --------------------------------------------------------------------------- helpers


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 2048 + array.ndim  # 0x08 (uint8) in byte 3, ndim in byte 4
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _write_mnist_like(root: Path, n_train: int, n_test: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz",
                   rng.integers(0, 10, size=n, dtype=np.uint8))


def _row_keys(ts: TensorSet) -> Counter[tuple[bytes, int]]:
    flat = ts.inputs.reshape(len(ts), -1).numpy()
    return Counter((row.tobytes(), int(y)) for row, y in zip(flat, ts.labels.tolist(), strict=True))


def _assert_same_sets(a: TensorSet, b: TensorSet) -> None:
    assert torch.equal(a.inputs, b.inputs)
    assert torch.equal(a.labels, b.labels)
    if a.corrupted is None:
        assert b.corrupted is None
    else:
        assert b.corrupted is not None and torch.equal(a.corrupted, b.corrupted)


def _assert_same(a: FederatedData, b: FederatedData) -> None:
    assert len(a.clients) == len(b.clients)
    for ca, cb in zip(a.clients, b.clients, strict=True):
        assert ca.client_id == cb.client_id
        _assert_same_sets(ca.train, cb.train)
        _assert_same_sets(ca.val, cb.val)
    _assert_same_sets(a.test, b.test)


# --------------------------------------------------------------------------- real MNIST


def test_bundled_mnist_test_set(monkeypatch: pytest.MonkeyPatch) -> None:
    if _bundled_mnist() is None:
        pytest.skip("bundled MNIST test set (../shared/data/mnist next to the repo) is absent")
    monkeypatch.delenv("RABO_DATA_DIR", raising=False)
    pool, test, classes, shape = load_pool("mnist", None, 0)
    assert test is None  # the bundled set *is* a test split; the pool is all of it
    assert len(pool) == 10_000
    assert shape == (1, 28, 28)
    assert classes == 10
    assert tuple(pool.inputs.shape) == (10_000, 1, 28, 28)
    assert pool.inputs.dtype == torch.float32 and pool.labels.dtype == torch.int64
    assert torch.bincount(pool.labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    # Fixed MNIST constants standardize the test set to about zero mean, unit variance.
    assert abs(float(pool.inputs.mean())) < 0.05
    assert abs(float(pool.inputs.std()) - 1.0) < 0.05
    # Background pixels (0) map to -mean/std.
    assert float(pool.inputs.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def test_resolve_root_env_and_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RABO_DATA_DIR", raising=False)
    for name in ("mnist-full", "fashion-mnist", "cifar10"):
        with pytest.raises(DataError, match="RABO_DATA_DIR"):
            resolve_root(name, None)
    assert resolve_root("cifar10", str(tmp_path)) == tmp_path
    with pytest.raises(DataError, match="unknown data set"):
        resolve_root("imagenet", None)

    # RABO_DATA_DIR with the MNIST files in its mnist/ subdirectory.
    sub = tmp_path / "mnist"
    sub.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (sub / name).write_bytes(b"")
    monkeypatch.setenv("RABO_DATA_DIR", str(tmp_path))
    assert resolve_root("mnist", None) == sub
    # ... and the fashion-mnist subdirectory wins over the base for fashion-mnist.
    _write_mnist_like(tmp_path / "fashion-mnist", 3, 2, seed=0)
    assert resolve_root("fashion-mnist", None) == tmp_path / "fashion-mnist"


def test_mnist_full_reads_own_test_split(tmp_path: Path) -> None:
    root = tmp_path / "fmnist"
    _write_mnist_like(root, n_train=7, n_test=5, seed=3)
    raw_train = read_idx(root / "train-images-idx3-ubyte.gz")
    raw_labels = read_idx(root / "train-labels-idx1-ubyte.gz")
    pool, test, classes, shape = load_pool("fashion-mnist", str(root), 0)
    assert (len(pool), shape, classes) == (7, (1, 28, 28), 10)
    assert test is not None and len(test) == 5
    assert pool.labels.tolist() == raw_labels.tolist()
    back = pool.inputs[:, 0].numpy() * 0.3530 + 0.2860
    np.testing.assert_allclose(back, raw_train / 255.0, atol=1e-5)


# --------------------------------------------------------------------------- partition


def _labels(n: int = 2000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
def test_partition_covers_each_index_once(scheme: str) -> None:
    labels = _labels()
    parts = partition(labels, 10, scheme, alpha=0.5, shards_per_client=2, seed=7)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert min(len(p) for p in parts) >= 2

    again = partition(labels, 10, scheme, alpha=0.5, shards_per_client=2, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, 10, scheme, alpha=0.5, shards_per_client=2, seed=8)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_partition_iid_is_near_equal() -> None:
    parts = partition(_labels(1003), 10, "iid", alpha=1.0, shards_per_client=2, seed=0)
    assert sorted(len(p) for p in parts) == [100] * 7 + [101] * 3


def test_shards_give_few_labels_per_client() -> None:
    labels = np.repeat(np.arange(10), 100)  # 1000 samples, shards of 50 never straddle a class
    parts = partition(labels, 10, "shards", alpha=1.0, shards_per_client=2, seed=1)
    distinct = [len(np.unique(labels[p])) for p in parts]
    assert max(distinct) <= 2
    assert all(len(p) == 100 for p in parts)
    # Random labels: shard boundaries may straddle a class, still only a handful of labels.
    labels = _labels(2000)
    parts = partition(labels, 10, "shards", alpha=1.0, shards_per_client=2, seed=1)
    assert max(len(np.unique(labels[p])) for p in parts) <= 4


def _mean_max_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


def test_dirichlet_skew_follows_alpha() -> None:
    labels = _labels(5000)
    skewed = partition(labels, 10, "dirichlet", alpha=0.1, shards_per_client=2, seed=3)
    flat = partition(labels, 10, "dirichlet", alpha=100.0, shards_per_client=2, seed=3)
    skew_hi = _mean_max_class_fraction(labels, skewed)
    skew_lo = _mean_max_class_fraction(labels, flat)
    assert skew_lo < 0.2  # near the uniform 0.1
    assert skew_hi > 0.45
    assert skew_hi > skew_lo + 0.25


def test_partition_errors() -> None:
    labels = _labels(30)
    with pytest.raises(DataError, match="alpha is too small"):
        partition(labels, 12, "dirichlet", alpha=1e-3, shards_per_client=2, seed=0)
    with pytest.raises(DataError, match="at least 2"):
        partition(labels, 20, "dirichlet", alpha=1.0, shards_per_client=2, seed=0)
    with pytest.raises(DataError, match="shards"):
        partition(labels, 10, "shards", alpha=1.0, shards_per_client=4, seed=0)
    with pytest.raises(DataError, match="unknown split"):
        partition(labels, 2, "pathological", alpha=1.0, shards_per_client=2, seed=0)


# --------------------------------------------------------------------------- build_federated


@pytest.fixture(scope="module")
def digits_pool() -> TensorSet:
    return load_pool("digits", None, 0)[0]


@pytest.mark.parametrize("split", ["iid", "shards", "dirichlet"])
def test_build_federated_digits_partitions_pool(split: str, digits_pool: TensorSet) -> None:
    cfg = DataConfig(dataset="digits", split=split, alpha=0.5, val_fraction=0.2,
                     test_fraction=0.2)
    fed = build_federated(cfg, 8, seed=11)
    assert isinstance(fed.clients[0], ClientData)
    assert (fed.num_classes, fed.input_shape) == (10, (1, 8, 8))
    assert [c.client_id for c in fed.clients] == list(range(8))
    assert len(fed.test) == round(0.2 * 1797)
    n_train = sum(len(c.train) for c in fed.clients)
    n_val = sum(len(c.val) for c in fed.clients)
    assert n_train + n_val + len(fed.test) == len(digits_pool) == 1797
    assert n_val / (n_train + n_val) == pytest.approx(0.2, abs=0.02)
    # Every pool sample (input row and label) appears exactly once across all splits, so
    # train/val within a client, clients and the test set are pairwise disjoint.
    seen: Counter[tuple[bytes, int]] = Counter()
    for c in fed.clients:
        assert len(c.train) >= 1 and len(c.val) >= 1
        assert c.train.corrupted is None and c.val.corrupted is None
        assert c.train.inputs.shape[1:] == (1, 8, 8)
        seen += _row_keys(c.train) + _row_keys(c.val)
    seen += _row_keys(fed.test)
    assert seen == _row_keys(digits_pool)

    _assert_same(fed, build_federated(cfg, 8, seed=11))
    other = build_federated(cfg, 8, seed=12)
    assert not torch.equal(other.clients[0].train.labels, fed.clients[0].train.labels) or \
        not torch.equal(other.test.inputs, fed.test.inputs)


def test_build_federated_max_samples_and_too_small() -> None:
    cfg = DataConfig(dataset="digits", max_samples=200, test_fraction=0.25)
    fed = build_federated(cfg, 5, seed=0)
    assert len(fed.test) == 50
    assert sum(len(c.train) + len(c.val) for c in fed.clients) == 150
    with pytest.raises(DataError, match="at least 2"):
        build_federated(replace(cfg, max_samples=20), 12, seed=0)


def test_label_noise_flips_a_fraction(digits_pool: TensorSet) -> None:
    cfg = DataConfig(dataset="digits", split="iid", label_noise=0.3)
    noisy = build_federated(cfg, 6, seed=5)
    clean = build_federated(replace(cfg, label_noise=0.0), 6, seed=5)
    flipped = total = 0
    for cn, cc in zip(noisy.clients, clean.clients, strict=True):
        assert torch.equal(cn.train.inputs, cc.train.inputs)  # noise never moves the split
        _assert_same_sets(cn.val, cc.val)
        mask = cn.train.corrupted
        assert mask is not None and mask.dtype == torch.bool
        differs = cn.train.labels != cc.train.labels
        assert torch.equal(mask, differs)  # every flipped label differs; others are untouched
        assert int(cn.train.labels.min()) >= 0 and int(cn.train.labels.max()) <= 9
        assert int(mask.sum()) == round(0.3 * len(cn.train))
        flipped += int(mask.sum())
        total += len(cn.train)
    assert flipped / total == pytest.approx(0.3, abs=0.01)
    assert noisy.test.corrupted is None
    _assert_same(noisy, build_federated(cfg, 6, seed=5))


def test_tensorset_to_and_len() -> None:
    ts = TensorSet(torch.zeros(3, 2), torch.tensor([0, 1, 2]), torch.tensor([True, False, True]))
    moved = ts.to("cpu")
    assert len(moved) == 3 and moved.corrupted is not None
    assert torch.equal(moved.corrupted, ts.corrupted)
    with pytest.raises(DataError):
        TensorSet(torch.zeros(3, 2), torch.tensor([0, 1]))


# --------------------------------------------------------------------------- bad files


def test_missing_directory_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere") as info:
        load_pool("mnist", str(missing), 0)
    assert str(missing) in str(info.value)
    tmp_path.joinpath("t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(DataError) as info:
        load_pool("mnist", str(tmp_path), 0)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in str(info.value)
    with pytest.raises(DataError, match="file not found") as info:
        read_idx(tmp_path / "absent.gz")
    assert str(tmp_path / "absent.gz") in str(info.value)


def test_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="not a gzip file") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    # Valid gzip header, cut-off stream.
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((4, 28, 28), np.uint8)))[:40])
    with pytest.raises(DataError, match="corrupt or truncated gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "images.idx"
    data = bytearray(_idx_bytes(np.zeros((2, 4, 4), np.uint8)))
    data[0:4] = struct.pack(">I", 0x00000D03)  # float data type, not unsigned byte
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bad IDX magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    labels = _write_idx(tmp_path / "labels.gz", np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="expected 2051") as info:
        read_idx(labels, 2051)  # a label file where images belong
    assert str(labels) in str(info.value)


def test_truncated_image_file(tmp_path: Path) -> None:
    full = _idx_bytes(np.zeros((5, 28, 28), np.uint8))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(full[:-100]))
    with pytest.raises(DataError, match="truncated IDX data") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    raw = tmp_path / "raw-images"
    raw.write_bytes(full[:10])  # header cut inside the dimensions
    with pytest.raises(DataError, match="truncated IDX header") as info:
        read_idx(raw)
    assert str(raw) in str(info.value)
    raw.write_bytes(full + b"\0")
    with pytest.raises(DataError, match="size mismatch"):
        read_idx(raw)


def test_label_count_mismatch(tmp_path: Path) -> None:
    images = _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
    labels = _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8),
                        compress=False)
    with pytest.raises(DataError, match="counts must match") as info:
        load_idx_pair(images, labels)
    assert str(labels) in str(info.value)
    with pytest.raises(DataError, match="counts must match"):
        load_pool("mnist", str(tmp_path), 0)  # raw (non-gz) label file is found too
    bad = _write_idx(tmp_path / "bad-labels", np.full(5, 10, np.uint8), compress=False)
    with pytest.raises(DataError, match="out of range") as info:
        load_idx_pair(images, bad)
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar_batch(path: Path, labels: np.ndarray, pixels: np.ndarray) -> None:
    records = np.concatenate([labels[:, None], pixels.reshape(len(labels), -1)], axis=1)
    path.write_bytes(records.astype(np.uint8).tobytes())


def test_cifar10_binary_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train_labels, train_pixels = [], []
    for i in range(1, 6):
        labels = rng.integers(0, 10, size=3, dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
        _write_cifar_batch(folder / f"data_batch_{i}.bin", labels, pixels)
        train_labels.append(labels)
        train_pixels.append(pixels)
    test_labels = np.array([9, 0], np.uint8)
    _write_cifar_batch(folder / "test_batch.bin", test_labels,
                       rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8))

    for root in (tmp_path, folder):  # the parent or the batches folder itself
        pool, test, classes, shape = load_pool("cifar10", str(root), 0)
        assert (classes, shape) == (10, (3, 32, 32))
        assert tuple(pool.inputs.shape) == (15, 3, 32, 32)
        assert pool.labels.tolist() == np.concatenate(train_labels).tolist()
        assert test is not None and test.labels.tolist() == [9, 0]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    back = (pool.inputs * std + mean).numpy()
    np.testing.assert_allclose(back, np.concatenate(train_pixels) / 255.0, atol=1e-5)

    fed = build_federated(DataConfig(dataset="cifar10", root=str(tmp_path)), 3, seed=0)
    assert len(fed.test) == 2  # the own test batch, not a fraction of the pool
    assert sum(len(c.train) + len(c.val) for c in fed.clients) == 15

    short = folder / "data_batch_3.bin"
    short.write_bytes(short.read_bytes()[:-1])
    with pytest.raises(DataError, match="whole number") as info:
        read_cifar_batch(short)
    assert str(short) in str(info.value)


def test_cifar10_python_version_is_refused(tmp_path: Path) -> None:
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    (py / "data_batch_1").write_bytes(b"\x80\x04.")
    with pytest.raises(DataError, match="binary version") as info:
        load_pool("cifar10", str(tmp_path), 0)
    assert "python" in str(info.value) and str(py) in str(info.value)


# --------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_generated_and_deterministic() -> None:
    np_state = np.random.get_state()
    py_state = random.getstate()
    sources._load_raw.cache_clear()
    pool, test, classes, shape = load_pool("mnist1d", None, 0)
    assert shape == (40,) and classes == 10
    assert tuple(pool.inputs.shape) == (4000, 40) and pool.inputs.dtype == torch.float32
    assert test is not None and tuple(test.inputs.shape) == (1000, 40)
    assert set(pool.labels.unique().tolist()) == set(range(10))
    # The generator seeds numpy's global RNG; load_pool must leave it as it was.
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert random.getstate() == py_state

    cached, _, _, _ = load_pool("mnist1d", None, 0)  # from the cache
    assert torch.equal(cached.inputs, pool.inputs)
    sources._load_raw.cache_clear()
    fresh, fresh_test, _, _ = load_pool("mnist1d", None, 0)  # generated again
    assert torch.equal(fresh.inputs, pool.inputs) and torch.equal(fresh.labels, pool.labels)
    assert fresh_test is not None and torch.equal(fresh_test.inputs, test.inputs)

    fed = build_federated(DataConfig(dataset="mnist1d"), 4, seed=0)
    assert fed.input_shape == (40,) and len(fed.test) == 1000
    assert sum(len(c.train) + len(c.val) for c in fed.clients) == 4000
