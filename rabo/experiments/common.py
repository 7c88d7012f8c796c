"""What every experiment shares: run specs, memory budgets that make the ratio policy pick
given ratios, a process pool of simulations, compact per-round curves, statistics over seeds,
and the results files.

A simulation here is ``rabo.runner.simulate`` (the in-process transport, which the parity tests
pin to the gRPC and torch.distributed transports). Each run executes in a worker process with
one torch thread; ``jobs`` such processes run side by side.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "experiments"
RESULTS_DIR = REPO / "docs" / "results"
BYTES_PER_ELEMENT = 4

# Per-dataset settings layered on the task configs (stated in RESULTS.md with every table).
DATASET_OVERRIDES: dict[str, tuple[str, ...]] = {
    "mnist": (),
    # 1,797 8x8 images: momentum-SGD at lr 0.05 oscillated late in the run; 0.02 did not.
    "digits": ("outer.lr=0.02",),
    "mnist1d": (),
}
SPLIT_OVERRIDES: dict[str, tuple[str, ...]] = {
    "iid": ("data.split=iid",),
    "shards": ("data.split=shards", "data.shards_per_client=2"),
    "dirichlet": ("data.split=dirichlet", "data.alpha=0.3"),
}
TIERS = (1.0, 0.5, 0.25, 0.125)  # the ratios the memory budgets are chosen to produce
# Results are compared at convergence; the accuracy at this round is kept as "early" (every
# method is still warming up there: at 20 rounds full reached 87.6%, at 300 rounds 94.1%).
EARLY_ROUND = 20


def config_path(task: str) -> Path:
    return CONFIG_DIR / f"task-{task.lower()}.yaml"


def rel(path: str | Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


@dataclass(frozen=True)
class RunSpec:
    """One simulation: a config file, overrides, and the labels it is reported under.

    ``tier_ratios``: per client, the ratio its simulated memory budget must make the policy
    choose; the budgets are derived from ``rabo.policy.estimate_memory`` in the worker (they
    depend on the task, model, data and estimator) and the chosen ratios are checked.
    """

    key: str
    config: str
    overrides: tuple[str, ...]
    labels: tuple[tuple[str, Any], ...]
    tier_ratios: tuple[float, ...] | None = None
    budget_overrides: tuple[str, ...] = ()  # budgets sized as if these overrides held

    @property
    def label(self) -> dict[str, Any]:
        return dict(self.labels)


def spec(key: str, config_task: str, overrides: Iterable[str],
         tier_ratios: Sequence[float] | None, budget_overrides: Iterable[str] = (),
         **labels: Any) -> RunSpec:
    """A run of ``configs/experiments/task-<config_task>.yaml`` with ``overrides``."""
    return RunSpec(key, rel(config_path(config_task)), tuple(overrides), tuple(labels.items()),
                   tuple(tier_ratios) if tier_ratios is not None else None,
                   tuple(budget_overrides))


# --------------------------------------------------------------------------- budgets


def tier_budgets(job: Any, ratios: Sequence[float], hyper: Any = None) -> list[str]:
    """Per-client memory budgets under which ``rabo.policy.choose_ratio`` picks ``ratios``.

    For a ratio r the budget is the geometric mean of the estimated peak memory at r and at the
    next larger ladder ratio, divided by ``policy.safety`` (1.25x the estimate at the top of
    the ladder): comfortably inside the band where r, and only r, fits. ``hyper``: size the
    budgets for these client settings instead of the job's (e.g. another estimator's).
    """
    from rabo.policy import estimate_memory

    cfg = job.cfg
    hyper = hyper or job.hyper
    ladder = sorted(cfg.policy.ladder)
    batch = job.step_batch(0)
    out = []
    for r in ratios:
        if r not in ladder:
            raise ValueError(f"ratio {r:g} is not on the ladder {ladder}")
        mem = estimate_memory(job.task, hyper, r, batch)
        larger = [q for q in ladder if q > r]
        if larger:
            nxt = estimate_memory(job.task, hyper, min(larger), batch)
            budget = math.sqrt(mem * nxt) / cfg.policy.safety
        else:
            budget = 1.25 * mem / cfg.policy.safety
        out.append(f"{math.ceil(budget / 1024)}KiB")
    return out


def with_budgets(job: Any, ratios: Sequence[float], budget_overrides: Sequence[str] = ()
                 ) -> tuple[Any, list[str]]:
    """A copy of ``job`` whose config carries the budgets for ``ratios``, checked unless
    ``budget_overrides`` size them for other settings (then the policy may pick otherwise)."""
    from rabo import config
    from rabo.engine import ClientHyper

    hyper = None
    if budget_overrides:
        other = config.from_dict(config.apply_overrides(config.to_dict(job.cfg),
                                                        budget_overrides))
        hyper = ClientHyper.from_config(other)
    budgets = tier_budgets(job, ratios, hyper)
    data = config.to_dict(job.cfg)
    data["clients"]["memory_budgets"] = budgets
    data["clients"]["ratios"] = None
    cfg = config.from_dict(data)
    new = job.reconfigured(cfg)
    if cfg.clients.mode == "adaptive" and not budget_overrides:
        got = new.simulated_ratios()
        want = [ratios[c % len(ratios)] for c in range(cfg.clients.count)]
        if got != want:
            raise RuntimeError(f"budgets {budgets} gave ratios {got}, wanted {want}")
    return new, budgets


# --------------------------------------------------------------------------- one run


def compact_curve(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-round series of what the report plots (all clients summed where it says so)."""
    keys = ("round", "test_acc", "test_loss", "upper_loss", "client_upper_loss",
            "hypergradient_norm", "hypergradient_norm_exact", "hypergradient_cg_residual",
            "coverage_x_min", "coverage_x_mean")
    out: dict[str, list[Any]] = {k: [r.get(k) for r in records] for k in keys}
    out["payload_bytes"] = [sum(c["payload_down_bytes"] + c["payload_up_bytes"]
                                for c in r["clients"]) for r in records]
    out["compute_s_sum"] = [round(sum(c["compute_s"] for c in r["clients"]), 6)
                            for r in records]
    out["compute_s_max"] = [round(max((c["compute_s"] for c in r["clients"]), default=0.0), 6)
                            for r in records]
    out["participants"] = [len(r["clients"]) for r in records]
    return out


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def run_spec(s: RunSpec) -> dict[str, Any]:
    """Run one simulation (in this process) and return its compact result."""
    import torch

    from rabo import config
    from rabo.job import Job
    from rabo.params import norm, sub
    from rabo.runner import simulate

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = config.load(REPO / s.config, s.overrides)
    job = Job.from_config(cfg)
    budgets = None
    if s.tier_ratios is not None:
        job, budgets = with_budgets(job, s.tier_ratios, s.budget_overrides)
        cfg = job.cfg
    ratios = job.simulated_ratios()
    x0 = job.engine.init_state().x
    result = simulate(cfg, job=job)
    curve = compact_curve(result.records)
    by_ratio: dict[str, list[float]] = {}
    for r in result.records:
        for c in r["clients"]:
            by_ratio.setdefault(f"{c['ratio']:g}", []).append(c["compute_s"])
    peak = max((c["peak_mem_bytes"] for r in result.records for c in r["clients"]), default=0)
    x_init_norm = norm(x0)
    summary = result.summary
    return {
        "key": s.key,
        "labels": s.label,
        "config": s.config,
        "overrides": list(s.overrides) + ([f"clients.memory_budgets={budgets}"]
                                          if budgets else []),
        "memory_budgets": budgets,
        "ratios": ratios,
        "final": {
            "test_acc": summary["test_acc"],
            "best_test_acc": summary["best_test_acc"],
            # the warm-up: accuracy at round EARLY_ROUND (what the 20-round protocol reported)
            "early_test_acc": next((r["test_acc"] for r in result.records
                                    if r["round"] == EARLY_ROUND), None),
            "test_acc_per_class": summary["test_acc_per_class"],
            "test_acc_per_width": summary["test_acc_per_width"],
            "client_upper_loss": _finite(summary["client_upper_loss"]),
            "test_loss": _finite(summary["test_loss"]),
            "upper_loss": _finite(summary["upper_loss"]),
            "C_x_star": summary["C_x_star"],
            "payload_bytes_total": sum(curve["payload_bytes"]),
            "payload_bytes_per_round": statistics.median(curve["payload_bytes"]),
            "payload_down_bytes_per_round": statistics.median(
                sum(c["payload_down_bytes"] for c in r["clients"]) for r in result.records),
            "payload_up_bytes_per_round": statistics.median(
                sum(c["payload_up_bytes"] for c in r["clients"]) for r in result.records),
            "compute_s_total": sum(curve["compute_s_sum"]),
            "clipped_parts_per_round": statistics.fmean(r.get("clipped_parts", 0)
                                                        for r in result.records),
            "compute_s_per_client_round_by_ratio": {k: statistics.median(v)
                                                    for k, v in sorted(by_ratio.items())},
            "x_rel_change": (norm(sub(result.state.x, x0)) / x_init_norm
                             if x_init_norm > 0 else None),
            # the largest one-step peak of any client: VmHWM restarted at each client step,
            # so it holds the simulator's whole footprint (runtime, every client's data) too
            "max_client_step_peak_bytes": peak,
        },
        "curve": {k: [_finite(v) for v in vals] for k, vals in curve.items()},
        "wall_s": round(time.perf_counter() - t0, 3),
    }


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# --------------------------------------------------------------------------- the run store

# What a simulation's result depends on besides its config: the library (rabo/, whose
# experiments package only labels and reports, apart from common.py, which runs the
# simulation and shapes its result) and the experiment configs. Their bytes are hashed.
_CODE_GLOBS = ("rabo/**/*.py", "configs/experiments/*.yaml")
_CODE_EXCLUDED = ("rabo/experiments/",)
_CODE_INCLUDED = ("rabo/experiments/common.py",)
STORE_VERSION = 1


def code_fingerprint() -> str:
    """sha256 over the source files a simulation's result depends on (path and bytes)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted({p for g in _CODE_GLOBS for p in REPO.glob(g)})
    for p in files:
        r = p.relative_to(REPO).as_posix()
        if r.startswith(_CODE_EXCLUDED) and r not in _CODE_INCLUDED:
            continue
        h.update(r.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def spec_digest(s: RunSpec, fingerprint: str) -> str:
    """The store key of one run: its resolved config (every key, after the overrides), the
    ratios its budgets must produce and what they are sized for, and the code fingerprint.
    Two experiments that run the same configuration share one stored result; labels and
    keys are not part of it."""
    import hashlib

    from rabo import config

    cfg = config.to_dict(config.load(REPO / s.config, s.overrides))
    blob = json.dumps({"v": STORE_VERSION, "config": cfg, "tiers": s.tier_ratios,
                       "budget_overrides": list(s.budget_overrides), "code": fingerprint},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class RunStore:
    """Finished simulations, one JSON file each, written as each run completes: a grid stopped
    by Ctrl-C or a crash resumes without redoing them, and experiments that share a
    configuration run it once. Keyed by ``spec_digest`` (config and code), so an edit to the
    library or the configs never serves an old result."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.fingerprint = code_fingerprint()

    def _path(self, s: RunSpec) -> Path:
        return self.root / f"{spec_digest(s, self.fingerprint)}.json"

    def get(self, s: RunSpec) -> dict[str, Any] | None:
        p = self._path(s)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # a torn or foreign file: run it again
            print(f"rabo experiment: ignoring unreadable stored run {p}: {exc}",
                  file=sys.stderr)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("final"), dict):
            return None
        return {**data, "key": s.key, "labels": s.label, "stored": True}

    def put(self, s: RunSpec, result: dict[str, Any]) -> None:
        from rabo.metrics import write_json

        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self._path(s), {k: v for k, v in result.items() if k != "stored"})


DEFAULT_STORE = REPO / "runs" / "experiment-store"


def run_all(specs: Sequence[RunSpec], jobs: int = 1,
            progress: Callable[[int, int, dict[str, Any]], None] | None = None,
            store: RunStore | None = None) -> list[dict[str, Any]]:
    """Run every spec (``jobs`` processes; 1: in this process); results in spec order.
    With a ``store``, runs found there are not run again and each finished run is stored
    as soon as it completes."""
    results: list[dict[str, Any] | None] = [None] * len(specs)
    todo: list[int] = []
    done = 0
    for i, s in enumerate(specs):
        hit = store.get(s) if store is not None else None
        if hit is None:
            todo.append(i)
            continue
        results[i] = hit
        done += 1
        if progress:
            progress(done, len(specs), hit)

    def finished(i: int, r: dict[str, Any]) -> None:
        nonlocal done
        results[i] = r
        if store is not None:
            store.put(specs[i], r)
        done += 1
        if progress:
            progress(done, len(specs), r)

    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            finished(i, run_spec(specs[i]))
        return [r for r in results if r is not None]
    ctx = get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker) as pool:
        futures = {pool.submit(run_spec, specs[i]): i for i in todo}
        from concurrent.futures import as_completed

        for fut in as_completed(futures):
            i = futures[fut]
            try:
                r = fut.result()
            except Exception as exc:
                # stop at the first failure: the queued runs (hours under --full) would be
                # thrown away with this one's error anyway (the finished ones are stored)
                pool.shutdown(wait=False, cancel_futures=True)
                raise RuntimeError(f"run {specs[i].key} failed: {exc}") from exc
            finished(i, r)
    return [r for r in results if r is not None]


class GridProgress:
    """One line per finished simulation of a grid, with the grid's pace and the time left:
    the pace counts only simulations run here (those served by the run store take no time),
    from this object's creation, so parallel jobs count as they overlap. On a terminal the
    line starts with a progress bar."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, bar: bool | None = None
                 ) -> None:
        from rabo.runner import _stdout_is_terminal

        self.clock = clock
        self.bar = _stdout_is_terminal() if bar is None else bar
        self.t0 = clock()
        self.ran = 0
        self.stored = 0

    def line(self, done: int, total: int, r: dict[str, Any]) -> str:
        from rabo.runner import format_duration, progress_bar

        if r.get("stored"):
            self.stored += 1
        else:
            self.ran += 1
        lab = " ".join(f"{v}" for v in r["labels"].values())
        acc = r["final"]["test_acc"]
        when = "stored" if r.get("stored") else f"{r['wall_s']:.1f}s"
        text = (f"{progress_bar(done, total)} " if self.bar else "  ") + \
            f"[{done:>3}/{total}] {lab:52} acc {acc:.4f}  ({when})"
        left = total - done
        if self.ran and left > 0:
            per_run = (self.clock() - self.t0) / self.ran
            pace = f"{60 / per_run:.1f} runs/min" if per_run > 0 else "-"
            text += f"  {pace}, ETA {format_duration(per_run * left)}"
        return text

    def __call__(self, done: int, total: int, r: dict[str, Any]) -> None:
        print(self.line(done, total, r), flush=True)


# --------------------------------------------------------------------------- statistics


def stats(values: Iterable[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(vals), "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals)}


def cost_against(base: dict[str, Any], other: dict[str, Any]) -> tuple[float, float] | None:
    """mean(base) - mean(other) of two :func:`stats`, and the larger of their standard
    deviations (the seed noise a cost is compared with); None when either has no mean."""
    if base["mean"] is None or other["mean"] is None:
        return None
    return base["mean"] - other["mean"], max(base["std"] or 0.0, other["std"] or 0.0)


def group(runs: Iterable[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], list[dict]]:
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(tuple(r["labels"].get(k) for k in keys), []).append(r)
    return out


def mean_curve(runs: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Per-round mean and std over runs of one curve (rounds with a value in every run)."""
    series = [r["curve"][key] for r in runs]
    n = min(len(s) for s in series)
    mean, std = [], []
    for i in range(n):
        vals = [s[i] for s in series if s[i] is not None]
        if len(vals) < len(series):
            mean.append(float("nan"))
            std.append(float("nan"))
            continue
        mean.append(statistics.fmean(vals))
        std.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return mean, std


def cumulative(values: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += float(v or 0.0)
        out.append(total)
    return out


# --------------------------------------------------------------------------- results files


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    with contextlib.suppress(OSError):
        info["loadavg_at_end"] = list(os.getloadavg())
    info.update(git_state())
    from rabo.provenance import provenance

    p = provenance()
    info.update({"rabo_version": p["rabo_version"], "torch_cuda_build": p["torch_cuda_build"],
                 "host": p["host"], "command_line": p["command"]})
    return info


def git_state() -> dict[str, Any]:
    """The commit the numbers come from, and whether tracked files had local changes: read
    when this process first asked (``rabo experiment`` asks as it starts, so edits made while
    a grid runs do not change what its results say they came from)."""
    from rabo.provenance import provenance

    p = provenance()
    commit = p["git_commit"]
    return {"git_commit": commit[:7] if commit else None,
            "git_modified_files": p["git_modified_files"]}


@dataclass
class Results:
    """What an experiment writes: ``<out>/<name>.json``."""

    name: str
    preset: str
    command: str
    configs: list[str]
    settings: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        tasks = [Path(c).stem.split("-")[-1].upper() for c in self.configs]
        return {"experiment": self.name, "preset": self.preset, "command": self.command,
                "configs": self.configs, "settings": self.settings, "wall_s": self.wall_s,
                "base_configs": base_configs(tasks),
                "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
                **self.extra, "runs": self.runs}


def run_experiment(name: str, preset: str, specs: Sequence[RunSpec], jobs: int,
                   tasks: Iterable[str], settings: dict[str, Any],
                   extra: dict[str, Any] | None = None,
                   store: RunStore | None = None) -> dict[str, Any]:
    """Run an experiment's simulations with progress, and return its results file's content
    (``Results.to_dict``) with the wall time it took (runs served by ``store`` take none)."""
    print(f"rabo experiment {name} ({preset}): {len(specs)} simulations on {jobs} "
          f"process(es)" + (f", finished runs kept in {store.root}" if store else ""),
          flush=True)
    t0 = time.perf_counter()
    runs = run_all(specs, jobs, GridProgress(), store)
    res = Results(name, preset, command_line(name, preset),
                  [rel(config_path(t)) for t in tasks], settings, runs,
                  {**(extra or {}), "stored_runs": sum(1 for r in runs if r.get("stored"))})
    res.wall_s = round(time.perf_counter() - t0, 1)
    return res.to_dict()


def base_configs(tasks: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The resolved task configs (every key), recorded with the results."""
    from rabo import config

    return {rel(config_path(t)): config.to_dict(config.load(config_path(t))) for t in tasks}


def write_results(out: Path, data: dict[str, Any]) -> Path:
    from rabo.metrics import write_json

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{data['experiment']}.json"
    write_json(path, data)
    return path


def read_results(out: Path) -> dict[str, dict[str, Any]]:
    """Every results file in ``out`` by name; unreadable ones are reported, not fatal."""
    found: dict[str, dict[str, Any]] = {}
    for p in sorted(Path(out).glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            print(f"rabo experiment report: skipping {p}: {exc}", file=sys.stderr)
            continue
        found[p.stem] = data
    return found


def command_line(name: str, preset: str, extra: str = "") -> str:
    flag = {"full": " --full", "reduced": "", "tiny": " --quick"}.get(preset,
                                                                            f" --preset {preset}")
    return f"rabo experiment {name}{flag}{extra}"
