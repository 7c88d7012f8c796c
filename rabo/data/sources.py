"""Raw data sources: file readers, root resolution and the normalized sample pool.

Every supported data set is read from local files or generated locally; nothing is ever
downloaded. Readers validate what they read and raise :class:`DataError` naming the file and
what is wrong, so that a bad or partial download fails loudly instead of training on garbage.

Normalization: image pixels are scaled to [0, 1] and then standardized with *fixed* per-data-set
constants (per channel for CIFAR-10): the published training-set mean/std for MNIST (also used
for the bundled MNIST test set), Fashion-MNIST and CIFAR-10, and for ``digits`` the mean/std of
the whole bundled scikit-learn set. Fixed constants keep the inputs independent of
``max_samples``, the split and the seed. MNIST-1D comes standardized by its own generator and is
used as is.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rabo.errors import DataError

log = logging.getLogger("rabo.data")
DATASETS = ("mnist", "digits", "mnist1d", "mnist-full", "fashion-mnist", "cifar10")

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
_GZIP_MAGIC = b"\x1f\x8b"
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_DIR = "cifar-10-batches-bin"

# (mean, std) per channel, applied after scaling pixels to [0, 1].
_NORM: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "mnist-full": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "digits": ((0.3053,), (0.3760,)),  # whole load_digits() set, pixels / 16
}


@dataclass(frozen=True)
class TensorSet:
    """Inputs and labels of one split; ``corrupted`` marks labels flipped by label noise."""

    inputs: torch.Tensor
    labels: torch.Tensor
    corrupted: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        if self.labels.dim() != 1 or self.labels.shape[0] != n:
            raise DataError(f"TensorSet: {n} inputs but labels of shape "
                            f"{tuple(self.labels.shape)}")
        if self.corrupted is not None and tuple(self.corrupted.shape) != (n,):
            raise DataError(f"TensorSet: {n} inputs but a corrupted mask of shape "
                            f"{tuple(self.corrupted.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> TensorSet:
        """The same split on ``device`` (tensors already there are not copied)."""
        corrupted = None if self.corrupted is None else self.corrupted.to(device)
        return TensorSet(self.inputs.to(device), self.labels.to(device), corrupted)


# --------------------------------------------------------------------------- IDX files


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it is (or is named as) a gzip file."""
    if not path.is_file():
        if path.exists():
            raise DataError(f"{path}: not a regular file")
        raise DataError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    is_gz = raw[:2] == _GZIP_MAGIC
    if path.suffix == ".gz" and not is_gz:
        raise DataError(f"{path}: not a gzip file (named .gz but has no gzip header)")
    if not is_gz:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped or raw) into a read-only uint8 array.

    The header is parsed big-endian (magic, then one uint32 per dimension) and checked against
    the actual byte count, so truncated or padded files are rejected rather than reshaped.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, no complete header)")
    magic = int.from_bytes(data[:4], "big")
    allowed = (expected_magic,) if expected_magic is not None else (
        IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC)
    if magic not in allowed:
        raise DataError(f"{path}: bad IDX magic number {magic} (0x{magic:08x}); expected "
                        + " or ".join(str(m) for m in allowed))
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions "
                        f"need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(data) - header
    if actual < expected:
        raise DataError(f"{path}: truncated IDX data: header declares shape {dims} "
                        f"({expected} bytes) but only {actual} bytes follow")
    if actual > expected:
        raise DataError(f"{path}: IDX size mismatch: header declares shape {dims} "
                        f"({expected} bytes) but {actual} bytes follow")
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def _find_file(root: Path, name: str) -> Path:
    """``root/name`` or ``root/name.gz``, whichever exists (raw first)."""
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root / name}(.gz): file not found in {root}")


def load_idx_pair(images_path: str | Path, labels_path: str | Path,
                  num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, rows, cols] and labels [N] from a matching pair of IDX files."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{labels_path}: {labels.shape[0]} labels but {images_path} holds "
                        f"{images.shape[0]} images; the counts must match")
    if labels.size and int(labels.max()) >= num_classes:
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range "
                        f"0..{num_classes - 1}")
    return images, labels


def _idx_split(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    return load_idx_pair(_find_file(root, f"{prefix}-images-idx3-ubyte"),
                         _find_file(root, f"{prefix}-labels-idx1-ubyte"))


def _has_idx(root: Path, prefixes: tuple[str, ...]) -> bool:
    def present(name: str) -> bool:
        return (root / name).is_file() or (root / f"{name}.gz").is_file()

    return all(present(f"{p}-{kind}") for p in prefixes
               for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_dir(root: Path) -> Path:
    """The folder holding the binary batches: ``root`` itself or its cifar-10-batches-bin."""
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    for candidate in (root, root / _CIFAR_DIR):
        if (candidate / "data_batch_1.bin").is_file():
            return candidate
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            raise DataError(
                f"{candidate}: this is the python (pickle) version of CIFAR-10, which RABO does "
                "not read (unpickling runs code); use the binary version "
                f"(cifar-10-binary.tar.gz, folder {_CIFAR_DIR} with data_batch_1.bin ...)")
    raise DataError(f"{root}: no CIFAR-10 binary batches found (looked for data_batch_1.bin "
                    f"in {root} and {root / _CIFAR_DIR})")


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 3, 32, 32] uint8 and labels [N] from one binary CIFAR-10 batch file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    if not raw or len(raw) % _CIFAR_RECORD:
        raise DataError(f"{path}: {len(raw)} bytes is not a whole number of "
                        f"{_CIFAR_RECORD}-byte CIFAR-10 records (truncated or not a batch)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if int(labels.max()) >= 10:
        raise DataError(f"{path}: label {int(labels.max())} out of range 0..9 "
                        "(CIFAR-100 or not a CIFAR-10 batch?)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _load_cifar(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = _cifar_dir(root)
    parts = [read_cifar_batch(folder / f"data_batch_{i}.bin") for i in range(1, 6)]
    test_x, test_y = read_cifar_batch(folder / "test_batch.bin")
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            test_x, test_y)


# --------------------------------------------------------------------------- root resolution


def _bundled_mnist_candidates() -> list[Path]:
    import rabo

    repo = Path(rabo.__file__).resolve().parents[1]
    return [repo.parent / "shared" / "data" / "mnist",
            Path.cwd().parent / "shared" / "data" / "mnist"]


def _holds(dataset: str, root: Path) -> bool:
    """Whether ``root`` holds the files that ``dataset`` reads (cheap existence check)."""
    if dataset == "mnist":
        return _has_idx(root, ("t10k",))
    if dataset in ("mnist-full", "fashion-mnist"):
        return _has_idx(root, ("train", "t10k"))
    if dataset == "cifar10":
        return any((d / "data_batch_1.bin").is_file() for d in (root, root / _CIFAR_DIR))
    return True


def resolve_root(dataset: str, root: str | None) -> Path:
    """Where ``dataset``'s files are: ``root``; else $RABO_DATA_DIR; else (mnist) the bundled set.

    With RABO_DATA_DIR the data set may sit in the directory itself or in a subdirectory named
    after it (``mnist/``, ``mnist-full/``, ``fashion-mnist/``, ``cifar10/``). ``digits`` and
    ``mnist1d`` read no files; for them this returns ``root`` or ``.`` and is not consulted.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    if root is not None:
        return Path(root).expanduser()
    if dataset in ("digits", "mnist1d"):
        return Path(".")
    env = os.environ.get("RABO_DATA_DIR")
    if env:
        base = Path(env).expanduser()
        if not base.is_dir():  # a typo must not train on other data without a word
            raise DataError(f"RABO_DATA_DIR={env} is not a directory"
                            + (" (it does not exist)" if not base.exists() else "")
                            + f"; point it at the folder holding the {dataset} files, or unset "
                            "it" + (" to use the bundled MNIST test set" if dataset == "mnist"
                                    else ""))
        subdirs = {"mnist": ["mnist"], "mnist-full": ["mnist-full", "mnist"],
                   "fashion-mnist": ["fashion-mnist"], "cifar10": ["cifar10"]}[dataset]
        # The data set's own subdirectory wins over the base, so that fashion-mnist and
        # mnist-full (same file names) can share one RABO_DATA_DIR.
        order = [base] if dataset == "mnist" else []
        order += [base / s for s in subdirs] + ([] if dataset == "mnist" else [base])
        for candidate in order:
            if _holds(dataset, candidate):
                return candidate
        if dataset != "mnist":
            return base  # the loader names the missing file
        log.warning("RABO_DATA_DIR=%s holds no MNIST files (t10k-images-idx3-ubyte.gz; looked "
                    "in it and its mnist/): using the bundled MNIST test set", env)
    if dataset == "mnist":
        tried = _bundled_mnist_candidates()
        for candidate in tried:
            if _holds(dataset, candidate):
                return candidate
        where = ([f"RABO_DATA_DIR={env} (and its mnist/)"] if env else []) + [str(p) for p in tried]
        raise DataError("the bundled MNIST test set (t10k-images-idx3-ubyte.gz, "
                        "t10k-labels-idx1-ubyte.gz) was not found; looked in "
                        + ", ".join(where) + ". Set data.root or RABO_DATA_DIR")
    raise DataError(f"data set {dataset!r} is read from local files and needs a directory: "
                    "set data.root or RABO_DATA_DIR (nothing is downloaded)")


# --------------------------------------------------------------------------- pool


@dataclass(frozen=True)
class _Raw:
    """Decoded arrays of one data set, as stored (uint8 images, or float for mnist1d)."""

    x: np.ndarray
    y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    num_classes: int
    input_shape: tuple[int, ...]


def _make_mnist1d(seed: int) -> _Raw:
    """Generate MNIST-1D locally, leaving the global ``random``/numpy RNG states untouched."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DataError(f"data.dataset mnist1d: the mnist1d package is not installed ({exc}); "
                        "pip install 'rabo[mnist1d]'") from None

    args = get_dataset_args()
    if hasattr(args, "seed"):
        args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return _Raw(np.asarray(d["x"], dtype=np.float32), np.asarray(d["y"], dtype=np.int64),
                np.asarray(d["x_test"], dtype=np.float32),
                np.asarray(d["y_test"], dtype=np.int64), 10, (int(d["x"].shape[1]),))


@functools.lru_cache(maxsize=8)
def _load_raw(dataset: str, root: str, seed: int) -> _Raw:
    """The decoded arrays, cached per (data set, resolved root, seed) for cheap reuse."""
    path = Path(root)
    if dataset == "mnist":
        x, y = _idx_split(path, "t10k")
        raw = _Raw(x[:, None], y, None, None, 10, (1, *x.shape[1:]))
    elif dataset in ("mnist-full", "fashion-mnist"):
        x, y = _idx_split(path, "train")
        tx, ty = _idx_split(path, "t10k")
        if x.shape[1:] != tx.shape[1:]:
            raise DataError(f"{path}: train images are {x.shape[1:]} but t10k images are "
                            f"{tx.shape[1:]}")
        raw = _Raw(x[:, None], y, tx[:, None], ty, 10, (1, *x.shape[1:]))
    elif dataset == "cifar10":
        x, y, tx, ty = _load_cifar(path)
        raw = _Raw(x, y, tx, ty, 10, (3, 32, 32))
    elif dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = np.asarray(d.images, dtype=np.uint8)  # 16-level pixels 0..16
        raw = _Raw(x[:, None], np.asarray(d.target, dtype=np.int64), None, None, 10, (1, 8, 8))
    elif dataset == "mnist1d":
        raw = _make_mnist1d(seed)
    else:  # pragma: no cover - resolve_root rejects unknown names first
        raise DataError(f"unknown data set {dataset!r}")
    for arr in (raw.x, raw.y, raw.test_x, raw.test_y):
        if arr is not None and arr.flags.writeable:
            arr.setflags(write=False)  # shared through the cache: nobody may mutate it
    return raw


def _to_set(dataset: str, x: np.ndarray, y: np.ndarray) -> TensorSet:
    if dataset == "mnist1d":
        inputs = torch.from_numpy(np.array(x, dtype=np.float32))
    else:
        scale = 16.0 if dataset == "digits" else 255.0
        mean, std = _NORM[dataset]
        shape = (1, len(mean)) + (1,) * (x.ndim - 2)
        m = np.asarray(mean, dtype=np.float32).reshape(shape)
        s = np.asarray(std, dtype=np.float32).reshape(shape)
        inputs = torch.from_numpy((x.astype(np.float32) / np.float32(scale) - m) / s)
    return TensorSet(inputs, torch.from_numpy(np.array(y, dtype=np.int64)))


def load_pool(dataset: str, root: str | None,
              seed: int) -> tuple[TensorSet, TensorSet | None, int, tuple[int, ...]]:
    """(pool, own test set or None, number of classes, input shape), normalized.

    ``seed`` matters only for mnist1d, which is generated; the decoded arrays are cached so
    that repeated calls in one process only pay for normalization.
    """
    path = resolve_root(dataset, root)
    key = str(path.resolve()) if dataset not in ("digits", "mnist1d") else ""
    raw = _load_raw(dataset, key, seed if dataset == "mnist1d" else 0)
    pool = _to_set(dataset, raw.x, raw.y)
    test = None
    if raw.test_x is not None and raw.test_y is not None:
        test = _to_set(dataset, raw.test_x, raw.test_y)
    return pool, test, raw.num_classes, raw.input_shape
