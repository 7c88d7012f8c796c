"""``rabo bench estimator``: accuracy, time and peak memory of every hypergradient estimator.

(a) On a quadratic problem with a closed-form hypergradient (float64), the relative error of
    each estimator at (x, y*(x), v*(x)).
(b) On seven workloads, the time and peak memory of each estimator as a ratio to ``exact``:
      A/mlp  task A, MLP 784-1024-1024-10 (y: the head)
      A/cnn  task A, CNN 1-32-64 (y: the head)
      B/cnn  task B, CNN 1-32-64 (y: the whole network; exact products differentiate all of it)
      A/resnet, B/resnet  the shipped pre-activation ResNet (16-32-64 channels), batch 128
      A/vit, B/vit        the shipped vision transformer (64 wide, 8 heads, 2 blocks), batch 128
    One estimator per subprocess: after warm-up, the median of repeated calls; the peak is the
    resident set's high-water mark above the baseline taken just before the first call (reset
    through /proc/self/clear_refs; glibc's mmap threshold is pinned so that freed tensors leave
    the resident set). On CUDA the allocator's peak statistics are used instead.
    ``fd-forward`` is timed given grad g(x, y), which the inner step has already computed: the
    number is its marginal cost.
(c) FLOPs of the hidden-to-hidden layers of a hidden-heavy MLP per client ratio, against r^2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from bench.measure import in_child, measure
from rabo.errors import ExitCode

ROOT = Path(__file__).resolve().parents[1]

ESTIMATORS = ("fd-central", "fd-forward", "exact", "neumann")
WORKLOADS: dict[str, dict[str, Any]] = {
    "A/mlp": {"task": "A", "kind": "mlp", "hidden": [1024, 1024], "channels": [], "batch": 512},
    "A/cnn": {"task": "A", "kind": "cnn", "hidden": [], "channels": [32, 64], "batch": 512},
    "B/cnn": {"task": "B", "kind": "cnn", "hidden": [], "channels": [32, 64], "batch": 512},
    # the shipped ResNet and ViT sizes (configs/resnet-mnist.yaml, configs/vit-mnist.yaml)
    "A/resnet": {"task": "A", "kind": "resnet", "channels": [16, 32, 64], "batch": 128},
    "B/resnet": {"task": "B", "kind": "resnet", "channels": [16, 32, 64], "batch": 128},
    "A/vit": {"task": "A", "kind": "vit", "batch": 128},
    "B/vit": {"task": "B", "kind": "vit", "batch": 128},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per estimator")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=0, help="override every workload's batch")
    p.add_argument("--steps", default="eager", metavar="STEP,...",
                   help="worker.step modes the estimators run under, side by side (eager, "
                        "compiled, graph; rabo/step.py): each gets its own times and ratios "
                        "to exact under the same mode; the first is the headline")
    p.add_argument("--child", nargs=2, metavar=("WORKLOAD", "ESTIMATOR"), help=argparse.SUPPRESS)
    p.add_argument("--step", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)


# --------------------------------------------------------------------------- (a) accuracy


def quadratic_errors() -> dict[str, dict[str, float]]:
    import torch

    from bench.quadratic import Quadratic
    from rabo.estimators import ESTIMATORS as REGISTRY

    quad = Quadratic.random(nx=6, ny=8, seed=0, cond=5.0)
    x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    y = quad.y_star(x)
    v = quad.v_star(x)
    truth = quad.hypergradient(x)
    out: dict[str, dict[str, float]] = {}
    for name, cls in REGISTRY.items():
        est = cls(eta_v=0.1, radius=0.0, delta=1e-2, neumann_terms=5, neumann_eta=0.15)
        h = est.estimate(quad.problem(), {"x": x}, {"y": y}, {"y": v}).hypergradient["x"]
        out[name] = {"rel_error": float(torch.linalg.norm(h - truth) / torch.linalg.norm(truth))}
    return out


# --------------------------------------------------------------------------- (b) cost


def _setup(workload: str, device: torch.device, batch_override: int) -> tuple[Any, ...]:
    import torch

    from rabo.config import ModelConfig
    from rabo.estimators import Problem
    from rabo.models import model_from_config
    from rabo.tasks import Batch, HyperparameterLearning, HyperRepresentation

    spec = WORKLOADS[workload]
    batch = batch_override or spec["batch"]
    model = model_from_config(ModelConfig(kind=spec["kind"], hidden=spec.get("hidden", []),
                                          channels=spec.get("channels", []), scaler="none"),
                              (1, 28, 28), 10)
    task: Any = (HyperRepresentation(model, mu=0.01) if spec["task"] == "A"
                 else HyperparameterLearning(model, log_l2_init=-4.0))
    x, y = task.init(0)
    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(t.shape, generator=gen) * 1e-2 for k, t in y.items()}
    x = {k: t.to(device) for k, t in x.items()}
    y = {k: t.to(device) for k, t in y.items()}
    v = {k: t.to(device) for k, t in v.items()}

    def make_batch(seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        inputs = torch.randn(batch, 1, 28, 28, generator=g).to(device)
        labels = torch.randint(0, 10, (batch,), generator=g).to(device)
        return Batch(inputs, labels, torch.arange(batch, device=device))

    train, val = make_batch(2), make_batch(3)
    problem = Problem(f=lambda xs, ys: task.f(xs, ys, val), g=lambda xs, ys: task.g(xs, ys, train))
    return problem, x, y, v


def run_child(workload: str, estimator_name: str, repeats: int, device_name: str,
              batch: int, mode: str, step: str = "eager") -> dict[str, Any]:
    """Measure one estimator on one workload in this (fresh) process.

    mode 'time' or 'memory', as ``bench.measure.measure`` takes them (no warm-up before the
    memory call: the first call's allocations are the estimator's). ``step``: run the
    estimate as ``worker.step`` runs a client's local work (rabo.step); a compiled mode's
    first call, which compiles, is a warm-up of both modes.
    """
    import torch

    from rabo.estimators import ESTIMATORS as REGISTRY
    from rabo.estimators import grads
    from rabo.step import runner

    device = torch.device(device_name)
    problem, x, y, v = _setup(workload, device, batch)
    est = REGISTRY[estimator_name](eta_v=0.1, radius=0.0, delta=1e-2, neumann_terms=5,
                                   neumann_eta=0.5)
    base = grads(problem.g, x, y) if est.uses_base else None
    estimate = runner(est.estimate, step, "inductor", device)

    def call() -> None:
        estimate(problem, x, y, v, base)

    if step != "eager":
        call()  # compiles
    return measure(call, mode, repeats, device)[0]


def _child(workload: str, name: str, mode: str, repeats: int, device: str, batch: int,
           step: str = "eager") -> dict[str, Any]:
    return in_child("bench.estimator", ["--child", workload, name, "--mode", mode, "--repeats",
                                        str(repeats), "--device", device, "--batch", str(batch),
                                        "--step", step],
                    mode, f"{workload}/{name} ({step})")


def measure_workload(workload: str, repeats: int, device: str, batch: int,
                     steps: tuple[str, ...] = ("eager",)) -> dict[str, dict[str, Any]]:
    """Time and peak memory of every estimator on ``workload``, each in fresh processes, under
    each of ``steps`` (the first is the headline; ``by_step`` holds all of them)."""
    per: dict[str, dict[str, dict[str, Any]]] = {}
    for step in steps:
        raw: dict[str, dict[str, Any]] = {}
        for name in ESTIMATORS:
            raw[name] = {**_child(workload, name, "time", repeats, device, batch, step),
                         **_child(workload, name, "memory", repeats, device, batch, step)}
        exact = raw["exact"]
        for r in raw.values():
            r["time_vs_exact"] = r["time_s"] / exact["time_s"]
            r["peak_mem_vs_exact"] = (r["peak_bytes"] / exact["peak_bytes"]
                                      if exact["peak_bytes"] > 0 else None)
        per[step] = raw
    out = {name: dict(r) for name, r in per[steps[0]].items()}
    if len(steps) > 1:
        for name in out:
            out[name]["by_step"] = {step: per[step][name] for step in steps}
    return out


# --------------------------------------------------------------------------- (c) FLOPs


FLOPS_MODELS = {
    # name: (what it is, how to build it)
    "mlp": "MLP 784-2048-2048-2048-10",
    "resnet": "configs/resnet-mnist-wide.yaml",
    "vit": "configs/vit-mnist.yaml",
}


def _flops_model(name: str) -> Any:
    from rabo import config
    from rabo.models import build_model, model_from_config

    if name == "mlp":
        return build_model("mlp", (1, 28, 28), 10, [2048, 2048, 2048])
    cfg = config.load(ROOT / FLOPS_MODELS[name])
    return model_from_config(cfg.model, (1, 28, 28), 10)


def flops_per_ratio(ladder: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625),
                    models: tuple[str, ...] = tuple(FLOPS_MODELS)
                    ) -> dict[str, dict[str, dict[str, float]]]:
    """Per model and ratio r: the FLOPs of the layers pruned on both sides (their inputs and
    their outputs are pruned units, found as the layers whose FLOPs at r = 1/2 are a quarter of
    full) against r^2, and of all layers against the full model's."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in models:
        model = _flops_model(name)
        full, half = model.layer_flops(1.0), model.layer_flops(0.5)
        both = [n for n in full if full[n] and abs(half[n] / full[n] - 0.25) < 0.01]
        full_both = sum(full[n] for n in both)
        rows = {}
        for r in ladder:
            fl = model.layer_flops(r)
            pruned = sum(fl[n] for n in both)
            rows[f"{r:g}"] = {"pruned_flops": pruned, "pruned_vs_full": pruned / full_both,
                              "r_squared": r * r,
                              "off_r_squared": pruned / full_both / (r * r) - 1,
                              "total_flops": sum(fl.values()),
                              "total_vs_full": sum(fl.values()) / sum(full.values())}
        out[name] = {"model": FLOPS_MODELS[name], "layers": len(both),  # type: ignore[dict-item]
                     "of_layers": len(full), "ratios": rows}  # type: ignore[dict-item]
    return out


# --------------------------------------------------------------------------- entry


TARGETS = [
    ("B/cnn", "fd-forward", "time_vs_exact", "<=", 0.6),
    ("B/cnn", "fd-central", "peak_mem_vs_exact", "<=", 0.8),
    ("B/cnn", "fd-forward", "peak_mem_vs_exact", "<=", 0.8),
    ("A/mlp", "fd-forward", "time_vs_exact", "<=", 1.1),
    ("A/cnn", "fd-forward", "time_vs_exact", "<=", 1.1),
    ("A/mlp", "neumann", "time_vs_exact", ">=", 3.0),
    ("A/cnn", "neumann", "time_vs_exact", ">=", 3.0),
    ("B/cnn", "neumann", "time_vs_exact", ">=", 3.0),
]


def main(args: argparse.Namespace) -> int:
    import torch

    if args.child:
        workload, name = args.child
        print(json.dumps(run_child(workload, name, args.repeats, args.device, args.batch,
                                   args.mode, args.step)))
        return 0
    steps = tuple(x.strip() for x in args.steps.split(",") if x.strip())
    if not steps or set(steps) - {"eager", "compiled", "graph"}:
        print(f"rabo bench estimator: --steps {args.steps}: each must be eager, compiled or "
              f"graph", file=sys.stderr)
        return ExitCode.USAGE
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"rabo bench estimator: unknown workloads {unknown}; choose from "
              f"{', '.join(WORKLOADS)}", file=sys.stderr)
        return ExitCode.USAGE
    result: dict[str, Any] = {
        "quadratic": quadratic_errors(),
        "workloads": {w: measure_workload(w, args.repeats, args.device, args.batch, steps)
                      for w in workloads},
        "steps": list(steps),
        "flops_per_ratio": flops_per_ratio(),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
    }
    from rabo.experiments.common import machine

    result["machine"] = machine()  # the card and torch build behind the numbers
    checks = []
    for w, est, key, op, bound in TARGETS:
        if w not in result["workloads"]:
            continue
        value = result["workloads"][w][est][key]
        ok = value is not None and (value <= bound if op == "<=" else value >= bound)
        checks.append({"workload": w, "estimator": est, "metric": key, "value": value,
                       "target": f"{op} {bound}", "met": ok})
    result["targets"] = checks
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("(a) quadratic problem, float64: relative error against the closed form")
    for name, r in result["quadratic"].items():
        print(f"    {name:11} {r['rel_error']:.3e}")
    print("(b) cost as a ratio to exact (median of repeats; peak above baseline)")
    print(f"    {'workload':8} {'estimator':11} {'time':>9} {'x exact':>8} {'peak':>10} "
          f"{'x exact':>8}")
    for w, per in result["workloads"].items():
        for name, r in per.items():
            pm = r["peak_mem_vs_exact"]
            print(f"    {w:8} {name:11} {r['time_s'] * 1e3:7.1f}ms {r['time_vs_exact']:8.2f} "
                  f"{r['peak_bytes'] / 2**20:8.1f}MiB {pm if pm is None else f'{pm:8.2f}'}")
            for step, b in r.get("by_step", {}).items():
                print(f"      {step:9} {b['time_s'] * 1e3:7.1f}ms {b['time_vs_exact']:8.2f} "
                      f"{b['peak_bytes'] / 2**20:8.1f}MiB")
    print("(c) FLOPs per ratio of the layers pruned on both sides, against r^2")
    for name, m in result["flops_per_ratio"].items():
        print(f"    {name} ({m['model']}): {m['layers']} of {m['of_layers']} layers")
        for r, fl in m["ratios"].items():
            print(f"      r={r:7} pruned {fl['pruned_flops']:.3e} = {fl['pruned_vs_full']:.4f} of "
                  f"full (r^2 = {fl['r_squared']:.4f}, {100 * fl['off_r_squared']:+.1f}%); "
                  f"all layers {fl['total_vs_full']:.4f}")
    print("targets")
    for c in checks:
        print(f"    {'met ' if c['met'] else 'MISS'} {c['workload']} {c['estimator']} "
              f"{c['metric']} = {c['value']:.2f} (target {c['target']})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
