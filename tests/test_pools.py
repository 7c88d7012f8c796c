"""The heterogeneous Kubernetes overlay's three worker pools, as six real `rabo worker`
processes inside memory cgroups this test creates with the pools' limits and replicas (read
from the overlay: 1 x 2Gi, 2 x 768Mi, 3 x 352Mi), against an in-process coordinator running
the overlay's own config: the pools get three different ratios from what each worker measures
of its cgroup, and nobody exceeds its limit (issue 16, item 11). Skipped where no cgroup can be
created or the bundled MNIST set is not beside the checkout (the overlay trains on it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import mnist_available
from test_changing_machines import _child_memory_cgroup, _remove_cgroup, _set_limit, _wait

from coordinator.local import WorkerProcess, stop_workers
from coordinator.server import serve
from rabo import config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "heterogeneous"
UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def _pools() -> dict[str, tuple[int, int]]:
    """pool -> (memory limit of each pod in bytes, replicas), read from the overlay's
    pools/<name>/kustomization.yaml patches (what `kubectl apply` would give each pod)."""
    pools = {}
    for kust in sorted((OVERLAY / "pools").glob("*/kustomization.yaml")):
        doc = yaml.safe_load(kust.read_text())
        ops = {op["path"]: op["value"] for patch in doc["patches"]
               for op in yaml.safe_load(patch["patch"])}
        limit = str(ops["/spec/template/spec/containers/0/resources"]["limits"]["memory"])
        pools[kust.parent.name] = (int(limit[:-2]) * UNITS[limit[-2:]],
                                   int(ops["/spec/replicas"]))
    return pools


def test_the_three_pools_get_three_ratios_inside_real_memory_cgroups(tmp_path: Path) -> None:
    if not mnist_available():
        pytest.skip("the bundled MNIST test set (../shared/data/mnist) is not here")
    groups = []
    workers: list[WorkerProcess] = []
    server = None
    try:
        pools = _pools()
        assert set(pools) == {"large", "medium", "small"}, pools
        for pool in ("large", "medium", "small"):
            limit, replicas = pools[pool]
            for _ in range(replicas):
                cg = _child_memory_cgroup()
                groups.append((pool, limit, cg))
                _set_limit(cg, limit)
        cfg = config.load(OVERLAY / "config.yaml", ["rounds=1", "cluster.heartbeat_s=0.5",
                                              "cluster.register_timeout_s=600"])
        assert cfg.clients.count == len(groups)
        server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0.0)
        for cid, (pool, _, cg) in enumerate(groups):
            log = tmp_path / f"worker-{cid}-{pool}.log"
            # the shell joins the group, then becomes the worker: every byte it uses is charged
            cmd = (f"echo $$ > {cg / 'cgroup.procs'} && exec {sys.executable} -m worker "
                   f"--coordinator 127.0.0.1:{server.port} --client-id {cid} --threads 1 "
                   f"--poll-s 1 --give-up-s 300 --name {pool}-{cid}")
            workers.append(WorkerProcess(cid, None, subprocess.Popen(
                ["sh", "-c", cmd], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                env=dict(os.environ, GRPC_VERBOSITY="ERROR")), log))
        records = server.driver.records
        _wait(lambda: len(records) >= 1 or any(w.proc.poll() is not None for w in workers),
              "round 1 did not finish: " + "; ".join(w.tail() for w in workers), timeout=900)
        dead = [w.tail() for w in workers if w.proc.poll() is not None]
        assert not dead, dead
        ratio = {c["client_id"]: c["ratio"] for c in records[0]["clients"]}
        reasons = {c["client_id"]: c["reason"] for c in records[0]["clients"]}
        by_pool: dict[str, set[float]] = {}
        for cid, (pool, _, _) in enumerate(groups):
            assert cid in ratio, (cid, records[0]["left_out"], records[0]["not_assigned"])
            by_pool.setdefault(pool, set()).add(ratio[cid])
        detail = f"{by_pool} {reasons}"
        # one ratio per pool (its pods are alike), three different ones, in the pools' order
        assert all(len(r) == 1 for r in by_pool.values()), detail
        large, medium, small = (next(iter(by_pool[p])) for p in ("large", "medium", "small"))
        assert large > medium > small, detail
        assert large == 1.0 and medium == 0.5 and small in (0.25, 0.125), detail
        # the budget each got counts its data: no pod was pushed to its limit
        for pool, limit, cg in groups:
            assert int((cg / "memory.failcnt").read_text()) == 0, (pool, detail)
            assert int((cg / "memory.max_usage_in_bytes").read_text()) < limit, (pool, detail)
    finally:
        if server is not None:
            server.stop(grace=0)
        stop_workers(workers)
        for _, _, cg in groups:
            _remove_cgroup(cg)
