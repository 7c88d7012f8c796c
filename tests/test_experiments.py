"""The results generator end to end on tiny configs (digits, 2-4 clients, a few rounds):
every experiment group writes its JSON, and the report's tables carry the numbers of that
JSON. The system benchmark (gRPC, real processes) is marked slow."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from rabo.experiments import (
    ablations,
    claims,
    common,
    communication,
    coverage,
    estimators,
    robust,
    wire,
)
from rabo.experiments.cli import run_group
from rabo.experiments.markdown import pct
from rabo.experiments.report import build_report, write_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results")
    store = common.RunStore(tmp_path_factory.mktemp("store"))
    for name in GROUPS:
        run_group(name, "tiny", out, jobs=1, store=store)
    return out


GROUPS = ("claims", "ablations", "estimators", "coverage", "communication", "robust",
          "wire")


def _load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_every_group_writes_its_json_and_plots(results: Path) -> None:
    for name in GROUPS:
        data = _load(results, name)
        assert data["experiment"] == name and data["preset"] == "tiny"
        assert data["runs"], name
        assert data["command"] == f"rabo experiment {name} --quick"
        for run in data["runs"]:
            assert len(run["curve"]["round"]) == len(run["curve"]["test_acc"]) >= 2
            assert run["final"]["test_acc"] is not None
    assert {p.name for p in results.glob("*.png")} >= {
        "claims_curves_A.png", "claims_final_A.png", "estimators.png",
        "coverage_A_digits_iid.png", "communication.png", "ablations_final_A.png"}


def test_experiments_share_identical_runs_through_the_store(results: Path) -> None:
    """The ablation grid's RABO runs are the claims grid's (same config, same code): served
    by the store, with the claims runs' numbers, under the ablation grid's own labels."""
    abl, cl = _load(results, "ablations"), _load(results, "claims")
    def at(r: dict) -> tuple:
        return r["labels"]["task"], r["labels"]["seed"]

    rabo = {at(r): r for r in cl["runs"] if r["labels"]["method"] == "RABO"}
    served = [r for r in abl["runs"] if r.get("stored")]
    assert abl["stored_runs"] == len(served) == len(rabo) == 4  # tasks A and B, 2 seeds
    for r in served:
        assert r["labels"]["method"] == "RABO"
        assert r["final"] == rabo[at(r)]["final"]
        assert r["curve"] == rabo[at(r)]["curve"]
    assert not any(r.get("stored") for r in cl["runs"])  # claims ran first: nothing to serve
    others = [r for r in abl["runs"] if not r.get("stored")]
    assert {r["labels"]["method"] for r in others} == {"RABO, x frozen", "RABO static"}


def test_a_stopped_grid_resumes_without_redoing_finished_runs(tmp_path: Path) -> None:
    specs = claims.build_specs("tiny")[:3]
    store = common.RunStore(tmp_path)
    seen: list[str] = []

    def stop_after_two(done: int, total: int, r: dict) -> None:
        seen.append(r["key"])
        if done == 2:
            raise KeyboardInterrupt  # Ctrl-C after the second run finished

    with pytest.raises(KeyboardInterrupt):
        common.run_all(specs, 1, stop_after_two, store)
    assert len(list(tmp_path.glob("*.json"))) == 2
    again = common.run_all(specs, 1, None, store)
    assert [r["key"] for r in again] == [s.key for s in specs]
    assert [bool(r.get("stored")) for r in again] == [True, True, False]
    assert [r["final"]["test_acc"] for r in again[:2]] == [
        json.loads(p.read_text())["final"]["test_acc"] for p in
        (store.root / f"{common.spec_digest(s, store.fingerprint)}.json" for s in specs[:2])]
    # another code fingerprint (an edited library) serves nothing; a torn file is run again
    edited = common.RunStore(tmp_path)
    edited.fingerprint = "0" * 64
    assert edited.get(specs[0]) is None
    (store.root / f"{common.spec_digest(specs[1], store.fingerprint)}.json").write_text("{")
    assert store.get(specs[1]) is None and store.get(specs[0]) is not None


def test_the_code_fingerprint_follows_the_library_source() -> None:
    fp = common.code_fingerprint()
    assert fp == common.code_fingerprint() and len(fp) == 64
    names = {p.relative_to(common.REPO).as_posix() for g in common._CODE_GLOBS
             for p in common.REPO.glob(g)}
    assert "rabo/engine.py" in names and "configs/experiments/task-a.yaml" in names


def test_memory_budgets_make_the_policy_pick_the_tier_ratios(results: Path) -> None:
    data = _load(results, "claims")
    by_method = {}
    for run in data["runs"]:
        by_method.setdefault(run["labels"]["method"], run)
    assert by_method["RABO"]["ratios"] == [1.0, 0.5, 0.25, 0.125]
    assert by_method["RABO"]["memory_budgets"]  # the policy chose, not a fixed list
    assert any(o.startswith("clients.memory_budgets=") for o in by_method["RABO"]["overrides"])
    assert by_method["full"]["ratios"] == [1.0] * 4
    assert by_method["exclusion"]["ratios"] == [1.0, 0.0, 0.0, 0.0]
    # the policy, asked directly with those budgets, agrees
    from rabo import config
    from rabo.job import Job

    cfg = config.load(ROOT / by_method["RABO"]["config"], by_method["RABO"]["overrides"])
    assert Job.from_config(cfg).simulated_ratios() == [1.0, 0.5, 0.25, 0.125]


def test_coverage_runs_have_the_intended_c_x_star(results: Path) -> None:
    data = _load(results, "coverage")
    for run in data["runs"]:
        assert run["final"]["C_x_star"] == run["labels"]["k"]


def test_communication_counts_fednest_from_shapes(results: Path) -> None:
    data = _load(results, "communication")
    (setting, c), = data["counted"].items()
    d_x, d_y, t, n = c["d_x"], c["d_y"], c["T"], c["N"]
    assert c["fednest_per_client"]["rounds"] == 2 * t + n + 3
    fed = communication.fednest_per_client(d_x, d_y, t, n)
    assert fed["down_elems"] == 2 * d_x + (2 * t + n + 2) * d_y
    rows = communication.rows(data)[0]["entries"]
    full = next(e for e in rows if e["method"].startswith("full"))
    # the full model's measured payload per round: x, y, v down and h, dy, dv up, per client
    assert full["bytes_per_outer_step"] == 4 * c["clients"] * 2 * (d_x + 2 * d_y)


def test_report_tables_carry_the_json_numbers(results: Path, tmp_path: Path) -> None:
    target = tmp_path / "RESULTS.md"
    write_report(results, target)
    text = target.read_text()
    # claims: every (task, method) row's accuracy statistics, as formatted from the JSON
    for row in claims.rows(_load(results, "claims")):
        line = next(ln for ln in text.splitlines()
                    if ln.startswith(f"| {row['dataset']} | {row['split']} | {row['method']} |")
                    and pct(row["test_acc"]) in ln)
        assert f"{row['payload_mib_per_round']['mean']:.2f}" in line
    # estimators: accuracy of each estimator
    for row in estimators.rows(_load(results, "estimators")):
        assert pct(row["test_acc"]) in text
    # coverage: every k's accuracy and tail average of the exact hypergradient measure
    an = coverage.analyze(_load(results, "coverage"))
    st = an["settings"][0]
    for p in st["per_k"]:
        assert pct(p["test_acc"]) in text
        assert f"{p['T_final']['mean']:.4g}" in text
        assert len(p["rounds"]) >= 2 and p["T"][-1] > 0  # measured after the warm-up
    # communication: FedNest's count and RABO's measured bytes
    for e in communication.rows(_load(results, "communication"))[0]["entries"]:
        assert f"{e['bytes_per_outer_step'] / 2**20:.3f}" in text
        assert f"{e['vs_fednest']:.3f}" in text
    # robust: each method's accuracy, and a verdict per clipping method against RABO's
    data = _load(results, "robust")
    for row in robust.rows(data):
        assert pct(row["test_acc"]) in text
    vs = robust.verdicts(data)
    assert {v["method"] for v in vs} == {m for m in robust.METHODS if m != "RABO"}
    for v in vs:
        by = {r["method"]: r["test_acc"]["mean"] for r in robust.rows(data)}
        assert v["cost"] == pytest.approx(by["RABO"] - by[v["method"]])
        assert f"{100 * v['cost']:+.1f}" in text
    # wire: measured bytes against float32's (0.5 for 16-bit, 0.25-0.3 for int8) and costs
    data = _load(results, "wire")
    vs = {v["method"]: v for v in wire.verdicts(data)}
    assert set(vs) == {m for m in wire.PRESETS["tiny"]["methods"] if m != wire.BASE}
    assert vs["bfloat16"]["bytes_ratio"] == pytest.approx(0.5, abs=1e-3)
    assert 0.25 < vs["int8, error feedback"]["bytes_ratio"] < 0.3
    by = {r["method"]: r["test_acc"]["mean"] for r in wire.rows(data)}
    for m, v in vs.items():
        assert v["cost"] == pytest.approx(by[wire.BASE] - by[m])
        assert f"{v['bytes_ratio']:.3f}" in text and f"{100 * v['cost']:+.2f}" in text
        assert v["meets"] == (v["cost"] <= wire.TARGETS[m])
    # every table names the command that produced it; images are embedded
    for name in GROUPS:
        assert f"`rabo experiment {name} --quick`" in text
    assert "## 1b. Ablations" in text
    for row in claims.rows(_load(results, "ablations")):
        assert any(ln.startswith(f"| {row['dataset']} | {row['split']} | {row['method']} |")
                   and pct(row["test_acc"]) in ln for ln in text.splitlines())
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (target.parent / img).resolve().exists(), img
    assert "## Headline" in text and re.search(r"\| (supported|\*\*)", text)


def _bench(device: str, fd_time: float, gpu: str | None = None) -> dict:
    def est(t: float, m: float) -> dict:
        return {"time_s": t / 1e3, "peak_bytes": int(m * 2**20), "time_vs_exact": t,
                "peak_mem_vs_exact": m}
    return {"device": device, "torch_threads": 2,
            "machine": {"gpu": gpu, "torch": "2.x+cu"} if gpu else {},
            "quadratic": {"exact": {"rel_error": 0.0}},
            "workloads": {"B/cnn": {"fd-central": est(fd_time, 0.5), "exact": est(1.0, 1.0)}},
            "targets": [{"workload": "B/cnn", "estimator": "fd-central", "metric": "time_vs_exact",
                         "value": fd_time, "target": "<= 0.6", "met": fd_time <= 0.6}]}


def test_report_adds_a_section_per_accelerator_bench_file() -> None:
    """`bench_estimator_<device>.json` from a lent GPU gets its own section and headline row,
    next to (not instead of) the CPU bench of `make bench`."""
    text = build_report({"bench_estimator": _bench("cpu", 1.3),
                         "bench_estimator_cuda": _bench("cuda", 0.4, "Some GPU 80GB")}, ".")
    cpu, gpu = text.split("### 2b. Estimator cost on Some GPU 80GB")
    assert "| B/cnn | fd-central | 1.3 | 1.30 |" in cpu and "1.30 (<= 0.6: MISSED)" in cpu
    assert "| B/cnn | fd-central | 0.4 | 0.40 |" in gpu and "0.40 (<= 0.6: met)" in gpu
    assert "`docs/results/bench_estimator_cuda.json`, device cuda (Some GPU 80GB" in gpu
    assert "CUDA allocator's peak" in gpu and "CUDA allocator" not in cpu
    heads = [ln for ln in text.splitlines() if ln.startswith("| The second-order-free")]
    assert len(heads) == 2 and "(Some GPU 80GB) | time: supported;" in heads[1]
    assert "| time: **not supported**;" in heads[0]


def test_cli_parses_experiment_commands() -> None:
    from rabo.cli import build_parser

    args = build_parser().parse_args(["experiment", "coverage", "--full", "--out", "x"])
    assert args.name == "coverage" and args.full and args.out == "x"
    args = build_parser().parse_args(["experiment", "report"])
    assert Path(args.out) == common.RESULTS_DIR


def test_full_presets_cover_the_whole_grid() -> None:
    """claims and ablations together cover every method in every setting."""
    specs = claims.build_specs("full") + ablations.build_specs("full")
    labels = {(s.label["dataset"], s.label["split"], s.label["method"]) for s in specs}
    for ds in ("mnist", "digits", "mnist1d"):
        for split in ("iid", "shards", "dirichlet"):
            for m in claims.METHODS:
                assert (ds, split, m) in labels
    assert {s.label["seed"] for s in specs} >= {0, 1, 2}
    # a small slice of the FULL grid runs as it is (a FULL spec with fewer rounds)
    spec = next(s for s in specs if s.label["dataset"] == "digits"
                and s.label["method"] == "RABO static" and s.label["split"] == "shards")
    short = common.RunSpec(spec.key, spec.config, (*spec.overrides, "rounds=2"), spec.labels,
                           spec.tier_ratios)
    run = common.run_spec(short)
    assert run["ratios"] == [1.0, 0.5, 0.25, 0.125, 1.0, 0.5, 0.25, 0.125, 1.0, 0.5]
    assert len(run["curve"]["round"]) == 2


@pytest.mark.slow
def test_system_bench_tiny_writes_json_and_report_section(tmp_path: Path) -> None:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "bench.system", "--preset", "tiny",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "system.json").read_text())
    (point,) = data["grid"]["points"]
    assert point["workers"] == 2 and point["coordinator_cpu_s_per_round"] > 0
    assert data["compare"][0]["max_abs_diff_final_state"] <= 1e-6
    assert [r["ratio"] for r in data["ratio"]["workloads"][0]["rows"]] == [1.0, 0.5]
    target = tmp_path / "RESULTS.md"
    write_report(tmp_path, target)
    text = target.read_text()
    assert f"{point['payload_bytes_per_round'] / 2**20:.1f}" in text
    assert "gRPC and torch.distributed (gloo) run the same job" in text


def test_a_failed_run_stops_the_grid_and_names_itself() -> None:
    """The first failing simulation ends run_all with its key; the queued ones are cancelled,
    not run to completion only to be thrown away."""
    good = common.RunSpec("good", "configs/default.yaml",
                          ("data.dataset=digits", "model.hidden=[8]", "rounds=2",
                           "clients.count=2"), ())
    bad = common.RunSpec("bad-spec", "configs/default.yaml", ("rounds=-1",), ())
    calls: list[int] = []
    with pytest.raises(RuntimeError, match="run bad-spec failed: .*rounds"):
        common.run_all([bad, *[good] * 6], jobs=2, progress=lambda d, t, r: calls.append(d))
    assert len(calls) < 6


def test_coverage_analysis_refuses_points_whose_cg_solve_did_not_converge(
        results: Path) -> None:
    """An exact hypergradient point whose CG residual is above the threshold (negative
    curvature, too few iterations) is refused and counted, not averaged into T(q)."""
    data = _load(results, "coverage")
    clean = coverage.analyze(data)["settings"][0]["per_k"][0]
    k = clean["k"]
    runs = [json.loads(json.dumps(r)) for r in data["runs"]]
    target = next(r for r in runs if r["labels"]["k"] == k)
    curve = target["curve"]
    i = max(j for j, h in enumerate(curve["hypergradient_norm_exact"]) if h is not None)
    curve["hypergradient_norm_exact"][i] *= 1e6  # a wild value...
    curve["hypergradient_cg_residual"][i] = 0.5  # ...from a solve that did not converge
    per_k = coverage.analyze({**data, "runs": runs})["settings"][0]["per_k"][0]
    assert per_k["refused_points"] == clean["refused_points"] + 1
    assert per_k["rounds"] == [q for q in clean["rounds"] if q != curve["round"][i]]
    assert per_k["T"][-1] < 1e3 * clean["T"][-1]
    assert "| 1 |" in build_report({"coverage": {**data, "runs": runs}}, ".")


def test_policy_table_asks_the_policy_as_a_simulation_does() -> None:
    """Under budgets sized for fd-central, fd-central gets exactly the tier ratios; an
    estimator that needs more memory per ratio never gets a larger one."""
    table = {(r["task"], r["estimator"]): r["ratios"] for r in estimators.policy_table("tiny")}
    for task in ("A", "B"):
        assert table[(task, "fd-central")] == list(estimators.TIERS)
        for est in ("exact", "neumann"):
            assert all(a <= b for a, b in zip(table[(task, est)], estimators.TIERS, strict=True))


def test_a_grid_is_the_product_of_its_axes_with_level_tiers_and_filters() -> None:
    from rabo.experiments import grid as g

    grid = g.Grid((g.tasks(("A",)), g.datasets(("digits", "mnist")),
                   g.axis("k", (1, 3), key=lambda k: f"k{k}", tiers=lambda k: [1.0] * k),
                   g.seeds((0, 1))),
                  extra=("rounds=2",), where=lambda lb: not (lb["k"] == 3 and lb["seed"] == 1))
    runs = grid.runs()
    assert [s.key for s in runs] == [
        "A/digits/k1/0", "A/digits/k1/1", "A/digits/k3/0",
        "A/mnist/k1/0", "A/mnist/k1/1", "A/mnist/k3/0"]
    first = runs[0]
    # overrides in axis order, the grid's extra last; the dataset's own settings follow it
    assert first.overrides == ("data.dataset=digits", *common.DATASET_OVERRIDES["digits"],
                               "seed=0", "rounds=2")
    assert first.label == {"task": "A", "dataset": "digits", "k": 1, "seed": 0}
    assert first.tier_ratios == (1.0,) and runs[2].tier_ratios == (1.0, 1.0, 1.0)
    assert first.config == "configs/experiments/task-a.yaml"
    assert grid.describe()["axes"] == {"task": ["A"], "dataset": ["digits", "mnist"],
                                       "k": ["k1", "k3"], "seed": ["0", "1"]}
    with pytest.raises(ValueError, match="lists a level twice"):
        g.axis("seed", (0, 0))
    with pytest.raises(ValueError, match="'task' label"):
        g.Grid((g.seeds((0,)),)).runs()


def test_grid_union_drops_repeated_keys_and_with_dedupe_equal_configs() -> None:
    from rabo.experiments import grid as g

    methods = {"RABO": (), "same as RABO": ("mask.policy=rolling",), "static":
               ("mask.policy=static",)}
    one = g.Grid((g.tasks(("A",)), g.axis("method", methods, methods), g.seeds((0,))))
    assert [s.key for s in g.specs(one, one)] == ["A/RABO/0", "A/same as RABO/0", "A/static/0"]
    # the task config's own mask policy is rolling: "same as RABO" resolves to RABO's run
    assert [s.key for s in g.specs(one, dedupe=True)] == ["A/RABO/0", "A/static/0"]


def test_the_wire_link_block_sets_round_time_and_bytes_against_float32() -> None:
    def run(nbytes: int, rounds_s: list[float]) -> dict:
        return {"workers": [{"bandwidth_mbit": 10.0, "ratio": 1.0, "payload_bytes": nbytes,
                             "interface_bytes": int(nbytes * 1.07)}],
                "round_s": rounds_s, "rounds_completed": len(rounds_s), "hidden": 512}

    text, heads = wire.link_block({"int8": run(254_000, [0.6, 0.5, 0.55]),
                                   "float32": run(1_000_000, [2.0, 2.2, 2.1])})
    rows = [ln for ln in text.splitlines() if ln.startswith("| float32") or
            ln.startswith("| int8")]
    assert rows[0].startswith("| float32") and rows[0].endswith("| 2.10 | 1 | 1x |")
    assert rows[1].endswith("| 0.55 | 0.254 | 3.8x |")  # median 2.10 / 0.55
    assert heads[0]["verdict"] == "3.8x shorter at 0.25x the bytes"
