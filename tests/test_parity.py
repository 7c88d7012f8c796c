"""One config, one seed, every transport: the same final x, y and v (to 1e-6).

The main correctness test of the system (docs/architecture.md): the in-process runner is the
reference; each transport (gRPC coordinator + worker processes; torch.distributed over gloo
launched by torchrun) runs the same job with real processes and is compared with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from rabo import checkpoint, config
from rabo.engine import GlobalState
from rabo.params import max_abs_diff
from rabo.runner import simulate

OVERRIDES = ["data.dataset=digits", "clients.count=3", "rounds=3",
             "clients.ratios=[1, 0.5, 0.25]", "mask.policy=rolling", "inner.steps=2",
             "data.batch_size=32", "outer.optimizer=adam", "outer.lr=0.01",
             "estimator.name=fd-central",
             "cluster.heartbeat_misses=30"]  # every worker in every round, even under load
ENV = dict(os.environ, GRPC_VERBOSITY="ERROR")
MODELS = {"mlp": ["model.hidden=[48, 32]"],
          "resnet": ["model.kind=resnet", "model.channels=[4, 8]"],
          "vit": ["model.kind=vit", "model.options={patch: 4, dim: 16, heads: 4, mlp: 16}"]}


def run_grpc(tmp: Path, overrides: list[str]) -> GlobalState:
    out = tmp / "grpc"
    cmd = [sys.executable, "-m", "rabo.cli", "local", "--workers", "3", "--threads", "1",
           "--out", str(out), *sum((["--set", o] for o in overrides), [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state, _ = checkpoint.load(out / "checkpoint.pt")
    return state


def run_dist(tmp: Path, overrides: list[str]) -> GlobalState:
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-port", str(free_port()), "-m", "rabo.dist", "--threads", "1", "--out",
           str(out), *sum((["--set", o] for o in overrides), [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state, _ = checkpoint.load(out / "checkpoint.pt")
    return state




TRANSPORTS = {"grpc": run_grpc, "dist-gloo": run_dist}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(model: str) -> GlobalState:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run with one thread each
    try:
        return simulate(config.load(None, [*OVERRIDES, *MODELS[model]])).state
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_transport_matches_in_process(transport: str, model: str, reference: GlobalState,
                                      tmp_path: Path) -> None:
    overrides = [*OVERRIDES, *MODELS[model]]
    state = TRANSPORTS[transport](tmp_path, overrides)
    assert state.round == reference.round == 3
    for part in ("x", "y", "v"):
        diff = max_abs_diff(getattr(reference, part), getattr(state, part))
        assert diff <= 1e-6, f"{transport}: {part} differs by {diff}"
    assert max_abs_diff(reference.x, simulate(config.load(None, [*overrides, "rounds=2"])).state.x
                        ) > 1e-4  # the comparison can fail: one round less is far away


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])  # float16 takes bfloat16's path
def test_a_compressed_wire_gives_the_same_model_on_every_transport(dtype: str, tmp_path: Path
                                                                   ) -> None:
    """16-bit casts, and int8 with error feedback: each client's residuals, carried across
    rolling masks, evolve the same in-process, in gRPC worker processes and on gloo ranks."""
    overrides = [*OVERRIDES, *MODELS["mlp"], f"wire.dtype={dtype}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sim = simulate(config.load(None, overrides))
        f32 = simulate(config.load(None, [*OVERRIDES, *MODELS["mlp"]])).state
    finally:
        torch.set_num_threads(threads)
    # the rounding happened (the model is not float32's) and is the same everywhere
    assert max_abs_diff(sim.state.x, f32.x) > 0
    for name, run in sorted(TRANSPORTS.items()):
        state = run(tmp_path / name, overrides)
        for part in ("x", "y", "v"):
            diff = max_abs_diff(getattr(sim.state, part), getattr(state, part))
            assert diff <= 1e-6, f"{name}: {part} differs by {diff}"
    # 2 bytes per element each way (int8: 1 plus the block scales), on gRPC's wire too
    lines = [json.loads(line) for line in
             (tmp_path / "grpc" / "grpc" / "metrics.jsonl").read_text().splitlines()]
    for rec in lines:
        for c in rec["clients"]:
            for way in ("down", "up"):
                nbytes, elems = c[f"payload_{way}_bytes"], c[f"payload_{way}_elems"]
                if dtype == "int8":  # a scale per 256 entries, one more per tensor at most
                    assert elems < nbytes < 1.05 * elems, (way, nbytes, elems)
                else:
                    assert nbytes == 2 * elems
            if c["wire_down_bytes"] is not None:
                assert c["wire_down_bytes"] < 1.01 * c["payload_down_bytes"] + 4096
