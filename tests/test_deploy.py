"""The container image and the Kubernetes manifests (deploy/), checked without Docker or a cluster.

The kustomizations are rendered with ``kubectl kustomize`` and read as data: probes, ports,
secrets and their mount paths, the NetworkPolicy, worker pools against the job's
``clients.count``, and the container arguments against the real ``rabo`` parser. The
Dockerfile is parsed: its COPY sources against the build context that ``.dockerignore`` leaves,
its torch selection run under ``sh`` with a stand-in ``pip``, and the context itself built into
a wheel and run, as ``pip install .`` in the image would. ``deploy/k8s/check.sh`` validates
the rendered YAML against the Kubernetes schemas.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port

from rabo import config
from rabo.cli import build_parser
from rabo.units import parse_bytes

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
OVERLAYS = ("cpu", "gpu", "heterogeneous")
SECRET_ENV = ("RABO_TOKEN_FILE", "RABO_TLS_CERT", "RABO_TLS_KEY", "RABO_TLS_CA")
UID = 10001


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# --------------------------------------------------------------------------- kubectl


def kubectl() -> str:
    """kubectl, or a skip that says how to get it (the tests install nothing)."""
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed; install kubectl >= 1.27 to check deploy/k8s")
    return found


@cache
def _render(path: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run([kubectl(), "kustomize", path], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render(overlay: str) -> list[dict[str, Any]]:
    return list(_render(str(K8S / "overlays" / overlay)))


@cache
def _secrets_with(files: tuple[tuple[str, bytes], ...]) -> tuple[dict[str, Any], ...]:
    """deploy/k8s/secrets rendered from a copy with the given certs/ files."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(K8S / "secrets" / "kustomization.yaml", root)
        (root / "certs").mkdir()
        for name, data in files:
            (root / "certs" / name).write_bytes(data)
        return _render(str(root))


def secret_files_placeholder() -> tuple[tuple[str, bytes], ...]:
    names = ("token", "ca.crt", "coordinator.crt", "coordinator.key", "worker-0.crt",
             "worker-0.key")
    return tuple((n, b"placeholder\n") for n in names)


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def component(docs: list[dict[str, Any]], which: str) -> list[dict[str, Any]]:
    return [d for d in of_kind(docs, "Deployment")
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
            == which]


def container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deploy["metadata"]["name"]
    return containers[0]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    names = [e["name"] for e in c.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env vars in {c['name']}: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"unexpected selector form {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def job_config(docs: list[dict[str, Any]]) -> tuple[config.Config, str]:
    coord = component(docs, "coordinator")[0]
    cm_names = [v["configMap"]["name"] for v in coord["spec"]["template"]["spec"]["volumes"]
                if "configMap" in v]
    assert len(cm_names) == 1
    text = named(docs, "ConfigMap", cm_names[0])["data"]["config.yaml"]
    return config.from_dict(yaml.safe_load(text)), text


# --------------------------------------------------------------------------- check.sh


def test_check_script_renders_and_validates_every_kustomization(tmp_path: Path) -> None:
    kubectl()
    script = K8S / "check.sh"
    assert os.access(script, os.X_OK), "deploy/k8s/check.sh must be executable"
    # from another working directory: the script finds the repository by itself
    proc = subprocess.run([str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in (*(f"overlays/{o}" for o in OVERLAYS), "deploy/k8s/data", "secrets"):
        assert re.search(rf"^ok  \S*{re.escape(name)}:", proc.stdout, re.M), proc.stdout


def test_check_script_fails_on_an_invalid_manifest(tmp_path: Path) -> None:
    kubectl()
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "deploy", copy / "deploy")
    venv = REPO / ".venv"
    if venv.exists():
        (copy / ".venv").symlink_to(venv)
    worker = copy / "deploy" / "k8s" / "base" / "worker" / "worker.yaml"
    worker.write_text(worker.read_text().replace("readOnlyRootFilesystem:",
                                                 "readOnlyRootFileSystem:"))
    proc = subprocess.run([str(copy / "deploy" / "k8s" / "check.sh")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode != 0
    assert "FAIL: deploy/k8s/overlays/cpu" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- every overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_coordinator_deployment_service_and_probes(overlay: str) -> None:
    docs = render(overlay)
    assert {d["metadata"].get("namespace") for d in docs} == {"rabo"}
    assert all(d["metadata"]["labels"]["app.kubernetes.io/name"] == "rabo" for d in docs)
    (coord,) = component(docs, "coordinator")
    assert coord["metadata"]["name"] == "rabo-coordinator"
    assert coord["spec"]["replicas"] == 1
    assert coord["spec"]["strategy"]["type"] == "Recreate"
    c = container(coord)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "health": 50052, "metrics": 9090}

    args = c["args"]
    assert args == ["coordinator", "--config", "/etc/rabo/config.yaml", "--bind",
                    "0.0.0.0:50051", "--health-port", "50052", "--out", "/var/lib/rabo/run",
                    "--resume", "/var/lib/rabo/run", "--keep-serving"]
    ns = build_parser().parse_args(args)
    assert (ns.command, ns.health_port, ns.bind, ns.out) == \
        ("coordinator", 50052, "0.0.0.0:50051", "/var/lib/rabo/run")
    assert int(env_of(c)["RABO_METRICS_PORT"]) == ports["metrics"]

    # kubelet's native gRPC probes, on the plaintext health port the coordinator serves
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c[probe]
        assert set(p) & {"httpGet", "tcpSocket", "exec"} == set(), probe
        assert p["grpc"]["port"] == 50052 == ns.health_port, probe

    svc = named(docs, "Service", "rabo-coordinator")
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selects({"matchLabels": svc["spec"]["selector"]},
                   coord["spec"]["template"]["metadata"]["labels"])
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert {n: p["port"] for n, p in by_name.items()} == ports
    assert all(p["targetPort"] in ports for p in by_name.values())

    # the config file the args name is the ConfigMap's config.yaml, and it is a valid job
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in coord["spec"]["template"]["spec"]["volumes"]}
    assert "configMap" in volumes[mounts["/etc/rabo"]]
    cfg, _ = job_config(docs)
    assert cfg.data.dataset == "mnist" and cfg.data.root is None  # found via RABO_DATA_DIR
    assert cfg.clients.memory_budgets is None  # ratios come from the pods' memory limits
    assert cfg.clients.ratios is None

    # the run folder and checkpoints live on a claim the overlay creates
    state = volumes[mounts["/var/lib/rabo"]]["persistentVolumeClaim"]["claimName"]
    named(docs, "PersistentVolumeClaim", state)
    assert Path(ns.out).is_relative_to("/var/lib/rabo")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(overlay: str) -> None:
    for deploy in of_kind(render(overlay), "Deployment"):
        name = deploy["metadata"]["name"]
        pod = deploy["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == UID, name
        assert pod["automountServiceAccountToken"] is False, name
        # a Service named rabo-coordinator would inject RABO_COORDINATOR_* variables
        assert pod["enableServiceLinks"] is False, name
        c = container(deploy)
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert len(tmp) == 1, f"{name}: a read-only root needs a writable /tmp"
        vol = {v["name"]: v for v in pod["volumes"]}[tmp[0]["name"]]
        assert "emptyDir" in vol, name
        res = c["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), f"{name}: {kind}"
        assert ":" in c["image"] and not c["image"].endswith(":latest"), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_select_only_their_own_pods(overlay: str) -> None:
    deploys = of_kind(render(overlay), "Deployment")
    for d in deploys:
        for other in deploys:
            labels = other["spec"]["template"]["metadata"]["labels"]
            mine = d is other
            assert selects(d["spec"]["selector"], labels) == mine, \
                (d["metadata"]["name"], other["metadata"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_join_the_coordinator_and_fill_every_client_slot(
        overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(overlay)
    workers = component(docs, "worker")
    assert workers
    cfg, _ = job_config(docs)
    assert sum(w["spec"]["replicas"] for w in workers) == cfg.clients.count
    svc = named(docs, "Service", "rabo-coordinator")
    grpc_port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"]
    for w in workers:
        name = w["metadata"]["name"]
        c = container(w)
        assert c["args"] == ["worker"]
        env = env_of(c)
        assert env["RABO_COORDINATOR"] == f"{svc['metadata']['name']}:{grpc_port}"
        assert env["RABO_WORKER_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        # the worker sizes itself from its cgroup limit: nothing may override it
        assert "RABO_MEMORY_LIMIT" not in env, name
        assert "RABO_TOKEN" not in env, f"{name}: the token belongs in a file"
        threads = env["RABO_THREADS"]["resourceFieldRef"]
        assert (threads["resource"], threads["containerName"]) == ("limits.cpu", c["name"])
        res = c["resources"]
        assert parse_bytes(res["requests"]["memory"]) == parse_bytes(res["limits"]["memory"]), \
            f"{name}: the memory limit the policy sizes to must be reserved"
        grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert 10 <= grace <= 60, name

        with monkeypatch.context() as m:  # the worker parser takes these as its defaults
            for k, v in env.items():
                m.setenv(k, v if isinstance(v, str) else "2")  # downward API: a CPU count
            ns = build_parser().parse_args(c["args"])
        assert ns.command == "worker"
        assert ns.coordinator == env["RABO_COORDINATOR"]
        assert ns.memory_limit is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_and_data_are_mounted_where_the_env_points(overlay: str) -> None:
    docs = render(overlay)
    secrets = {s["metadata"]["name"]: s
               for s in _secrets_with(secret_files_placeholder()) if s["kind"] == "Secret"}
    data_claims = {d["metadata"]["name"] for d in _render(str(K8S / "data"))
                   if d["kind"] == "PersistentVolumeClaim"}
    for deploy in of_kind(docs, "Deployment"):
        pod = deploy["spec"]["template"]["spec"]
        c = container(deploy)
        env = env_of(c)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert set(SECRET_ENV) <= set(env), f"{deploy['metadata']['name']}: {sorted(env)}"
        for var in SECRET_ENV:
            path = Path(env[var])
            mount = mounts[str(path.parent)]
            assert mount.get("readOnly") is True, var
            secret = volumes[mount["name"]]["secret"]["secretName"]
            assert secret in secrets, f"{var}: no Secret {secret} in deploy/k8s/secrets"
            assert path.name in secrets[secret]["data"], f"{var}: {secret} has no {path.name}"
        data = mounts[env["RABO_DATA_DIR"]]
        assert data.get("readOnly") is True
        claim = volumes[data["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in data_claims
    # the coordinator and the workers present different certificates
    tls = {v["secret"]["secretName"] for d in of_kind(docs, "Deployment")
           for v in d["spec"]["template"]["spec"]["volumes"]
           if "secret" in v and v["name"] == "tls"}
    assert tls == {"rabo-tls", "rabo-worker-tls"}


def test_secrets_from_rabo_certs_name_the_service_in_the_coordinator_certificate() -> None:
    from cryptography import x509

    from rabo.certs import write_bundle

    with tempfile.TemporaryDirectory() as tmp:
        write_bundle(tmp, workers=1)
        files = tuple(sorted((p.name, p.read_bytes()) for p in Path(tmp).iterdir()))
    secrets = {s["metadata"]["name"]: s for s in _secrets_with(files)}
    assert set(secrets) == {"rabo-auth", "rabo-tls", "rabo-worker-tls"}

    def pem(secret: str, key: str) -> bytes:
        return base64.b64decode(secrets[secret]["data"][key])

    server = x509.load_pem_x509_certificate(pem("rabo-tls", "tls.crt"))
    client = x509.load_pem_x509_certificate(pem("rabo-worker-tls", "tls.crt"))
    ca = x509.load_pem_x509_certificate(pem("rabo-tls", "ca.crt"))
    assert pem("rabo-tls", "ca.crt") == pem("rabo-worker-tls", "ca.crt")
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    host = env_of(container(component(render("cpu"), "worker")[0]))["RABO_COORDINATOR"]
    assert host.rsplit(":", 1)[0] in sans.get_values_for_type(x509.DNSName)
    assert pem("rabo-auth", "token").strip()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_workers_to_the_grpc_port(overlay: str) -> None:
    docs = render(overlay)
    coord_labels = component(docs, "coordinator")[0]["spec"]["template"]["metadata"]["labels"]
    worker_labels = [w["spec"]["template"]["metadata"]["labels"]
                     for w in component(docs, "worker")]
    other_labels = {"app.kubernetes.io/name": "rabo", "app.kubernetes.io/component": "other"}
    (policy,) = [p for p in of_kind(docs, "NetworkPolicy")
                 if selects(p["spec"]["podSelector"], coord_labels)]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert not any(selects(policy["spec"]["podSelector"], w) for w in worker_labels)

    def admits(port: int, labels: dict[str, str]) -> bool:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True  # every source
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"unexpected peer {peer}"
                if selects(peer["podSelector"], labels):
                    return True
        return False

    assert all(admits(50051, w) for w in worker_labels)
    assert not admits(50051, other_labels)
    assert not admits(50051, coord_labels)
    for port in (50052, 9090):
        assert admits(port, other_labels) and admits(port, worker_labels[0])


# --------------------------------------------------------------------------- overlays


def test_cpu_overlay_runs_workers_on_cpu() -> None:
    docs = render("cpu")
    for d in of_kind(docs, "Deployment"):
        assert container(d)["image"].endswith("-cpu")
    for w in component(docs, "worker"):
        assert env_of(container(w))["RABO_DEVICE"] == "cpu"
        assert "nvidia.com/gpu" not in container(w)["resources"]["limits"]


def test_gpu_overlay_requests_a_gpu_per_worker() -> None:
    docs = render("gpu")
    assert container(component(docs, "coordinator")[0])["image"].endswith("-cpu")
    for w in component(docs, "worker"):
        c = container(w)
        assert c["image"].endswith("-cuda")
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
        env = env_of(c)
        assert env["RABO_DEVICE"] == "cuda"
        assert env["NCCL_SOCKET_IFNAME"] and env["NCCL_DEBUG"]
        tolerations = w["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_heterogeneous_pools_differ_in_memory_and_fill_the_job() -> None:
    docs = render("heterogeneous")
    workers = component(docs, "worker")
    assert len(workers) >= 3
    limits = [parse_bytes(container(w)["resources"]["limits"]["memory"]) for w in workers]
    assert len(set(limits)) == len(limits), "each pool needs its own memory limit"
    cfg, _ = job_config(docs)
    assert sum(w["spec"]["replicas"] for w in workers) == cfg.clients.count
    assert cfg.clients.count != job_config(render("cpu"))[0].clients.count  # its own config
    assert not any(d["metadata"]["name"] == "rabo-worker" for d in workers)


# Measured with `rabo local` on this config (784-4096-4096 MLP, MNIST): a worker process holds
# ~250-400 MiB before training (its cgroup may count some page cache on top). The policy's
# estimate counts the payload, transport buffers and the estimator's gradients: a gRPC worker's
# measured peak above start-up was 0.9x of it (500 of 560 MiB at ratio 1 for this model);
# 1.0 keeps a margin. A pod's budget is its limit minus what it holds.
FOOTPRINTS = [250 * 2**20, 300 * 2**20, 350 * 2**20, 400 * 2**20]
PEAK_OVER_ESTIMATE = 1.0


def test_heterogeneous_limits_give_distinct_ratios_that_fit_their_pods() -> None:
    from rabo.errors import DataError
    from rabo.job import Job
    from rabo.policy import Resources, estimate_memory

    docs = render("heterogeneous")
    cfg, _ = job_config(docs)
    try:
        job = Job.from_config(cfg)
    except DataError as exc:
        pytest.skip(f"no MNIST here to build the job with: {exc}")
    batch = cfg.data.batch_size or 1
    limits = sorted(parse_bytes(container(w)["resources"]["limits"]["memory"])
                    for w in component(docs, "worker"))
    for footprint in FOOTPRINTS:
        ratios = []
        for limit in limits:
            # the coordinator's own decision (Job.ratio_for) on the budget the pod reports
            ratio, why = job.ratio_for(0, Resources(limit - footprint))
            assert ratio is not None, (limit, footprint, why)
            peak = footprint + PEAK_OVER_ESTIMATE * estimate_memory(job.task, job.hyper,
                                                                     ratio, batch)
            assert peak < limit, f"a {limit >> 20} MiB pod would be OOM-killed: {why}"
            ratios.append(ratio)
        assert ratios == sorted(set(ratios)), f"pools must get distinct ratios: {ratios}"
    # the coordinator peaked at ~2.1 GiB on this job
    coord = container(component(docs, "coordinator")[0])
    assert parse_bytes(coord["resources"]["limits"]["memory"]) >= 3 * 2**30


# --------------------------------------------------------------------------- env and docs


def _rabo_env_vars() -> set[str]:
    names: set[str] = set()
    for overlay in OVERLAYS:
        for d in of_kind(render(overlay), "Deployment"):
            names |= {n for n in env_of(container(d)) if n.startswith("RABO_")}
    return names


def test_every_rabo_variable_in_the_manifests_is_read_by_the_program() -> None:
    source = "\n".join(p.read_text() for pkg in ("rabo", "coordinator", "worker")
                       for p in (REPO / pkg).rglob("*.py"))
    unknown = sorted(n for n in _rabo_env_vars() if not re.search(rf"\b{n}\b", source))
    assert not unknown, f"set in deploy/k8s but read nowhere: {unknown}"


def test_deploy_doc_lists_every_variable_with_a_real_flag() -> None:
    doc = (REPO / "docs" / "deploy.md").read_text()
    for name in _rabo_env_vars():
        assert f"`{name}`" in doc, name
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a.choices, dict))
    flags = {f for cmd in ("coordinator", "worker")
             for f in sub.choices[cmd]._option_string_actions}
    rows = re.findall(r"^\| `(RABO_[A-Z_]+)` \|[^|]*\| ([^|]*)\|", doc, re.M)
    assert len(rows) >= 15
    for name, flag_cell in rows:
        for flag in re.findall(r"`(--[a-z-]+)", flag_cell):
            assert flag in flags, f"docs/deploy.md: {name} maps to unknown flag {flag}"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker's patternmatcher compiles it."""
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern[i + 1:i + 2] == "*":
                i += 1
                if pattern[i + 1:i + 2] == "/":
                    i += 1
                out += ".*" if i + 1 >= len(pattern) else "(.*/)?"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch == "[":
            end = pattern.index("]", i)
            out += pattern[i:end + 1]
            i = end
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


def dockerignore() -> list[tuple[bool, re.Pattern[str], str]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!")).lstrip("/")
        rules.append((keep, _dockerignore_regex(pat), pat))
    return rules


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str], str]]) -> bool:
    parts = rel.split("/")
    result = False
    for keep, rx, _ in rules:
        # a pattern that matches a parent directory matches everything below it
        if any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = not keep
    return result


def build_context() -> set[str]:
    """Files Docker sends for `docker build .` under the repository's .dockerignore."""
    rules = dockerignore()
    keeps = [pat for keep, _, pat in rules if keep]
    files: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(REPO):
        rel_dir = os.path.relpath(dirpath, REPO)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # skip excluded directories that no exception pattern could reach into
        dirnames[:] = [d for d in dirnames
                       if not ignored(rel_dir + d, rules)
                       or any(k.startswith(rel_dir + d + "/") for k in keeps)]
        files |= {rel_dir + f for f in filenames if not ignored(rel_dir + f, rules)}
    return files


def test_dockerignore_sends_only_the_package_sources() -> None:
    files = build_context()
    tops = {f.split("/")[0] for f in files}
    packages = {"rabo", "coordinator", "worker", "rabo_proto"}
    assert {"pyproject.toml", "README.md", "constraints.txt", *packages} <= tops <= {
        "pyproject.toml", "README.md", "LICENSE", "constraints.txt", *packages}, tops
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    for pkg in ("rabo", "coordinator", "worker", "rabo_proto"):
        for p in (REPO / pkg).rglob("*"):
            rel = p.relative_to(REPO).as_posix()
            if p.is_file() and "__pycache__" not in rel:
                assert rel in files, f"{rel} is left out of the build context"
    size = sum((REPO / f).stat().st_size for f in files)
    assert size < 10 * 2**20, f"build context is {size >> 20} MiB"


def test_dockerfile_copies_exist_in_the_build_context() -> None:
    context = build_context()
    copies = [rest for word, rest in dockerfile_instructions() if word in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        args = rest.split()
        if any(a.startswith("--from") for a in args):
            continue
        assert not any(a.startswith("--") for a in args), rest
        for src in args[:-1]:
            path = REPO / src
            assert path.exists(), f"COPY {src}: not in the repository"
            rel = src.rstrip("/")
            assert rel in context or any(f.startswith(rel + "/") for f in context), \
                f"COPY {src}: excluded by .dockerignore"


def test_dockerfile_runtime_stage() -> None:
    builder, runtime = stages()[0], stages()[-1]
    assert len(stages()) >= 2, "multi-stage: build tools stay in the builder"
    words = dict(runtime)
    assert words["FROM"].split()[0].endswith("-slim")
    assert any(rest.startswith("--from=") for w, rest in runtime if w == "COPY")

    users = [rest for w, rest in runtime if w == "USER"]
    assert users, "the runtime stage must set a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and int(user) == UID  # numeric: runAsNonRoot checks it

    scripts = _pyproject()["project"]["scripts"]
    entry = json.loads(words["ENTRYPOINT"])
    assert entry == ["rabo"] and scripts["rabo"] == "rabo.cli:main"
    assert json.loads(words["CMD"]) == ["--help"]
    assert set(words["EXPOSE"].split()) == {"50051", "50052", "9090"}

    health = words["HEALTHCHECK"]
    cmd = json.loads(health.split("CMD", 1)[1].strip())
    assert cmd[:3] == ["rabo", "health", "--address"]
    host, port = cmd[3].rsplit(":", 1)
    assert host == "127.0.0.1" and port == "50052"
    assert build_parser().parse_args(cmd[1:]).command == "health"

    # no compilers anywhere, and the project without its dev extra
    text = DOCKERFILE.read_text()
    assert not re.search(r"\b(gcc|g\+\+|build-essential|apt-get install)\b", text)
    installs = [rest for w, rest in builder
                if w == "RUN" and re.search(r"pip install (-c constraints\.txt )?\.", rest)]
    assert installs and not any("[dev]" in r or "-e " in r for r in installs)
    assert not any("RABO_DATA_DIR" in rest or "mnist" in rest.lower() for _, rest in runtime)


def _run_in_stage(script: str, stage: list[tuple[str, str]], env: dict[str, str],
                  tmp: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run a RUN script under sh with the stage's ARG defaults and a `pip` that records."""
    shim = tmp / "bin"
    shim.mkdir(exist_ok=True)
    log = tmp / "pip.log"
    log.unlink(missing_ok=True)
    (shim / "pip").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (shim / "pip").chmod(0o755)
    (shim / "python").symlink_to(sys.executable) if not (shim / "python").exists() else None
    defaults = {}
    for w, rest in stage:
        if w == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            defaults[k] = v
        elif w == "ARG":
            defaults[rest] = ""
    full = {**defaults, **env, "PATH": f"{shim}:/usr/bin:/bin"}
    proc = subprocess.run(["sh", "-c", script], env=full, cwd=tmp, capture_output=True,
                          text=True, timeout=30, check=False)
    lines = log.read_text().splitlines() if log.exists() else []
    return proc, lines


def test_dockerfile_picks_torch_by_variant(tmp_path: Path) -> None:
    builder = stages()[0]
    (script,) = [rest for w, rest in builder if w == "RUN" and "VARIANT" in rest]
    defaults = dict(r.split("=", 1) for w, r in builder if w == "ARG" and "=" in r)
    assert defaults["VARIANT"] == "cpu"
    makefile = (REPO / "Makefile").read_text()
    pinned = re.search(r"torch==([\w.]+)", makefile)
    if pinned:  # the image runs the torch the project is tested with
        assert defaults["TORCH_VERSION"] == pinned.group(1)
    version = defaults["TORCH_VERSION"]
    for variant, index in (("cpu", "whl/cpu"), ("cuda", "whl/cu126")):
        proc, pip = _run_in_stage(script, builder, {"VARIANT": variant}, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert pip == [f"install torch=={version} --index-url https://download.pytorch.org/{index}"]
    proc, pip = _run_in_stage(script, builder, {"VARIANT": "rocm"}, tmp_path)
    assert proc.returncode != 0 and "VARIANT" in proc.stderr and not pip
    proc, pip = _run_in_stage(script, builder, {"VARIANT": "cuda", "TORCH_SPEC": "torch==9"},
                              tmp_path)
    assert proc.returncode == 0 and pip == ["install torch==9"]


def test_dockerfile_installs_the_dependencies_of_pyproject(tmp_path: Path) -> None:
    deps = _pyproject()["project"]["dependencies"]
    builder = stages()[0]
    (script,) = [rest for w, rest in builder if w == "RUN" and "tomllib" in rest]
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    script = script.replace("/tmp/", f"{tmp_path}/")
    proc, pip = _run_in_stage(script, builder, {}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert pip == [f"install -c constraints.txt -r {tmp_path}/requirements.txt"]
    assert (tmp_path / "requirements.txt").read_text().split("\n")[:-1] == deps
    for w, rest in dockerfile_instructions():
        if w == "RUN":
            syntax = subprocess.run(["sh", "-n", "-c", rest], capture_output=True, text=True,
                                    check=False)
            assert syntax.returncode == 0, f"RUN {rest[:60]}...: {syntax.stderr}"


def test_the_build_context_installs_as_a_working_package(tmp_path: Path) -> None:
    """`pip install .` from exactly what .dockerignore sends: a wheel, run from elsewhere."""
    ctx = tmp_path / "ctx"
    for rel in build_context():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, ctx / rel)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(wheels), str(ctx)], capture_output=True, text=True,
                           timeout=120, check=False)
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"no setuptools to build with offline: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("rabo-*.whl")
    target = tmp_path / "site"
    inst = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert inst.returncode == 0, inst.stderr[-2000:]
    (ep,) = target.glob("rabo-*.dist-info/entry_points.txt")
    assert "rabo = rabo.cli:main" in ep.read_text()
    probe = (
        "import rabo, coordinator, worker, rabo_proto.v1.rabo_pb2_grpc, sys\n"
        f"assert rabo.__file__.startswith({str(target)!r}), rabo.__file__\n"
        "from rabo.cli import build_parser\n"
        "p = build_parser()\n"
        "p.parse_args(['coordinator', '--health-port', '50052'])\n"
        "p.parse_args(['worker'])\n"
        "p.parse_args(['health', '--address', '127.0.0.1:50052'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]


# --------------------------------------------------------------------------- as pods would run




def _bundled_mnist() -> Path | None:
    from rabo.data.sources import _bundled_mnist_candidates

    for p in _bundled_mnist_candidates():
        if (p / "t10k-images-idx3-ubyte.gz").is_file():
            return p
    return None


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)


@pytest.mark.slow
def test_pods_args_env_and_secrets_run_a_job(tmp_path: Path,
                                             processes: list[subprocess.Popen[str]]) -> None:
    """The rendered cpu overlay, run as processes: the coordinator and worker args and env from
    the manifests, the Secrets built by deploy/k8s/secrets from `rabo certs`, laid out at their
    mount paths. Only ports and root paths are moved; the job is cut to two rounds."""
    from rabo.certs import write_bundle

    mnist = _bundled_mnist()
    if mnist is None:
        pytest.skip("bundled MNIST test set (../shared/data/mnist) is absent")
    docs = render("cpu")
    certs = tmp_path / "certs"
    write_bundle(certs, workers=1)
    files = tuple(sorted((p.name, p.read_bytes()) for p in certs.iterdir()))
    secrets = {s["metadata"]["name"]: s for s in _secrets_with(files)}
    root = tmp_path / "root"
    grpc_port, health_port = free_port(), free_port()

    def pod_env(deploy: dict[str, Any], index: int) -> dict[str, str]:
        pod = deploy["spec"]["template"]["spec"]
        c = container(deploy)
        volumes = {v["name"]: v for v in pod["volumes"]}
        for m in c["volumeMounts"]:  # the Secrets, as the kubelet mounts them
            secret = volumes[m["name"]].get("secret")
            if secret:
                where = root / deploy["metadata"]["name"] / m["mountPath"].lstrip("/")
                where.mkdir(parents=True, exist_ok=True)
                for key, value in secrets[secret["secretName"]]["data"].items():
                    (where / key).write_bytes(base64.b64decode(value))
        env = {"PATH": os.environ["PATH"], "GRPC_VERBOSITY": "ERROR"}
        for name, value in env_of(c).items():
            if isinstance(value, dict):  # downward API
                value = f"pod-{index}" if "fieldRef" in value else "1"
            elif value.startswith("/var/run/rabo/"):
                value = str(root / deploy["metadata"]["name"] / value.lstrip("/"))
            elif name == "RABO_DATA_DIR":
                value = str(mnist)
            elif name == "RABO_COORDINATOR":
                # rabo-coordinator does not resolve here; still check the certificate names it
                env["RABO_TLS_SERVER_NAME"] = value.rsplit(":", 1)[0]
                value = f"127.0.0.1:{grpc_port}"
            elif name == "RABO_METRICS_PORT":
                value = "0"
            env[name] = value
        return env

    coord = component(docs, "coordinator")[0]
    _, text = job_config(docs)
    cfg_file = tmp_path / "config.yaml"
    job = yaml.safe_load(text)
    job["rounds"] = 2
    cfg_file.write_text(yaml.safe_dump(job))
    args = [a.replace("/etc/rabo/config.yaml", str(cfg_file))
            .replace("/var/lib/rabo/run", str(tmp_path / "run"))
            .replace("0.0.0.0:50051", f"127.0.0.1:{grpc_port}")
            .replace("50052", str(health_port)) for a in container(coord)["args"]]
    rabo = [sys.executable, "-m", "rabo.cli"]
    log = tmp_path / "coordinator.log"
    processes.append(subprocess.Popen([*rabo, *args], env=pod_env(coord, 0), cwd=tmp_path,
                                      stdout=log.open("w"), stderr=subprocess.STDOUT,
                                      text=True))
    deadline = time.monotonic() + 120
    while "listening on" not in log.read_text():
        assert processes[0].poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    # the image's HEALTHCHECK command, against the port the probes use; before any worker
    # joins, so the coordinator is still waiting and serving
    health = subprocess.run([*rabo, "health", "--address", f"127.0.0.1:{health_port}",
                             "--timeout", "10"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert health.returncode == 0 and "SERVING" in health.stdout, \
        health.stderr + log.read_text()

    worker = component(docs, "worker")[0]
    for i in range(worker["spec"]["replicas"]):
        processes.append(subprocess.Popen(
            [*rabo, *container(worker)["args"], "--give-up-s", "120"],
            env=pod_env(worker, i), cwd=tmp_path, stdout=(tmp_path / f"worker-{i}.log").open("w"),
            stderr=subprocess.STDOUT, text=True))
    # --keep-serving: after the run the coordinator stays up (a Deployment must not restart
    # it); the workers, with RABO_ON_FINISH=idle, stay up too, until the pods are deleted
    deadline = time.monotonic() + 240
    while "run complete; serving until stopped" not in log.read_text():
        assert processes[0].poll() is None, log.read_text()[-3000:]
        if time.monotonic() > deadline:
            pytest.fail("coordinator did not finish:\n" + log.read_text()[-3000:])
        time.sleep(0.3)
    health = subprocess.run([*rabo, "health", "--address", f"127.0.0.1:{health_port}"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert health.returncode == 0, health.stderr
    time.sleep(2.0)
    assert all(p.poll() is None for p in processes[1:]), "a worker exited instead of idling"
    for p in processes:  # kubectl delete: SIGTERM, then the grace period
        p.send_signal(signal.SIGTERM)
    code = processes[0].wait(timeout=60)
    out = log.read_text()
    assert code == 0, out[-3000:]
    assert "TLS with client certificates" in out and "token required" in out, out[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()
    for p in processes[1:]:
        assert p.wait(timeout=60) == 0


def test_the_constraints_pin_every_dependency_make_and_the_image_install() -> None:
    """constraints.txt is what makes installs reproducible: every dependency and dev extra of
    pyproject.toml but torch has exactly one pin there, each pin satisfies its requirement,
    and make install, the Dockerfile and the image's build context all use the file."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in [*project["dependencies"],
                                       *project["optional-dependencies"]["dev"]]]
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            assert canonicalize_name(name) not in pins, f"pinned twice: {name}"
            pins[canonicalize_name(name)] = version
    for req in wanted:
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins  # left to TORCH_SPEC (a CPU or a CUDA build)
            continue
        assert name in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()
    docker = DOCKERFILE.read_text()
    assert docker.count("-c constraints.txt") == 2 and "constraints.txt ./" in docker
    assert "!constraints.txt" in (REPO / ".dockerignore").read_text().splitlines()


def test_check_script_installs_nothing_and_says_what_is_missing(tmp_path: Path) -> None:
    """Without kubernetes-validate anywhere, check.sh fails naming how to get it, instead of
    installing packages on the user's machine."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "deploy", copy / "deploy")  # no .venv next to it
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "kubectl", "mktemp", "rm", "dirname", "cp", "mkdir", "tr", "cat"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    env = {"PATH": str(bindir), "HOME": str(tmp_path)}
    proc = subprocess.run([str(copy / "deploy" / "k8s" / "check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "kubernetes-validate is missing: make install" in proc.stderr, proc.stderr
    assert not (copy / ".venv").exists()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_and_pod_carries_the_recommended_labels(overlay: str) -> None:
    from rabo import __version__

    want = {"app.kubernetes.io/name": "rabo", "app.kubernetes.io/instance": "rabo",
            "app.kubernetes.io/version": __version__, "app.kubernetes.io/part-of": "rabo",
            "app.kubernetes.io/managed-by": "kustomize"}
    for doc in render(overlay):
        labels = doc["metadata"].get("labels", {})
        assert want.items() <= labels.items(), (doc["kind"], doc["metadata"]["name"], labels)
        template = doc.get("spec", {}).get("template")
        if template:
            pod = template["metadata"]["labels"]
            assert want.items() <= pod.items(), (doc["metadata"]["name"], pod)
            # selectors stay as they were: a Deployment's selector cannot change in place
            selector = doc["spec"]["selector"]["matchLabels"]
            assert "app.kubernetes.io/version" not in selector
