"""``rabo bench transport``: what moving a P-parameter model costs, measured in one run.

A real coordinator (this process) and N real worker processes (``python -m worker.echo``: the
full protocol, zero compute) on 127.0.0.1 run R rounds of task A with an MLP sized to P
parameters; ratios are cycled over the workers. Printed:

* ``payload_bytes`` / ``message_bytes`` / ``wire_bytes`` per round (tensor bytes; serialized
  gRPC messages; bytes on the TCP connections from the kernel's counters), and their ratio;
* per ratio, the fraction of the full model's payload a worker receives and sends, against r^2;
* ``round_overhead_s``: median round wall time (open to aggregated) minus the slowest worker's
  compute, against ``loopback_transfer_s``: the same wire bytes through a plain socket pair on
  127.0.0.1, measured in the same run;
* ``aggregation_bytes_per_s``: update bytes over the time of the coverage averaging of x, y and
  v on the same shapes (and ``server_step_bytes_per_s``, the averaging plus the x optimizer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rabo import config
from rabo.provenance import provenance
from rabo.runtime import peak_memory_bytes, reset_peak_memory, rss_bytes


def add_transport_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=float, default=10e6, help="model parameters (default 10M)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ratios", default="1,0.5,0.25,0.125", help="cycled over the workers")
    p.add_argument("--chunk-bytes", type=int, default=1024 * 1024)
    p.add_argument("--json", action="store_true")


def hidden_for(params: float, inputs: int = 64, classes: int = 10) -> int:
    """h with an MLP inputs-h-h-classes of about ``params`` parameters."""
    # h^2 + (inputs + classes + 2) h + classes - params = 0
    b = inputs + classes + 2
    return max(4, int((-b + math.sqrt(b * b + 4 * (params - classes))) / 2))


def loopback_seconds(nbytes: int, repeats: int = 3) -> float:
    """Median time to push ``nbytes`` through a TCP socket pair on 127.0.0.1."""
    block = bytes(1 << 20)
    times = []
    for _ in range(repeats):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        cli = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        done = threading.Event()

        def reader(c: socket.socket = conn, finished: threading.Event = done) -> None:
            buf = bytearray(1 << 20)
            left = nbytes
            view = memoryview(buf)
            while left > 0:
                n = c.recv_into(view, min(left, len(buf)))
                if n == 0:
                    break
                left -= n
            finished.set()

        t = threading.Thread(target=reader)
        t.start()
        start = time.perf_counter()
        left = nbytes
        while left > 0:
            n = min(left, len(block))
            cli.sendall(block[:n])
            left -= n
        done.wait()
        times.append(time.perf_counter() - start)
        t.join()
        for s in (cli, conn, srv):
            s.close()
    return statistics.median(times)


def grpc_floor_seconds(down_bytes: int, up_bytes: int, chunk_bytes: int, repeats: int = 3,
                       wrapped: bool = False) -> float:
    """Median time to stream the same bytes through bare gRPC (one server-streaming call for
    the downloads, one client-streaming call for the uploads, nothing else) on 127.0.0.1: the
    floor that gRPC Python itself sets under the coordinator's work. Raw messages as the
    wire carries them (protocol 4); ``wrapped``: each chunk inside a protobuf message (a
    ``BytesValue``), as protocol 3 sent them, for comparison."""
    from concurrent import futures

    import grpc
    from google.protobuf.wrappers_pb2 import BytesValue

    block = bytes(chunk_bytes)

    def pieces(total: int) -> Iterator[bytes]:
        off = 0
        while off < total:
            n = min(chunk_bytes, total - off)
            data = block[:n] if n < chunk_bytes else block
            yield BytesValue(value=data).SerializeToString() if wrapped else data
            off += n

    def unwrap(data: bytes) -> bytes:
        return BytesValue.FromString(data).value if wrapped else data

    def fetch(request: bytes, context: Any) -> Iterator[bytes]:
        yield from pieces(down_bytes)

    def submit(request_iterator: Iterator[bytes], context: Any) -> bytes:
        for data in request_iterator:
            unwrap(data)
        return b""

    def ident(data: bytes) -> bytes:
        return data

    handler = grpc.method_handlers_generic_handler("rabo.bench.Floor", {
        "Fetch": grpc.unary_stream_rpc_method_handler(
            fetch, request_deserializer=ident, response_serializer=ident),
        "Submit": grpc.stream_unary_rpc_method_handler(
            submit, request_deserializer=ident, response_serializer=ident)})
    opts = [("grpc.max_send_message_length", 4 * chunk_bytes + (1 << 20)),
            ("grpc.max_receive_message_length", 4 * chunk_bytes + (1 << 20))]
    server = grpc.server(futures.ThreadPoolExecutor(4), options=opts)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    times = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as channel:
            fetch_call = channel.unary_stream("/rabo.bench.Floor/Fetch",
                                              request_serializer=ident,
                                              response_deserializer=ident)
            submit_call = channel.stream_unary("/rabo.bench.Floor/Submit",
                                               request_serializer=ident,
                                               response_deserializer=ident)
            for _ in range(repeats):
                start = time.perf_counter()
                for data in fetch_call(b""):
                    unwrap(data)
                submit_call(pieces(up_bytes))
                times.append(time.perf_counter() - start)
    finally:
        server.stop(0)
    return statistics.median(times)


def aggregation_rate(cfg: config.Config, ratios: list[float], repeats: int = 3
                     ) -> tuple[float, float]:
    """(coverage-averaging bytes/s, whole server-step bytes/s) on the run's shapes."""
    import torch

    from rabo.aggregation import CoverageAverager, apply_average
    from rabo.engine import Update
    from rabo.job import Job

    job = Job.from_config(cfg)
    eng = job.engine
    state = eng.init_state()
    gen = torch.Generator().manual_seed(0)
    results = []
    for cid, r in enumerate(ratios):
        plan = eng.plan(1, cid, r)
        a = eng.assign(state, plan)

        def rnd(p: dict) -> dict:
            return {k: torch.randn(t.shape, generator=gen) for k, t in p.items()}

        results.append((plan, Update(1, cid, rnd(a.x), rnd(a.y), rnd(a.v), 1, 0.0)))
    nbytes = sum(u.payload_numel() * 4 for _, u in results)
    avg_times, step_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for full, part in ((state.x, "x"), (state.y, "y"), (state.v, "v")):
            acc = CoverageAverager(full)
            for plan, upd in results:
                acc.add(plan.x if part == "x" else plan.y, getattr(upd, part))
            acc.stats()
            apply_average(full, acc)
        avg_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        eng.server_step(state, results)
        step_times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(avg_times), nbytes / statistics.median(step_times)


def echo_job_config(params: float, workers: int, rounds: int, ratios: Sequence[float],
                    chunk_bytes: int, deadline_s: float, extra: Sequence[str] = ()
                    ) -> config.Config:
    """The job of the echo-worker benches: task A's MLP sized to ``params`` on digits, ratios
    cycled over ``workers``, static masks, registrations limited only well above the fleet."""
    hidden = hidden_for(params)
    cycled = [ratios[i % len(ratios)] for i in range(workers)]
    return config.load(None, [
        "data.dataset=digits", f"model.hidden=[{hidden}, {hidden}]", f"rounds={rounds}",
        f"clients.count={workers}", f"cluster.workers={workers}", f"clients.ratios={cycled}",
        "outer.optimizer=sgd", f"eval_every={rounds}", f"cluster.chunk_bytes={chunk_bytes}",
        f"cluster.max_message_bytes={max(4 * chunk_bytes, 4 << 20)}",
        f"cluster.round_deadline_s={deadline_s:g}", "cluster.register_timeout_s=600",
        "mask.policy=static", f"cluster.register_rate_per_s={max(5, 10 * workers)}",
        # dozens of processes starting on a few cores: no live one may expire meanwhile
        "cluster.heartbeat_misses=30", *extra])


def run_transport(params: float, workers: int, rounds: int, ratios: list[float],
                  chunk_bytes: int) -> dict[str, Any]:
    from bench.floor import grpc_floor_processes
    from coordinator.local import run_echo_workers
    from coordinator.server import serve

    cfg = echo_job_config(params, workers, rounds, ratios, chunk_bytes, deadline_s=600)
    hidden, cycled = cfg.model.hidden[0], list(cfg.clients.ratios or ())
    rss_start = rss_bytes()
    reset_peak_memory()  # the high-water mark from here (Linux: /proc/self/clear_refs)
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=1.0)
    run_echo_workers(server, workers)
    # peak resident set of this process (the coordinator; the workers are other processes)
    # during the rounds, above what it held before the coordinator started
    peak_above = max(0, peak_memory_bytes() - rss_start)
    records = server.driver.records
    if os.environ.get("RABO_BENCH_DEBUG"):
        for r in records:
            print(json.dumps({k: r[k] for k in ("round", "round_s", "aggregation_s", "eval_s")}),
                  [(c["ratio"], c["transfer_s"], c["receive_s"], c["upload_s"])
                   for c in r["clients"]], file=sys.stderr)
    num_params = server.coord.job.model.num_params()
    y_numel = sum(math.prod(lay.shape) for lay in server.coord.job.task.y_layout.values())
    full_payload = 4 * (num_params + y_numel)  # x + y + v: the backbone, the head twice
    # the first round includes the workers' connection set-up; leave it out when we can
    steady = records[1:] if len(records) > 1 else records
    per_round: list[dict[str, Any]] = []
    for r in steady:
        clients = r["clients"]
        wire_each = [c["wire_down_bytes"] for c in clients] + [c["wire_up_bytes"] for c in clients]
        per_round.append({
            "payload": sum(c["payload_down_bytes"] + c["payload_up_bytes"] for c in clients),
            "message": sum(c["message_down_bytes"] + c["message_up_bytes"] for c in clients),
            "wire": sum(wire_each) if all(w is not None for w in wire_each) else None,
            "overhead": r["round_s"] - max((c["compute_s"] for c in clients), default=0.0),
            "cpu": r["process_cpu_s"],
        })
    payload = statistics.median(p["payload"] for p in per_round)
    message = statistics.median(p["message"] for p in per_round)
    wires = [p["wire"] for p in per_round if p["wire"] is not None]
    wire = statistics.median(wires) if wires else None
    overhead = statistics.median(p["overhead"] for p in per_round)
    cpu = statistics.median(p["cpu"] for p in per_round)
    loop_s = loopback_seconds(int(wire or message))
    down = statistics.median(sum(c["payload_down_bytes"] for c in r["clients"]) for r in steady)
    up = statistics.median(sum(c["payload_up_bytes"] for c in r["clients"]) for r in steady)
    floor_s = grpc_floor_seconds(int(down), int(up), chunk_bytes)
    last = sorted(steady[-1]["clients"], key=lambda c: c["client_id"])
    procs_s, procs_cpu = grpc_floor_processes([c["payload_down_bytes"] for c in last],
                                              [c["payload_up_bytes"] for c in last],
                                              chunk_bytes)
    wrapped_s = grpc_floor_seconds(int(down), int(up), chunk_bytes, wrapped=True)
    by_ratio: dict[str, Any] = {}
    for c in steady[-1]["clients"]:
        key = f"{c['ratio']:g}"
        by_ratio[key] = {
            "down_fraction": c["payload_down_bytes"] / full_payload,
            "up_fraction": c["payload_up_bytes"] / full_payload,
            "r_squared_plus_0.03": c["ratio"] ** 2 + 0.03,
        }
    agg, step = aggregation_rate(cfg, cycled)
    return {
        "params": num_params, "hidden": hidden, "workers": workers, "rounds": rounds,
        "chunk_bytes": chunk_bytes, "ratios": cycled,
        "payload_bytes": payload, "message_bytes": message, "wire_bytes": wire,
        "wire_vs_payload": (wire / payload) if wire else None,
        "message_vs_payload": message / payload,
        "round_overhead_s": overhead, "loopback_transfer_s": loop_s,
        "overhead_vs_loopback": overhead / loop_s,
        "grpc_floor_s": floor_s, "overhead_vs_grpc_floor": overhead / floor_s,
        "grpc_floor_protobuf_chunks_s": wrapped_s,
        # the same bytes per worker through bare gRPC between this process (an asyncio
        # server) and one client process per worker, rounds in lock step (bench.floor)
        "grpc_floor_processes_s": procs_s, "grpc_floor_server_cpu_s": procs_cpu,
        "overhead_vs_grpc_floor_processes": overhead / procs_s,
        # user + system CPU of the coordinator's process over a round (getrusage through
        # time.process_time, every thread: the servicer's event loop, gRPC's own threads and
        # the round driver), median over the steady rounds
        "coordinator_cpu_s": cpu, "coordinator_cpu_s_per_gb": cpu / (payload / 1e9),
        "aggregation_bytes_per_s": agg, "server_step_bytes_per_s": step,
        "coordinator_peak_above_start_bytes": peak_above,
        "coordinator_peak_model_copies": peak_above / (4 * num_params),
        "payload_fraction_by_ratio": by_ratio,
        "wire_method": "kernel tcp_info (sock_diag)" if wire else "unavailable",
        "provenance": provenance(),
    }


def cmd_bench_transport(args: argparse.Namespace) -> int:
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    result = run_transport(args.params, args.workers, args.rounds, ratios, args.chunk_bytes)
    targets = []
    if result["wire_vs_payload"] is not None:
        targets.append(("wire bytes / payload bytes", result["wire_vs_payload"], "<=", 1.03))
    targets.append(("round overhead / loopback transfer", result["overhead_vs_loopback"], "<=",
                    2.0))
    targets.append(("coordinator CPU s per round", result["coordinator_cpu_s"], "<=", 0.5))
    targets.append(("aggregation GB/s", result["aggregation_bytes_per_s"] / 1e9, ">=", 3.0))
    for r, f in result["payload_fraction_by_ratio"].items():
        targets.append((f"ratio {r}: payload fraction", max(f["down_fraction"],
                                                             f["up_fraction"]),
                        "<=", f["r_squared_plus_0.03"]))
    result["targets"] = [{"what": w, "value": v, "target": f"{op} {b:g}",
                          "met": v <= b if op == "<=" else v >= b} for w, v, op, b in targets]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    mib = 2**20
    print(f"model: {result['params']:,} parameters (MLP 64-{result['hidden']}-"
          f"{result['hidden']}-10), {result['workers']} echo worker processes, ratios "
          f"{result['ratios']}, {result['rounds']} rounds, chunks of "
          f"{result['chunk_bytes'] / mib:g} MiB")
    print(f"per round: payload {result['payload_bytes'] / mib:.2f} MiB, messages "
          f"{result['message_bytes'] / mib:.2f} MiB, wire "
          + (f"{result['wire_bytes'] / mib:.2f} MiB" if result["wire_bytes"] else "n/a"))
    print(f"round overhead {result['round_overhead_s'] * 1e3:.1f} ms; the same bytes over a "
          f"loopback socket pair {result['loopback_transfer_s'] * 1e3:.1f} ms, through bare "
          f"gRPC streams {result['grpc_floor_s'] * 1e3:.1f} ms as raw messages, "
          f"{result['grpc_floor_protobuf_chunks_s'] * 1e3:.1f} ms inside protobuf messages")
    print(f"bare gRPC with the same worker processes: {result['grpc_floor_processes_s'] * 1e3:.1f}"
          f" ms per round, server CPU {result['grpc_floor_server_cpu_s']:.3f} s")
    print(f"coordinator CPU {result['coordinator_cpu_s']:.3f} s per round "
          f"({result['coordinator_cpu_s_per_gb']:.3f} s per GB of payload); peak memory "
          f"{result['coordinator_peak_above_start_bytes'] / 2**20:.0f} MiB above start-up "
          f"({result['coordinator_peak_model_copies']:.1f} float32 copies of the model)")
    print(f"aggregation {result['aggregation_bytes_per_s'] / 1e9:.2f} GB/s of update bytes "
          f"(whole server step with the x optimizer: "
          f"{result['server_step_bytes_per_s'] / 1e9:.2f} GB/s)")
    for r, f in result["payload_fraction_by_ratio"].items():
        print(f"ratio {r:>6}: receives {f['down_fraction']:.4f}, sends {f['up_fraction']:.4f} of "
              f"the full payload (r^2 + 0.03 = {f['r_squared_plus_0.03']:.4f})")
    print("targets")
    for t in result["targets"]:
        print(f"    {'met ' if t['met'] else 'MISS'} {t['what']} = {t['value']:.3f} "
              f"(target {t['target']})")
    return 0


# --------------------------------------------------------------------------- compare-transports


def add_compare_args(p: argparse.ArgumentParser) -> None:
    from rabo.cliargs import add_config_args

    add_config_args(p)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--out", metavar="DIR", help="keep both run folders here")
    p.add_argument("--json", action="store_true")


def _medians(run_dir: Path) -> dict[str, Any]:
    from rabo.metrics import read_metrics

    records = read_metrics(run_dir)
    steady = records[1:] if len(records) > 1 else records

    def med(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"rounds": len(records), "payload_bytes": med("payload_bytes"),
            "wire_bytes": med("wire_bytes"), "round_s": med("round_s"),
            "compute_s": med("compute_s"), "transfer_s": med("transfer_s"),
            "aggregation_s": med("aggregation_s"),
            "test_acc": records[-1].get("test_acc") if records else None}


def cmd_compare_transports(args: argparse.Namespace) -> int:
    """The same job over gRPC and over torch.distributed (gloo), side by side."""
    from coordinator.local import run_local
    from rabo import checkpoint
    from rabo.cliargs import load_config
    from rabo.params import max_abs_diff

    workers = args.workers
    args.overrides = [*args.overrides, f"clients.count={workers}", f"cluster.workers={workers}"]
    cfg = load_config(args)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rabo-compare-"))
    grpc_dir, dist_dir = base / "grpc", base / "gloo"
    threads = max(1, (os.cpu_count() or 1) // workers)
    print(f"gRPC: coordinator + {workers} worker processes ...", flush=True)
    run_local(cfg, workers, grpc_dir, cfg.clients.memory_budgets, threads=threads)
    print(f"torch.distributed (gloo): torchrun with {workers + 1} processes ...", flush=True)
    sets = sum((["--set", o] for o in args.overrides), [])
    if args.config:
        sets = ["--config", args.config, *sets]
    if getattr(args, "rounds", None):
        sets += ["--rounds", str(args.rounds)]
    env = dict(os.environ, GRPC_VERBOSITY="ERROR", RABO_DIE_WITH_PARENT=str(os.getpid()))
    if cfg.clients.memory_budgets:
        # the same per-client budgets as the gRPC workers' --memory-limit: the same ratios
        sets += ["--worker-memory-limits", ",".join(cfg.clients.memory_budgets)]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers + 1),
         "--master-port", str(_free_port()), "-m", "rabo.dist", "--backend", "gloo",
         "--threads", str(threads), "--out", str(dist_dir), "--overwrite", *sets],
        capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
        return 1
    g, d = _medians(grpc_dir), _medians(dist_dir)
    sg, _ = checkpoint.load(grpc_dir / "checkpoint.pt")
    sd, _ = checkpoint.load(dist_dir / "checkpoint.pt")
    diff = max(max_abs_diff(sg.x, sd.x), max_abs_diff(sg.y, sd.y), max_abs_diff(sg.v, sd.v))
    result = {"grpc": g, "gloo": d, "max_abs_diff_final_state": diff, "run_dirs": str(base)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    mib = 2**20
    print(f"{'median per round':24} {'gRPC':>12} {'gloo':>12}")
    for key, unit, scale in (("payload_bytes", "MiB", mib), ("wire_bytes", "MiB", mib),
                             ("round_s", "s", 1), ("compute_s", "s", 1),
                             ("transfer_s", "s", 1), ("aggregation_s", "s", 1)):
        cells = [f"{v / scale:12.4f}" if v is not None else f"{'n/a':>12}"
                 for v in (g[key], d[key])]
        print(f"{key + ' (' + unit + ')':24} {cells[0]} {cells[1]}")
    print(f"{'final test_acc':24} {g['test_acc']:12.4f} {d['test_acc']:12.4f}")
    print(f"final x, y, v differ by at most {diff:.2e}; run folders in {base}")
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- load


def run_load(workers: int = 200, heartbeats: int = 5, timeout_s: float = 120.0
             ) -> dict[str, Any]:
    """``workers`` lightweight simulated workers (one thread and one channel each) register
    at once against one coordinator on loopback and heartbeat; latencies of every call."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from coordinator.server import serve
    from rabo_proto import PROTOCOL_VERSION
    from rabo_proto.v1 import rabo_pb2 as pb
    from rabo_proto.v1 import rabo_pb2_grpc as pb_grpc

    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[8]",
                             f"clients.count={workers}", "rounds=1",
                             "cluster.heartbeat_s=30", "cluster.register_timeout_s=600",
                             # every simulated worker shares 127.0.0.1
                             f"cluster.register_rate_per_s={10 * workers}"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0)
    target = f"127.0.0.1:{server.port}"
    start_gate = threading.Barrier(workers)

    def one(i: int) -> tuple[float, list[float], str]:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            grpc.channel_ready_future(ch).result(timeout=timeout_s)
            start_gate.wait(timeout=timeout_s)
            t0 = time.perf_counter()
            reply = stub.Register(pb.RegisterRequest(
                name=f"sim-{i}", client_id=-1, protocol=PROTOCOL_VERSION,
                profile=pb.ResourceProfile(memory_budget_bytes=1 << 30)), timeout=timeout_s)
            reg = time.perf_counter() - t0
            lat = []
            for _ in range(heartbeats):
                t0 = time.perf_counter()
                stub.Heartbeat(pb.HeartbeatRequest(worker_id=reply.worker_id,
                                                   credential=reply.credential),
                               timeout=timeout_s)
                lat.append(time.perf_counter() - t0)
            return reg, lat, reply.worker_id

    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, range(workers)))
        registered = len(server.coord.registry)
    finally:
        server.stop(0)
    wall = time.perf_counter() - began
    hb = sorted(x for _, lat, _ in results for x in lat)
    reg = sorted(r for r, _, _ in results)

    def pct(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, int(p / 100 * len(values)))]

    return {"workers": workers, "registered": registered,
            "distinct_ids": len({w for _, _, w in results}),
            "heartbeats": len(hb), "heartbeat_p50_ms": 1e3 * pct(hb, 50),
            "heartbeat_p99_ms": 1e3 * pct(hb, 99), "register_p50_ms": 1e3 * pct(reg, 50),
            "register_p99_ms": 1e3 * pct(reg, 99), "wall_s": wall}


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=200)
    p.add_argument("--heartbeats", type=int, default=5)
    p.add_argument("--json", action="store_true")


def cmd_bench_load(args: argparse.Namespace) -> int:
    r = run_load(args.workers, args.heartbeats)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['workers']} simulated workers: {r['registered']} registered "
          f"({r['distinct_ids']} distinct ids), {r['heartbeats']} heartbeats in "
          f"{r['wall_s']:.1f}s")
    print(f"register  p50 {r['register_p50_ms']:.1f} ms  p99 {r['register_p99_ms']:.1f} ms")
    print(f"heartbeat p50 {r['heartbeat_p50_ms']:.1f} ms  p99 {r['heartbeat_p99_ms']:.1f} ms")
    return 0
