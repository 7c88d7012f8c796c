"""Checkpoints of the global state: tensors only, written atomically, with a checksum.

Format: ``torch.save`` of a dict of tensors and plain numbers (read back with
``weights_only=True``, so nothing executable is ever unpickled) and a JSON sidecar with the
file's SHA-256, round and config. Writing goes to a temporary file that is fsynced and renamed,
so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from rabo.engine import GlobalState
from rabo.errors import RaboError
from rabo.metrics import temporary_beside

CHECKPOINT = "checkpoint.pt"
LOCK_FILE = ".rabo.lock"  # held (flock) by the process that runs into the folder
SLOTS = "slots.json"  # the coordinator's worker instance -> client slot map (coordinator/)
RUN_FILES = ("metrics.jsonl", "summary.json", SLOTS)  # what a run writes beside checkpoints


class CheckpointError(RaboError):
    """A checkpoint is missing, truncated, corrupt or does not match its checksum."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_write(path: Path, write: Any) -> None:
    tmp = temporary_beside(path)
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def state_dict(state: GlobalState) -> dict[str, Any]:
    return {
        "round": state.round,
        "c_x_star": -1 if state.c_x_star is None else state.c_x_star,
        "x": state.x, "y": state.y, "v": state.v, "opt": state.opt,
        "y_clients": {str(k): v for k, v in state.y_clients.items()},
        "v_clients": {str(k): v for k, v in state.v_clients.items()},
    }


def from_state_dict(d: dict[str, Any]) -> GlobalState:
    return GlobalState(
        round=int(d["round"]), x=d["x"], y=d["y"], v=d["v"], opt=d["opt"],
        y_clients={int(k): v for k, v in d["y_clients"].items()},
        v_clients={int(k): v for k, v in d["v_clients"].items()},
        c_x_star=None if int(d["c_x_star"]) < 0 else int(d["c_x_star"]),
    )


def save(directory: str | Path, state: GlobalState, meta: dict[str, Any] | None = None,
         name: str = CHECKPOINT) -> Path:
    """Write ``directory/name`` and its ``.json`` sidecar atomically; returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    _fsync_write(path, lambda f: torch.save(state_dict(state), f))
    sidecar = {"file": name, "sha256": _sha256(path), "round": state.round, **(meta or {})}
    _fsync_write(path.with_suffix(".json"),
                 lambda f: f.write(json.dumps(sidecar, indent=2).encode()))
    return path


def load(path: str | Path) -> tuple[GlobalState, dict[str, Any]]:
    """Read and verify a checkpoint; raises :class:`CheckpointError` naming what is wrong."""
    path = Path(path)
    sidecar_path = path.with_suffix(".json")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: not found")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: its sidecar {sidecar_path.name} is "
                              "missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: sidecar unreadable: {exc}") from None
    digest = _sha256(path)
    if digest != sidecar.get("sha256"):
        raise CheckpointError(f"checkpoint {path}: SHA-256 {digest[:16]}... does not match "
                              f"the sidecar's {str(sidecar.get('sha256'))[:16]}... "
                              "(truncated or corrupt)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        state = from_state_dict(data)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a bad file
        raise CheckpointError(f"checkpoint {path}: cannot decode: {exc}") from None
    return state, sidecar


def _numbered(directory: Path) -> list[Path]:
    return sorted(directory.glob("ckpt-*.pt"), reverse=True)


def save_rotating(directory: str | Path, state: GlobalState, meta: dict[str, Any] | None = None,
                  keep: int = 3) -> Path:
    """Write ``ckpt-<round>.pt`` and delete all but the newest ``keep`` numbered checkpoints."""
    directory = Path(directory)
    path = save(directory, state, meta, name=f"ckpt-{state.round:06d}.pt")
    for old in _numbered(directory)[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def _candidates(directory: Path) -> list[Path]:
    """Every checkpoint file a resume may start from: numbered ones and the final one."""
    return [p for p in (*_numbered(directory), directory / CHECKPOINT) if p.exists()]


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds any checkpoint to resume from (verified or not)."""
    return Path(directory).is_dir() and bool(_candidates(Path(directory)))


_HELD: dict[Path, Any] = {}  # run folders this process holds the lock of (open lock files)


def lock_run_dir(directory: str | Path) -> Path:
    """Hold an exclusive lock on the run folder ``directory`` (created if missing) for the
    rest of this process, so that two runs never write one folder at once: a second run gets
    :class:`CheckpointError` naming the holder's pid. The lock is an ``flock`` on
    ``directory/LOCK_FILE``; the kernel drops it when the process ends, however it ends."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    if key in _HELD:
        return directory
    f = (directory / LOCK_FILE).open("a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise CheckpointError(f"{directory} is in use by another run (pid {holder}): wait for "
                              f"it to end or pick another folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[key] = f
    return directory


def claim_run_dir(directory: str | Path, overwrite: bool = False,
                  resume: str | None = "--resume {dir}") -> Path:
    """The folder of a run that starts from round 0, locked for this process
    (:func:`lock_run_dir`). A folder that holds another run's results is refused: its
    metrics would be cut or mixed, and rotation would delete the new checkpoints in favour of
    the old run's higher-numbered ones (a later --resume would then continue the old run).
    ``overwrite`` removes those files first. ``resume``: how the calling command continues a
    run (``{dir}`` is the folder), named in the refusal; None where it cannot."""
    directory = Path(directory)
    fresh = not directory.is_dir()
    lock_run_dir(directory)
    if fresh:
        return directory
    found = [p for p in (*(directory / n for n in RUN_FILES), *_candidates(directory))
             if p.exists()]
    if found and not overwrite:
        how = f"continue it with {resume.format(dir=directory)}, " if resume else ""
        raise CheckpointError(
            f"{directory} holds a run ({', '.join(sorted({p.name for p in found})[:4])}"
            f"{', ...' if len(found) > 4 else ''}): {how}"
            f"pick another folder, or pass --overwrite to replace it")
    for p in found:
        p.unlink(missing_ok=True)
        if p.suffix == ".pt":
            p.with_suffix(".json").unlink(missing_ok=True)  # its checksum sidecar
    return directory


def load_latest(directory: str | Path
                ) -> tuple[GlobalState, dict[str, Any], Path, list[tuple[Path, str]]]:
    """The newest checkpoint in ``directory`` that verifies, plus the ones skipped and why.

    Candidates, newest round first: the numbered checkpoints and the final ``checkpoint.pt``.
    A corrupt or truncated one is reported (in the returned list) and the previous good one is
    used; :class:`CheckpointError` when none verifies.
    """
    directory = Path(directory)
    candidates: list[tuple[int, Path]] = []
    for path in _candidates(directory):
        try:
            rnd = int(json.loads(path.with_suffix(".json").read_text()).get("round", -1))
        except (OSError, ValueError):
            rnd = int(path.stem.split("-")[-1]) if path.stem.startswith("ckpt-") else -1
        candidates.append((rnd, path))
    skipped: list[tuple[Path, str]] = []
    for _, path in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            state, sidecar = load(path)
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            continue
        return state, sidecar, path, skipped
    why = "; ".join(e for _, e in skipped) or "no checkpoint files"
    raise CheckpointError(f"no usable checkpoint in {directory}: {why}")
