"""worker.step: the compiled local work gives the eager step's numbers (rabo.step).

On the CPU: torch.compile through AOTAutograd with eager kernels (aot_eager: the whole
capture path, graph breaks included, at no compile cost), and once with the inductor backend
(C++ kernels); CUDA graphs (worker.step: graph) need a GPU and run eager here, which a test
pins. bench/gpu.sh measures the CUDA paths where a GPU is lent."""

from __future__ import annotations

import logging

import pytest
import torch

from rabo import config
from rabo.engine import client_step
from rabo.job import Job
from rabo.params import max_abs_diff
from rabo.runner import simulate
from rabo.step import resolve

SMALL = ["data.dataset=digits", "clients.count=2", "inner.steps=2", "data.batch_size=32"]
WORKLOADS = {
    "A/mlp fd-central": ["task=A", "model.hidden=[24, 16]", "estimator.name=fd-central"],
    "B/mlp fd-forward": ["task=B", "model.hidden=[24]", "estimator.name=fd-forward"],
    "A/cnn rafbo": ["task=A", "model.kind=cnn", "model.hidden=[]", "model.channels=[4, 8]",
                    "algorithm=rafbo", "outer.local_steps=2"],
}


def _step(overrides: list[str], step: str, ratio: float):
    job = Job.from_config(config.load(None, [*SMALL, *overrides, f"worker.step={step}",
                                             "worker.compile_backend=aot_eager"]))
    eng = job.engine
    state = eng.init_state()
    gen = torch.Generator().manual_seed(3)  # a v that is not zero: the products are computed
    state.v = {k: torch.randn(t.shape, generator=gen) * 0.1 for k, t in state.v.items()}
    a = eng.assign(state, eng.plan(1, 0, ratio))
    return client_step(job.task, a, job.data.clients[0], torch.device("cpu"))


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_the_compiled_step_gives_the_eager_steps_numbers(workload: str) -> None:
    from torch._dynamo.utils import counters

    for ratio in (1.0, 0.25):
        eager = _step(WORKLOADS[workload], "eager", ratio)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        compiled = _step(WORKLOADS[workload], "compiled", ratio)
        # compiled for real (graphs made, this ratio is new), whole (no graph break)
        assert counters["stats"]["unique_graphs"] > graphs
        assert sum(counters["graph_break"].values()) == breaks
        for part in ("x", "y", "v"):
            a, b = getattr(eager, part), getattr(compiled, part)
            assert list(a) == list(b)
            assert max_abs_diff(a, b) <= 1e-6, (workload, ratio, part)
            assert any(float(t.abs().max()) > 0 for t in a.values())  # a real update


def test_a_compiled_run_ends_at_the_eager_runs_model() -> None:
    """Three rounds at mixed ratios with rolling masks: the shapes change from client to
    client (one compilation each) and the model comes out the same."""
    base = [*SMALL, "model.hidden=[24, 16]", "rounds=3", "clients.count=3",
            "clients.ratios=[1, 0.5, 0.25]", "mask.policy=rolling",
            "worker.compile_backend=aot_eager"]
    eager = simulate(config.load(None, [*base, "worker.step=eager"])).state
    compiled = simulate(config.load(None, [*base, "worker.step=compiled"])).state
    for part in ("x", "y", "v"):
        assert max_abs_diff(getattr(eager, part), getattr(compiled, part)) <= 1e-6
    one_less = simulate(config.load(None, [*base, "worker.step=eager", "rounds=2"])).state
    assert max_abs_diff(eager.x, one_less.x) > 1e-4  # the comparison can fail


@pytest.mark.slow
def test_the_inductor_compiled_step_matches_eager_on_the_cpu() -> None:
    """torch.compile's CPU backend (C++ kernels, fused and reordered): within 1e-6 of eager,
    and the second step at the same ratio reuses the compilation."""
    ov = ["task=A", "model.hidden=[16]", "estimator.name=fd-central", "inner.steps=1"]
    job = Job.from_config(config.load(None, [*SMALL, *ov, "worker.step=compiled"]))
    eng = job.engine
    state = eng.init_state()
    a = eng.assign(state, eng.plan(1, 0, 0.5))
    data = job.data.clients[0]
    from torch._dynamo.utils import counters

    compiled = client_step(job.task, a, data, torch.device("cpu"))
    graphs = counters["stats"]["unique_graphs"]
    again = client_step(job.task, a, data, torch.device("cpu"))
    eager_job = Job.from_config(config.load(None, [*SMALL, *ov, "worker.step=eager"]))
    eager = client_step(eager_job.task, eager_job.engine.assign(state, eng.plan(1, 0, 0.5)),
                        eager_job.data.clients[0], torch.device("cpu"))
    for part in ("x", "y", "v"):
        assert max_abs_diff(getattr(eager, part), getattr(compiled, part)) <= 1e-6
        assert max_abs_diff(getattr(compiled, part), getattr(again, part)) == 0
    assert counters["stats"]["unique_graphs"] == graphs  # compiled once: no new graph


def test_graph_steps_run_eager_off_cuda_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    import rabo.step

    rabo.step._warned.discard("graph")
    with caplog.at_level(logging.WARNING, logger="rabo"):
        assert resolve("graph", torch.device("cpu")) == "eager"
        assert resolve("graph", torch.device("cpu")) == "eager"
    assert sum("CUDA graphs" in r.message for r in caplog.records) == 1  # said once
    assert resolve("graph", torch.device("cuda")) == "graph"
    assert resolve("auto", torch.device("cpu")) == "eager"
    assert resolve("compiled", torch.device("cpu")) == "compiled"
    eager = _step(WORKLOADS["A/mlp fd-central"], "eager", 0.5)
    graph = _step(WORKLOADS["A/mlp fd-central"], "graph", 0.5)
    assert max_abs_diff(eager.x, graph.x) == 0


def test_a_bad_step_names_the_key() -> None:
    with pytest.raises(Exception, match="worker.step"):
        config.load(None, ["worker.step=fast"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu.sh "
                    "runs this where a GPU is lent)")
@pytest.mark.parametrize("step", ["compiled", "graph"])
def test_cuda_steps_match_the_eager_cuda_step(step: str) -> None:
    """On CUDA the fused kernels may sum in another order than eager's: within 1e-5."""
    ov = ["task=A", "model.hidden=[64, 32]", "estimator.name=fd-central"]
    out = {}
    for mode in ("eager", step):
        job = Job.from_config(config.load(None, [*SMALL, *ov, f"worker.step={mode}"]))
        eng = job.engine
        state = eng.init_state()
        for ratio in (1.0, 0.5):
            a = eng.assign(state, eng.plan(1, 0, ratio))
            for _ in range(2):  # the second at a ratio replays what the first compiled
                out[mode, ratio] = client_step(job.task, a, job.data.clients[0],
                                               torch.device("cuda"))
    for ratio in (1.0, 0.5):
        for part in ("x", "y", "v"):
            diff = max_abs_diff(getattr(out["eager", ratio], part),
                                getattr(out[step, ratio], part))
            assert diff <= 1e-5, (step, ratio, part, diff)


def test_the_gpu_script_parses_and_names_commands_that_exist() -> None:
    """bench/gpu.sh runs where a GPU is lent, in one call: it must not fail on a typo."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", "-n", str(root / "bench" / "gpu.sh")], check=True)
    text = (root / "bench" / "gpu.sh").read_text()
    assert "tests/test_step.py" in text and (root / "tests" / "test_step.py").exists()
    for module, flags in (("bench.system", ("--steps", "--device", "--parts")),
                          ("bench.estimator", ("--device", "--json", "--steps"))):
        assert f"-m {module}" in text
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                             text=True, cwd=root, check=True).stdout
        assert all(f in out for f in flags), (module, out[-500:])
    from bench.system import RATIO_LADDER, RATIO_WORKLOADS

    assert "gpu" in RATIO_WORKLOADS and "gpu" in RATIO_LADDER
