"""``rabo bench system [--full]``: what the system costs, measured; JSON + PNGs in docs/results.

Three parts (``--parts``, default all):

grid     A real coordinator (this process) and N echo worker processes (``python -m
         worker.echo``: the whole protocol, zero compute; see ``rabo bench transport``) run R
         rounds of task A with an MLP sized to P parameters, ratios 1, 1/2, 1/4, 1/8 cycled over
         the workers. Per (N, P): the round time, the round overhead (round time minus the
         slowest worker's compute, which is ~0 for echo workers), the coordinator's CPU seconds
         per round (``getrusage(RUSAGE_SELF)`` of this process, sampled at the end of every
         round: the gRPC server, the slicing, checksums, aggregation and evaluation; the echo
         workers are other processes and are not counted), payload / message / wire bytes per
         round, and the same bytes through a loopback socket pair for scale. The first round
         (connection set-up) is left out of the medians. Points whose estimated memory does not
         fit are skipped with the reason.
compare  The same job over gRPC and over torch.distributed (gloo): ``rabo bench
         compare-transports --json`` in a subprocess.
ratio    Per-worker compute time and peak memory of ``rabo.engine.client_step`` at each width
         ratio, each measurement in a fresh subprocess (the method of ``rabo bench
         estimator``: median of timed calls after warm-up; the resident set's high-water mark
         above the baseline taken just before one call, with glibc's mmap threshold pinned so
         freed tensors leave the resident set), next to ``rabo.policy.estimate_memory``. On
         CPU; ``--device cuda`` uses the CUDA allocator's peak instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.measure import in_child, measure
from rabo.errors import ExitCode
from rabo.runtime import rss_bytes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results"
RATIOS = (1.0, 0.5, 0.25, 0.125)
ECHO_RSS_BYTES = 60 << 20  # one echo worker process (grpc + protobuf, no torch), generous


class Grid:
    def __init__(self, workers: list[int], params: list[float], rounds: int) -> None:
        self.workers, self.params, self.rounds = workers, params, rounds


GRIDS = {
    "reduced": Grid([8, 32], [1e6, 10e6], 4),
    "full": Grid([8, 32, 128], [1e6, 10e6, 50e6], 5),
    "tiny": Grid([2], [2e4], 2),
}
COMPARE: dict[str, list[tuple[str, str, int, int, list[str]]]] = {
    "reduced": [("A, MLP 784-256-256-10", "configs/experiments/task-a.yaml", 3, 6, [])],
    "full": [("A, MLP 784-256-256-10", "configs/experiments/task-a.yaml", 3, 10, []),
             ("B, MLP 784-256-256-10", "configs/experiments/task-b.yaml", 3, 10, []),
             ("A, MLP 784-1024-1024-10", "configs/experiments/task-a.yaml", 4, 10,
              ["model.hidden=[1024, 1024]"])],
    "tiny": [("A, digits MLP 64-16-10", "configs/experiments/task-a.yaml", 2, 2,
              ["data.dataset=digits", "model.hidden=[16]"])],
}
WIDE_RESNET = "A/resnet 64-128-256"
RATIO_WORKLOADS = {
    "reduced": [("A/mlp 784-1024-1024-10", "A", ["model.hidden=[1024, 1024]"]),
                ("B/mlp 784-1024-1024-10", "B", ["model.hidden=[1024, 1024]"]),
                # the shipped ResNet and ViT (configs/resnet-mnist.yaml, configs/vit-mnist.yaml)
                ("A/resnet 16-32-64", "A", ["model.kind=resnet", "model.channels=[16, 32, 64]"]),
                ("A/vit 64, 8 heads", "A", ["model.kind=vit"]),
                # the largest shipped size (configs/resnet-mnist-wide.yaml): where pruning
                # turns into step time on a CPU, whose small convolutions are overhead-bound
                (WIDE_RESNET, "A", ["model.kind=resnet", "model.channels=[64, 128, 256]"])],
    "full": [("A/mlp 784-1024-1024-10", "A", ["model.hidden=[1024, 1024]"]),
             ("B/mlp 784-1024-1024-10", "B", ["model.hidden=[1024, 1024]"]),
             ("A/cnn 32-64", "A", ["model.kind=cnn", "model.hidden=[]",
                                   "model.channels=[32, 64]"]),
             ("B/cnn 32-64", "B", ["model.kind=cnn", "model.hidden=[]",
                                   "model.channels=[32, 64]"]),
             ("A/mlp 784-1024-1024-10 exact", "A", ["model.hidden=[1024, 1024]",
                                                    "estimator.name=exact"])],
    "tiny": [("A/mlp 64-16-10", "A", ["data.dataset=digits", "model.hidden=[16]"])],
    # bench/gpu.sh (--parts ratio only): the MLP and the largest shipped model at both ends
    # of the ladder, sized for one call on a lent GPU with compiled and graph steps beside eager
    "gpu": [("A/mlp 784-1024-1024-10", "A", ["model.hidden=[1024, 1024]"]),
            (WIDE_RESNET, "A", ["model.kind=resnet", "model.channels=[64, 128, 256]"])],
}
RATIO_LADDER = {"reduced": RATIOS, "full": (*RATIOS, 0.0625), "tiny": (1.0, 0.5),
                "gpu": (1.0, 0.125)}
RATIO_REPEATS = {"reduced": 5, "full": 9, "tiny": 2, "gpu": 5}


def add_system_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true",
                   help="the whole grid: 8/32/128 workers x 1M/10M/50M parameters (what fits), "
                        "more transports and workloads")
    p.add_argument("--preset", choices=["reduced", "full", "tiny", "gpu"], default=None,
                   help=argparse.SUPPRESS)  # gpu: the ratio part of bench/gpu.sh alone
    p.add_argument("--parts", default="grid,compare,ratio",
                   help="comma-separated subset of grid, compare, ratio")
    p.add_argument("--out", metavar="DIR", default=str(DEFAULT_OUT),
                   help="results folder (default docs/results): system.json and PNGs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="device of the per-ratio worker measurements")
    p.add_argument("--steps", default="eager", metavar="STEP,...",
                   type=lambda v: tuple(x.strip() for x in v.split(",") if x.strip()),
                   help="worker.step modes timed side by side by the ratio part (eager, "
                        "compiled, graph; the first is the reference of time_vs_full). "
                        "Each ratio's first two steps (compilation included) are warm-up; "
                        "the compile time is reported apart")
    p.add_argument("--child-ratio", nargs=3, metavar=("TASK", "RATIO", "OVERRIDES_JSON"),
                   help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)


# --------------------------------------------------------------------------- grid


def _available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def memory_needed(params: float, workers: int, ratios: tuple[float, ...] = RATIOS) -> int:
    """A generous estimate of the memory one grid point needs on this machine: the
    coordinator's x, y, v and optimizer state, every update of a round held until aggregation
    plus the slices cut for sending, and the echo processes."""
    cycled = [ratios[i % len(ratios)] for i in range(workers)]
    full = 4 * params
    state = 4 * full
    updates = 2 * sum(r * r for r in cycled) * full * 1.05
    return int(state + updates + workers * ECHO_RSS_BYTES)


def run_point(params: float, workers: int, rounds: int, chunk_bytes: int = 1 << 20
              ) -> dict[str, Any]:
    """One grid point: coordinator here, ``workers`` echo processes; per-round CPU samples."""
    from bench.transport import echo_job_config, loopback_seconds
    from coordinator.local import run_echo_workers
    from coordinator.server import serve

    cfg = echo_job_config(params, workers, rounds, RATIOS, chunk_bytes, deadline_s=1200,
                          extra=["cluster.heartbeat_s=5"])
    hidden, cycled = cfg.model.hidden[0], list(cfg.clients.ratios or ())
    samples: list[tuple[float, float, int]] = []

    def cpu_s() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def on_round(rec: dict[str, Any]) -> None:
        samples.append((time.perf_counter(), cpu_s(), rss_bytes()))

    t_start, cpu_start = time.perf_counter(), cpu_s()
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=1.0, progress=on_round)
    run_echo_workers(server, workers)
    records = server.driver.records
    num_params = server.coord.job.model.num_params()
    steady = list(range(1, len(records))) if len(records) > 1 else [0]
    cpu_per_round = [samples[i][1] - samples[i - 1][1] for i in steady if i >= 1]
    per: list[dict[str, Any]] = []
    for i in steady:
        r = records[i]
        cl = r["clients"]
        wire_each = [c["wire_down_bytes"] for c in cl] + [c["wire_up_bytes"] for c in cl]
        per.append({
            "payload": sum(c["payload_down_bytes"] + c["payload_up_bytes"] for c in cl),
            "message": sum(c["message_down_bytes"] + c["message_up_bytes"] for c in cl),
            "wire": sum(wire_each) if all(w is not None for w in wire_each) else None,
            "round_s": r["round_s"],
            "overhead": r["round_s"] - max((c["compute_s"] for c in cl), default=0.0),
            "aggregation_s": r.get("aggregation_s"),
        })
    med = statistics.median
    payload = med(p["payload"] for p in per)
    wires = [p["wire"] for p in per if p["wire"] is not None]
    wire = med(wires) if wires else None
    round_s = med(p["round_s"] for p in per)
    cpu = med(cpu_per_round) if cpu_per_round else None
    return {
        "params": num_params, "params_target": params, "hidden": hidden, "workers": workers,
        "rounds": rounds, "ratios": cycled, "chunk_bytes": chunk_bytes,
        "payload_bytes_per_round": payload,
        "message_bytes_per_round": med(p["message"] for p in per),
        "wire_bytes_per_round": wire,
        "wire_vs_payload": wire / payload if wire else None,
        "round_s": round_s, "round_overhead_s": med(p["overhead"] for p in per),
        "aggregation_s": med(p["aggregation_s"] for p in per
                             if p["aggregation_s"] is not None),
        "coordinator_cpu_s_per_round": cpu,
        "coordinator_cpu_utilisation": cpu / round_s if cpu is not None and round_s else None,
        # the coordinator's CPU seconds per GB of tensor bytes moved (both ways)
        "coordinator_cpu_s_per_gb": cpu / (payload / 1e9) if cpu is not None and payload else None,
        "coordinator_rss_bytes_end": samples[-1][2] if samples else None,
        "setup_s": (samples[0][0] - t_start) if samples else None,
        "setup_cpu_s": (samples[0][1] - cpu_start) if samples else None,
        "loopback_transfer_s": loopback_seconds(int(wire or payload), repeats=1),
        "payload_mb_per_s": payload / round_s / 1e6 if round_s else None,
    }


def run_grid(grid: Grid) -> dict[str, Any]:
    points, skipped = [], []
    for params in grid.params:
        for workers in grid.workers:
            need = memory_needed(params, workers)
            avail = _available_bytes()
            if need > 0.6 * avail:
                skipped.append({"params": params, "workers": workers,
                                "reason": f"needs about {need / 2**30:.1f} GiB (coordinator "
                                          f"state, one round's updates and slices, "
                                          f"{workers} echo processes); "
                                          f"{avail / 2**30:.1f} GiB available, limit 60%"})
                print(f"  skip {workers:>3} workers x {params / 1e6:g}M: {skipped[-1]['reason']}",
                      flush=True)
                continue
            t0 = time.perf_counter()
            pt = run_point(params, workers, grid.rounds)
            points.append(pt)
            print(f"  {workers:>3} workers x {pt['params'] / 1e6:6.2f}M params: round "
                  f"{pt['round_s']:.3f}s, overhead {pt['round_overhead_s']:.3f}s, "
                  f"coordinator CPU {pt['coordinator_cpu_s_per_round'] or 0:.3f}s/round "
                  f"({pt['coordinator_cpu_s_per_gb'] or 0:.3f}s/GB), "
                  f"payload {pt['payload_bytes_per_round'] / 2**20:.1f} MiB/round, wire/payload "
                  f"{pt['wire_vs_payload'] or float('nan'):.5f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return {"workers": grid.workers, "params": grid.params, "rounds": grid.rounds,
            "points": points, "skipped": skipped}


# --------------------------------------------------------------------------- compare


def run_compare(preset: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, cfg_path, workers, rounds, extra in COMPARE[preset]:
        tmp = Path(tempfile.mkdtemp(prefix="rabo-sysbench-compare-"))
        ratios = list(RATIOS[:workers]) if workers <= len(RATIOS) else list(RATIOS)
        sets = [f"clients.ratios={ratios}", "data.dataset=mnist", *extra]
        if "digits" in " ".join(extra):
            sets = [s for s in sets if s != "data.dataset=mnist"]
        cmd = [sys.executable, "-m", "rabo.cli", "bench", "compare-transports", "--json",
               "--workers", str(workers), "--config", str(REPO / cfg_path), "--rounds",
               str(rounds), "--out", str(tmp)]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        env = dict(os.environ, GRPC_VERBOSITY="ERROR")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            out.append({"name": name, "error": (proc.stdout + proc.stderr)[-2000:],
                        "command": _shell(cmd)})
            print(f"  compare-transports {name}: FAILED", flush=True)
            continue
        text = proc.stdout
        data = json.loads(text[text.index("{"):])
        data.pop("run_dirs", None)
        _rmtree(tmp)
        shown = ["rabo", *cmd[3:]]  # cmd[:3] is this Python running rabo.cli
        out.append({"name": name, "config": cfg_path, "workers": workers, "rounds": rounds,
                    "overrides": sets, "command": _shell(shown, relative=True),
                    "wall_s": round(wall, 1), **data})
        g, d = data["grpc"], data["gloo"]
        print(f"  compare-transports {name}: round_s gRPC {g['round_s']:.4f} / gloo "
              f"{d['round_s']:.4f}; final state differs by {data['max_abs_diff_final_state']:.1e}"
              f" ({wall:.0f}s)", flush=True)
    return out


def _shell(cmd: list[str], relative: bool = False) -> str:
    parts = []
    for c in cmd:
        if relative and c.startswith(str(REPO)):
            c = os.path.relpath(c, REPO)
        if relative and c.startswith(tempfile.gettempdir()):
            c = "TMPDIR"
        if c == sys.executable:
            c = "python"
        parts.append(f"'{c}'" if " " in c or "[" in c else c)
    return " ".join(parts)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- ratio


def ratio_child(task: str, ratio: float, overrides: list[str], mode: str, repeats: int,
                device_name: str) -> dict[str, Any]:
    """One measurement of ``client_step`` at ``ratio`` in this (fresh) process."""

    import torch

    from rabo import config
    from rabo.engine import client_step
    from rabo.job import Job
    from rabo.policy import estimate_flops, estimate_memory

    device = torch.device(device_name)
    cfg = config.load(REPO / "configs" / "experiments" / f"task-{task.lower()}.yaml",
                      ["data.dataset=mnist", *overrides])
    job = Job.from_config(cfg)
    eng = job.engine
    state = eng.init_state()
    # a v that is not zero, so that the estimator's products are computed (v = 0 skips them)
    gen = torch.Generator().manual_seed(1)
    state.v = {k: torch.randn(t.shape, generator=gen) * 1e-2 for k, t in state.v.items()}
    plan = eng.plan(2, 0, ratio)
    a = eng.assign(state, plan)
    data = job.data.clients[0]
    if device.type == "cuda":
        data = type(data)(data.client_id, data.train.to(device), data.val.to(device))
    batch = job.step_batch(0)
    info = {"estimate_bytes": estimate_memory(job.task, job.hyper, ratio, batch),
            "estimate_flops": estimate_flops(job.task, job.hyper, ratio, batch),
            "payload_bytes": 4 * a.payload_numel(), "batch": batch,
            "estimator": cfg.estimator.name, "threads": torch.get_num_threads()}

    def call() -> Any:
        return client_step(job.task, a, data, device)

    first_s = None
    if mode == "time":  # the first step of a compiled mode compiles: timed on its own
        t0 = time.perf_counter()
        call()
        first_s = time.perf_counter() - t0
    figures, u = measure(call, mode, repeats, device, memory_warmup=1)
    if mode == "time":
        figures["compute_s_reported"] = u.compute_s
        figures["first_step_s"] = first_s
        figures["step"] = cfg.worker.step
    return {**info, **figures}


def _ratio_subprocess(task: str, ratio: float, overrides: list[str], mode: str, repeats: int,
                      device: str) -> dict[str, Any]:
    return in_child("bench.system", ["--child-ratio", task, str(ratio), json.dumps(overrides),
                                     "--mode", mode, "--repeats", str(repeats), "--device",
                                     device], mode, f"ratio {task} {ratio}", cwd=REPO)


def run_ratio(preset: str, device: str, steps: tuple[str, ...] = ("eager",)
              ) -> dict[str, Any]:
    out = []
    for name, task, overrides in RATIO_WORKLOADS[preset]:
        rows = []
        for r in RATIO_LADDER[preset]:
            timed = {s: _ratio_subprocess(task, r, [*overrides, f"worker.step={s}"], "time",
                                          RATIO_REPEATS[preset], device) for s in steps}
            t = timed[steps[0]]
            m = _ratio_subprocess(task, r, [*overrides, f"worker.step={steps[0]}"], "memory",
                                  1, device)
            rows.append({"ratio": r, "time_s": t["time_s"], "step": steps[0],
                         "time_s_by_step": {s: x["time_s"] for s, x in timed.items()},
                         "first_step_s_by_step": {s: x["first_step_s"]
                                                  for s, x in timed.items()},
                         "peak_bytes": m["peak_bytes"],
                         "peak_method": m["peak_method"], "estimate_bytes": t["estimate_bytes"],
                         "estimate_flops": t["estimate_flops"],
                         "payload_bytes": t["payload_bytes"], "batch": t["batch"],
                         "estimator": t["estimator"], "torch_threads": t["threads"]})
        full = rows[0]
        for row in rows:
            row["time_vs_full"] = row["time_s"] / full["time_s"]
            row["time_vs_full_by_step"] = {s: t / full["time_s_by_step"][s]
                                           for s, t in row["time_s_by_step"].items()}
            row["time_vs_eager_by_step"] = (
                {s: t / row["time_s_by_step"]["eager"] for s, t in row["time_s_by_step"].items()}
                if "eager" in row["time_s_by_step"] else {})
            row["peak_vs_full"] = row["peak_bytes"] / full["peak_bytes"] \
                if full["peak_bytes"] > 0 else None
            row["estimate_vs_full"] = row["estimate_bytes"] / full["estimate_bytes"]
            row["peak_vs_estimate"] = row["peak_bytes"] / row["estimate_bytes"]
        out.append({"workload": name, "task": task, "overrides": overrides, "rows": rows})
        print(f"  per-ratio {name}: " + ", ".join(
            f"r={x['ratio']:g} {x['time_s'] * 1e3:.0f}ms {x['peak_bytes'] / 2**20:.1f}MiB "
            f"(est {x['estimate_bytes'] / 2**20:.1f})" for x in rows), flush=True)
        if len(steps) > 1:
            for x in rows:
                print(f"    r={x['ratio']:g} " + ", ".join(
                    f"{s} {t * 1e3:.1f}ms (first step {x['first_step_s_by_step'][s]:.1f}s)"
                    for s, t in x["time_s_by_step"].items()), flush=True)
    return {"device": device, "steps": list(steps), "workloads": out}


# --------------------------------------------------------------------------- entry


def cmd_bench_system(args: argparse.Namespace) -> int:
    if args.child_ratio:
        task, ratio, ov = args.child_ratio
        print(json.dumps(ratio_child(task, float(ratio), json.loads(ov), args.mode,
                                     args.repeats, args.device)))
        return 0
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    preset = args.preset or ("full" if args.full else "reduced")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"grid", "compare", "ratio"}
    if unknown:
        print(f"rabo bench system: unknown parts {sorted(unknown)}", file=sys.stderr)
        return ExitCode.USAGE
    if not args.steps or set(args.steps) - {"eager", "compiled", "graph"}:
        print(f"rabo bench system: --steps {','.join(args.steps)}: each must be eager, "
              f"compiled or graph", file=sys.stderr)
        return ExitCode.USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "system" if args.device == "cpu" else f"system_{args.device}"
    path = out / f"{name}.json"
    previous: dict[str, Any] = {}
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = {}
    if previous.get("preset") != preset:
        previous = {}
    t0 = time.perf_counter()
    if preset == "gpu" and parts != ["ratio"]:
        print("rabo bench system: --preset gpu has the ratio part alone (--parts ratio)",
              file=sys.stderr)
        return ExitCode.USAGE
    flag = {"full": " --full", "reduced": "", "tiny": " --preset tiny",
            "gpu": " --preset gpu"}[preset]
    if args.device != "cpu":
        flag += f" --device {args.device}"
    if args.steps != ("eager",):
        flag += f" --steps {','.join(args.steps)}"
    this_run = f"rabo bench system{flag}" + (
        f" --parts {','.join(parts)}" if set(parts) != {"grid", "compare", "ratio"} else "")
    result: dict[str, Any] = {
        "experiment": name, "preset": preset,
        "command": f"rabo bench system{flag}",
        "device_note": ("CPU only: this machine has no GPU" if args.device == "cpu"
                        else f"per-ratio part on {args.device}"),
    }
    timings = dict(previous.get("part_wall_s", {}))
    part_commands = dict(previous.get("part_commands", {}))
    for part in ("grid", "compare", "ratio"):
        if part not in parts:
            if part in previous:
                result[part] = previous[part]
            continue
        print(f"rabo bench system: {part} ({preset})", flush=True)
        p0 = time.perf_counter()
        if part == "grid":
            result["grid"] = run_grid(GRIDS[preset])
        elif part == "compare":
            result["compare"] = run_compare(preset)
        else:
            result["ratio"] = run_ratio(preset, args.device, args.steps)
        timings[part] = round(time.perf_counter() - p0, 1)
        part_commands[part] = this_run
    result["part_wall_s"] = timings
    result["part_commands"] = {p: c for p, c in part_commands.items() if p in result}
    # parts kept from an earlier run of the same preset count with their own times
    result["wall_s"] = round(sum(timings.get(p, 0.0) for p in ("grid", "compare", "ratio")
                                 if p in result), 1)
    from rabo.experiments.common import machine, write_results
    from rabo.experiments.system import plot

    result["machine"] = machine()
    result["generated"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write_results(out, result)
    plots = plot(result, out)
    print(f"rabo bench system: wrote {path} and {len(plots)} plot(s) in "
          f"{time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m bench.system")
    add_system_args(parser)
    sys.exit(cmd_bench_system(parser.parse_args()))
