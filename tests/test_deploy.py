"""The container image and the Kubernetes manifests (deploy/), checked without Docker or a cluster.

The kustomizations are rendered with ``kubectl kustomize`` and read as data: probes, ports,
secrets and their mount paths, the NetworkPolicy, worker pools, Jobs and JobSets against the
job's ``clients.count``, and the container arguments against the real ``rabo`` and ``torchrun``
parsers; the shell snippets in the pods (the per-worker certificate step, a torch.distributed
worker's node rank) run under ``sh``. The Dockerfile is parsed: its COPY sources against the
build context that ``.dockerignore`` leaves, its torch selection run under ``sh`` with a
stand-in ``pip``, and the context itself built into a wheel and run, as ``pip install .`` in
the image would. ``deploy/k8s/check.sh`` validates the rendered YAML against the Kubernetes
schemas and the vendored CRD schemas (``deploy/k8s/check_manifests.py``, whose checks are also
run here against broken copies of the renders).
"""

from __future__ import annotations

import base64
import copy
import importlib.util
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
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
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
OVERLAYS = ("cpu", "gpu", "heterogeneous")  # the Deployment overlays
RUN_TO_COMPLETION = ("jobs", "jobset")  # the gRPC job as Jobs, as a JobSet
ALL_OVERLAYS = (*OVERLAYS, *RUN_TO_COMPLETION, "torchrun")
WORKER_CERT_SECRETS = [f"rabo-worker-{i}-tls" for i in range(4)]
INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
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


def render_dir(path: Path) -> list[dict[str, Any]]:
    return list(_render(str(path)))


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
    names = ("token", "ca.crt", "coordinator.crt", "coordinator.key",
             *(f"worker-{i}.{ext}" for i in range(4) for ext in ("crt", "key")))
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


def kubelet_env(c: dict[str, Any]) -> dict[str, Any]:
    """env_of with $(VAR) in each value expanded from the variables before it, as the kubelet
    does ($$ is a $; a variable not set before stays as written)."""
    out: dict[str, Any] = {}
    for name, value in env_of(c).items():
        out[name] = expand(value, out) if isinstance(value, str) else value
    return out


def expand(text: str, env: dict[str, Any]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        value = env.get(m.group(1))
        return value if isinstance(value, str) else m.group(0)

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


@dataclass
class PodSet:
    """A pod template of a Deployment, Job or JobSet replicated Job, and how many pods."""

    owner: str
    template: dict[str, Any]
    count: int
    job: dict[str, Any] | None  # the Job spec, for Jobs and JobSets

    @property
    def spec(self) -> dict[str, Any]:
        return self.template["spec"]

    @property
    def labels(self) -> dict[str, str]:
        return self.template["metadata"]["labels"]

    @property
    def component(self) -> str | None:
        return self.labels.get("app.kubernetes.io/component")

    def container(self) -> dict[str, Any]:
        (c,) = self.spec["containers"]
        return c


def pod_sets(docs: list[dict[str, Any]]) -> list[PodSet]:
    out = []
    for d in docs:
        name, spec = f"{d['kind']} {d['metadata']['name']}", d.get("spec", {})
        if d["kind"] == "Deployment":
            out.append(PodSet(name, spec["template"], spec["replicas"], None))
        elif d["kind"] == "Job":
            out.append(PodSet(name, spec["template"], spec.get("completions", 1), spec))
        elif d["kind"] == "JobSet":
            for r in spec["replicatedJobs"]:
                job = r["template"]["spec"]
                out.append(PodSet(f"{name}/{r['name']}", job["template"],
                                  r.get("replicas", 1) * job.get("completions", 1), job))
    return out


def pods_of(docs: list[dict[str, Any]], which: str) -> list[PodSet]:
    return [p for p in pod_sets(docs) if p.component == which]


def pod_config_text(docs: list[dict[str, Any]]) -> str:
    """The config.yaml the coordinator pod mounts at /etc/rabo, whatever runs it."""
    (coord,) = pods_of(docs, "coordinator")
    volumes = {v["name"]: v for v in coord.spec["volumes"]}
    (mount,) = [m for m in coord.container()["volumeMounts"] if m["mountPath"] == "/etc/rabo"]
    cm = named(docs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    return str(cm["data"]["config.yaml"])


def pod_config(docs: list[dict[str, Any]]) -> config.Config:
    return config.from_dict(yaml.safe_load(pod_config_text(docs)))


@cache
def checker() -> ModuleType:
    """deploy/k8s/check_manifests.py, imported from its path (it is no package)."""
    pytest.importorskip("jsonschema", reason="check_manifests.py needs jsonschema "
                                             "(kubernetes-validate brings it: make install)")
    spec = importlib.util.spec_from_file_location("check_manifests",
                                                  K8S / "check_manifests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    for name in (*(f"overlays/{o}" for o in ALL_OVERLAYS), "deploy/k8s/data", "secrets",
                 "deploy/k8s/cert-manager", "deploy/k8s/cert-manager/ca"):
        assert re.search(rf"^ok  \S*{re.escape(name)}:", proc.stdout, re.M), proc.stdout
    # the custom resources were checked against the vendored CRD schemas, the JobSet's Job
    # templates by kubernetes-validate, and the worker totals against clients.count
    out = proc.stdout
    assert re.search(r"^ok  \S*overlays/jobset: 5 objects valid \(Kubernetes [^:]*: 6; "
                     r"vendored CRD schemas: 1\)", out, re.M), out
    assert re.search(r"^ok  \S*cert-manager: 7 objects valid \(Kubernetes [^:]*: 0; "
                     r"vendored CRD schemas: 7\)", out, re.M), out
    assert "schema: JobSet rabo (jobset-v0.12.0, jobset-v0.8.0)" in out
    assert "workers 4 (Job rabo-worker) = 4, clients.count 4" in out
    assert "workers 5 ranks - rank 0 = 4, clients.count 4" in out
    assert "Job rabo-worker: 4 workers, 4 certificate Secrets" in out


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


def test_check_script_fails_when_the_workers_do_not_fill_clients_count(tmp_path: Path) -> None:
    """A schema-valid render whose worker total is not clients.count fails check.sh, naming
    both numbers (check_manifests.py)."""
    kubectl()
    copy_root = tmp_path / "repo"
    shutil.copytree(REPO / "deploy", copy_root / "deploy")
    if (REPO / ".venv").exists():
        (copy_root / ".venv").symlink_to(REPO / ".venv")
    cfg = copy_root / "deploy" / "k8s" / "base" / "shared" / "config.yaml"
    text = cfg.read_text()
    assert "  count: 4 " in text
    cfg.write_text(text.replace("  count: 4 ", "  count: 5 "))
    proc = subprocess.run([str(copy_root / "deploy" / "k8s" / "check.sh")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode != 0
    assert "FAIL: deploy/k8s/overlays/cpu: check_manifests.py found problems" in proc.stderr
    assert "the workers add up to 4 (4 (Deployment rabo-worker)) but clients.count in " \
           "ConfigMap rabo-config-" in proc.stderr, proc.stderr


def test_make_k8s_check_runs_the_script_with_the_project_venv_only() -> None:
    """make k8s-check installs into .venv at most (make install), never globally: every pip
    it would run is the venv's, and check.sh gets the venv's validator and Python."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    proc = subprocess.run([make, "-n", "k8s-check"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for line in lines:
        if re.search(r"\bpip\b", line):
            assert line.startswith(".venv/bin/python -m pip install"), line
        assert "sudo" not in line and "--user" not in line, line
    (check,) = [ln for ln in lines if "deploy/k8s/check.sh" in ln]
    assert "KUBERNETES_VALIDATE=.venv/bin/kubernetes-validate" in check
    assert "CHECK_PYTHON=.venv/bin/python" in check


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


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_pods_are_locked_down(overlay: str) -> None:
    sets = pod_sets(render(overlay))
    assert {p.component for p in sets} == {"coordinator", "worker"}
    for pods in sets:
        name = pods.owner
        pod = pods.spec
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == UID, name
        assert pod["automountServiceAccountToken"] is False, name
        # a Service named rabo-coordinator would inject RABO_COORDINATOR_* variables
        assert pod["enableServiceLinks"] is False, name
        c = pods.container()
        tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert len(tmp) == 1, f"{name}: a read-only root needs a writable /tmp"
        vol = {v["name"]: v for v in pod["volumes"]}[tmp[0]["name"]]
        assert "emptyDir" in vol, name
        for each in [*pod.get("initContainers", []), c]:
            sc = each["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, each["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, each["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, each["name"])
            res = each["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[kind]), f"{name} {each['name']}: {kind}"
            assert ":" in each["image"] and not each["image"].endswith(":latest"), name
        if pods.job is not None:  # pods of a run that ends are never restarted in place
            assert pod["restartPolicy"] == "Never", name


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
        env = kubelet_env(c)
        assert env["RABO_COORDINATOR"] == f"{svc['metadata']['name']}:{grpc_port}"
        # the Service name is a value of its own, so that a namePrefix renames it here too
        assert env_of(c)["RABO_COORDINATOR"] == "$(COORDINATOR_SERVICE):50051"
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


@pytest.mark.parametrize("overlay", (*OVERLAYS, *RUN_TO_COMPLETION))
def test_secrets_and_data_are_mounted_where_the_env_points(overlay: str) -> None:
    docs = render(overlay)
    secrets = {s["metadata"]["name"]: s
               for s in _secrets_with(secret_files_placeholder()) if s["kind"] == "Secret"}
    data_claims = {d["metadata"]["name"] for d in _render(str(K8S / "data"))
                   if d["kind"] == "PersistentVolumeClaim"}
    mounted: set[str] = set()
    for pods in pod_sets(docs):
        pod = pods.spec
        c = pods.container()
        env = env_of(c)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert set(SECRET_ENV) <= set(env), f"{pods.owner}: {sorted(env)}"
        for var in SECRET_ENV:
            path = Path(env[var])
            mount = mounts[str(path.parent)]
            assert mount.get("readOnly") is True, var
            volume = volumes[mount["name"]]
            if "secret" in volume:
                secret = volume["secret"]["secretName"]
                assert secret in secrets, f"{var}: no Secret {secret} in deploy/k8s/secrets"
                assert path.name in secrets[secret]["data"], f"{var}: {secret} has no {path.name}"
                mounted.add(secret)
                continue
            # a worker of a Job: its own certificate, copied into a memory emptyDir at start
            # by the init container, from the projected volume of every worker's Secret
            assert pods.component == "worker" and pods.job is not None, (pods.owner, var)
            assert volume["emptyDir"]["medium"] == "Memory", var
            (init,) = pod["initContainers"]
            assert mount["name"] in {m["name"] for m in init["volumeMounts"]}
            (projected,) = [volumes[m["name"]]["projected"] for m in init["volumeMounts"]
                            if "projected" in volumes[m["name"]]]
            for source in projected["sources"]:
                name = source["secret"]["name"]
                assert name in secrets, f"no Secret {name} in deploy/k8s/secrets"
                keys = {i["key"] for i in source["secret"]["items"]}
                assert path.name in keys <= set(secrets[name]["data"]), (name, keys)
                mounted.add(name)
        data = mounts[env["RABO_DATA_DIR"]]
        assert data.get("readOnly") is True
        claim = volumes[data["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in data_claims
    # the coordinator and the workers present different certificates; workers of a Job each
    # their own
    if overlay in RUN_TO_COMPLETION:
        assert mounted == {"rabo-auth", "rabo-tls", *WORKER_CERT_SECRETS}
    else:
        assert mounted == {"rabo-auth", "rabo-tls", "rabo-worker-tls"}


def test_secrets_from_rabo_certs_name_the_service_in_the_coordinator_certificate() -> None:
    from cryptography import x509

    from rabo.certs import write_bundle

    with tempfile.TemporaryDirectory() as tmp:
        write_bundle(tmp, workers=4)
        files = tuple(sorted((p.name, p.read_bytes()) for p in Path(tmp).iterdir()))
    secrets = {s["metadata"]["name"]: s for s in _secrets_with(files)}
    assert set(secrets) == {"rabo-auth", "rabo-tls", "rabo-worker-tls", *WORKER_CERT_SECRETS}

    def pem(secret: str, key: str) -> bytes:
        return base64.b64decode(secrets[secret]["data"][key])

    server = x509.load_pem_x509_certificate(pem("rabo-tls", "tls.crt"))
    client = x509.load_pem_x509_certificate(pem("rabo-worker-tls", "tls.crt"))
    ca = x509.load_pem_x509_certificate(pem("rabo-tls", "ca.crt"))
    assert pem("rabo-tls", "ca.crt") == pem("rabo-worker-tls", "ca.crt")
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    host = kubelet_env(container(component(render("cpu"), "worker")[0]))["RABO_COORDINATOR"]
    assert host.rsplit(":", 1)[0] in sans.get_values_for_type(x509.DNSName)
    assert pem("rabo-auth", "token").strip()
    # the Jobs' workers: one certificate each, all from the same CA
    fingerprints = set()
    for i, name in enumerate(WORKER_CERT_SECRETS):
        cert = x509.load_pem_x509_certificate(pem(name, "tls.crt"))
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == \
            f"worker-{i}"
        assert pem(name, "ca.crt") == pem("rabo-tls", "ca.crt")
        fingerprints.add(cert.fingerprint(cert.signature_hash_algorithm))
    assert len(fingerprints) == len(WORKER_CERT_SECRETS)


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


# Measured in real memory cgroups on this config (784-4096-4096 MLP, MNIST; tests/test_pools.py
# and a cold-cache run): a worker's working set (what its budget is counted against: usage
# less inactive file pages) is 195 MiB with warm caches and 221 MiB with cold ones after it
# has loaded its data; 180-260 MiB brackets both with a margin. The policy's
# estimate counts the payload, transport buffers and the estimator's gradients: a gRPC worker's
# measured peak above start-up was 0.96x of it (500 of 522 MiB at ratio 1 for this model);
# 1.0 keeps a margin. A pod's budget is its limit minus what it holds.
FOOTPRINTS = [180 * 2**20, 200 * 2**20, 220 * 2**20, 240 * 2**20, 260 * 2**20]
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


# --------------------------------------------------------------------------- runs that end


def batch_pods(overlay: str) -> tuple[PodSet, PodSet]:
    """(coordinator, workers) of a run-to-completion overlay."""
    docs = render(overlay)
    assert not of_kind(docs, "Deployment"), "the Jobs replace the Deployments"
    (coord,) = pods_of(docs, "coordinator")
    (workers,) = pods_of(docs, "worker")
    return coord, workers


def parse_worker(c: dict[str, Any], monkeypatch: pytest.MonkeyPatch, index: int
                 ) -> Any:
    """The worker's args parsed by the real parser, its env (downward API resolved for
    completion index ``index``) as the defaults."""
    with monkeypatch.context() as m:
        for k, v in kubelet_env(c).items():
            if isinstance(v, dict):
                field = v.get("fieldRef", {}).get("fieldPath")
                v = str(index) if field == INDEX_FIELD else "2"
            m.setenv(k, v)
        return build_parser().parse_args(c["args"])


@pytest.mark.parametrize("overlay", RUN_TO_COMPLETION)
def test_run_to_completion_pods_exit_when_the_run_is_over(
        overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(overlay)
    coord, workers = batch_pods(overlay)
    cfg = pod_config(docs)

    # the coordinator: no --keep-serving, so it exits 0 after the last round; its run
    # folder is on the state claim, and a replacement pod resumes from it
    c = coord.container()
    ns = build_parser().parse_args(c["args"])
    assert ns.command == "coordinator" and ns.keep_serving is False
    assert ns.out == ns.resume == "/var/lib/rabo/run"
    volumes = {v["name"]: v for v in coord.spec["volumes"]}
    (state,) = [m for m in c["volumeMounts"] if Path(ns.out).is_relative_to(m["mountPath"])]
    claim = volumes[state["name"]]["persistentVolumeClaim"]["claimName"]
    named(docs, "PersistentVolumeClaim", claim)
    assert coord.count == 1 and coord.job is not None
    rules = coord.job["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "coordinator",
                                                 "operator": "In", "values": [2]}} in rules

    # the workers: an Indexed Job, one pod per client slot, all at once
    job = workers.job
    assert job is not None and job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == cfg.clients.count == workers.count
    wc = workers.container()
    for index in range(job["completions"]):
        ns = parse_worker(wc, monkeypatch, index)
        assert ns.command == "worker"
        assert ns.on_finish == "exit"  # told the run is over: exit 0, the index completes
        assert ns.client_id == index  # a replacement pod takes back its slot and partition
        assert 0 < ns.give_up_s <= 3600  # cannot hang on a coordinator that is gone
    from rabo.errors import ExitCode
    (fail,) = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailIndex"]
    assert fail["onExitCodes"]["containerName"] == wc["name"]
    assert set(fail["onExitCodes"]["values"]) == {ExitCode.USAGE, ExitCode.REFUSED,
                                                 ExitCode.PROTOCOL}
    assert ExitCode.GAVE_UP not in fail["onExitCodes"]["values"]  # retried: may come back
    assert {"type": "DisruptionTarget", "status": "True"} in [
        c for r in job["podFailurePolicy"]["rules"] if r["action"] == "Ignore"
        for c in r["onPodConditions"]]


@pytest.mark.parametrize("overlay", RUN_TO_COMPLETION)
def test_run_to_completion_pods_are_the_deployment_pods_made_to_end(overlay: str) -> None:
    """The Jobs' pod templates are copied from the Deployments (components/jobs): apart from
    what makes them end and the per-worker certificate, they are the cpu overlay's pods."""
    deployments = {p.component: p for p in pod_sets(render("cpu"))}
    for pods in batch_pods(overlay):
        want = copy.deepcopy(deployments[pods.component].template)
        got = copy.deepcopy(pods.template)
        assert got["spec"].pop("restartPolicy") == "Never"
        gc, wc = got["spec"]["containers"][0], want["spec"]["containers"][0]
        if pods.component == "coordinator":
            assert wc.pop("args") == [*gc.pop("args"), "--keep-serving"]
        else:
            assert (gc.pop("args"), wc.pop("args")) == (["worker", "--give-up-s", "900"],
                                                        ["worker"])
            genv = {e["name"]: e for e in gc.pop("env")}
            wenv = {e["name"]: e for e in wc.pop("env")}
            assert genv.pop("RABO_ON_FINISH") == {"name": "RABO_ON_FINISH", "value": "exit"}
            assert wenv.pop("RABO_ON_FINISH") == {"name": "RABO_ON_FINISH", "value": "idle"}
            assert genv.pop("RABO_CLIENT_ID")["valueFrom"]["fieldRef"]["fieldPath"] == \
                INDEX_FIELD
            assert genv == wenv
            assert [i["name"] for i in got["spec"].pop("initContainers")] == ["certificate"]
            gvol = {v["name"]: v for v in got["spec"].pop("volumes")}
            wvol = {v["name"]: v for v in want["spec"].pop("volumes")}
            assert "projected" in gvol.pop("worker-certificates")
            assert gvol.pop("tls") == {"name": "tls", "emptyDir": {"medium": "Memory",
                                                                   "sizeLimit": "1Mi"}}
            assert wvol.pop("tls")["secret"]["secretName"] == "rabo-worker-tls"
            assert gvol == wvol
        assert got == want, pods.owner


def _init_container_picks(pods: PodSet, index: int, secrets: dict[str, dict[str, Any]],
                          root: Path) -> subprocess.CompletedProcess[str]:
    """Run the worker pod's init container under sh for completion ``index``, with its
    volumes laid out under ``root`` as the kubelet would from ``secrets``."""
    (init,) = pods.spec["initContainers"]
    volumes = {v["name"]: v for v in pods.spec["volumes"]}
    for m in init["volumeMounts"]:
        where = root / m["mountPath"].lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        for source in volumes[m["name"]].get("projected", {}).get("sources", []):
            secret = secrets[source["secret"]["name"]]
            for item in source["secret"]["items"]:
                target = where / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(secret["data"][item["key"]]))
    env = {"PATH": os.environ["PATH"]}
    for var in init["env"]:
        field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        assert field == INDEX_FIELD, var  # the completion index, by the downward API
        env[var["name"]] = str(index)
    command = [w.replace("/var/run/rabo/", f"{root}/var/run/rabo/") for w in init["command"]]
    assert command[:2] == ["sh", "-c"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30,
                          check=False)


@pytest.mark.parametrize("overlay", RUN_TO_COMPLETION)
def test_each_worker_presents_its_own_certificate(overlay: str, tmp_path: Path) -> None:
    """Worker i of the Indexed Job ends up with the certificate of Secret rabo-worker-<i>-tls
    (from `rabo certs` via deploy/k8s/secrets) where RABO_TLS_* point, and nothing else."""
    from cryptography import x509

    from rabo.certs import write_bundle

    _, workers = batch_pods(overlay)
    certs = tmp_path / "certs"
    write_bundle(certs, workers=workers.count)
    files = tuple(sorted((p.name, p.read_bytes()) for p in certs.iterdir()))
    secrets = {s["metadata"]["name"]: s for s in _secrets_with(files)}
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    c = workers.container()
    env = env_of(c)
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert "worker-certificates" not in mounts  # the worker never sees the others' keys
    seen = set()
    for index in range(workers.count):
        root = tmp_path / f"pod-{index}"
        proc = _init_container_picks(workers, index, secrets, root)
        assert proc.returncode == 0, proc.stderr
        tls = root / mounts["tls"]["mountPath"].lstrip("/")
        assert sorted(p.name for p in tls.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
        for var in ("RABO_TLS_CA", "RABO_TLS_CERT", "RABO_TLS_KEY"):
            assert (root / env[var].lstrip("/")).is_file(), var
        cert = x509.load_pem_x509_certificate((root / env["RABO_TLS_CERT"].lstrip("/"))
                                              .read_bytes())
        cert.verify_directly_issued_by(ca)
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == f"worker-{index}"
        assert (tls / "tls.key").read_bytes() == (certs / f"worker-{index}.key").read_bytes()
        seen.add(cert.serial_number)
    assert len(seen) == workers.count
    # an index without a Secret stops the pod with a message naming what to add
    proc = _init_container_picks(workers, workers.count, secrets, tmp_path / "extra")
    assert proc.returncode == 1
    assert f"rabo-worker-{workers.count}-tls" in proc.stderr


def test_jobset_completes_with_the_coordinator_and_starts_workers_after_it() -> None:
    (js,) = of_kind(render("jobset"), "JobSet")
    assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    spec = js["spec"]
    jobs = {r["name"]: r for r in spec["replicatedJobs"]}
    assert list(jobs) == ["coordinator", "workers"]
    assert all(r["replicas"] == 1 for r in jobs.values())
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["coordinator"]}
    assert jobs["workers"]["dependsOn"] == [{"name": "coordinator", "status": "Ready"}]
    # workers dial the Service (the name in the coordinator's certificate), not pod names
    assert spec["network"]["enableDNSHostnames"] is False
    assert spec["failurePolicy"]["maxRestarts"] >= 1
    (rule,) = spec["failurePolicy"]["rules"]
    assert rule["action"] == "FailJobSet" and rule["onJobFailureReasons"] == ["PodFailurePolicy"]
    # the readiness the workers wait for is the coordinator's gRPC health probe
    coord = jobs["coordinator"]["template"]["spec"]["template"]["spec"]["containers"][0]
    assert coord["readinessProbe"]["grpc"]["port"] == 50052
    assert "app.kubernetes.io/component" not in js["metadata"]["labels"]


def test_workers_add_up_to_clients_count_in_every_overlay() -> None:
    """One worker per data partition, counted independently of check_manifests.py:
    Deployment replicas, Job completions, JobSet replicas x completions, torchrun ranks."""
    for overlay in ALL_OVERLAYS:
        docs = render(overlay)
        cfg = pod_config(docs)
        if overlay == "torchrun":
            # torchrun: every pod one node of --nproc-per-node ranks; rank 0 coordinates
            ranks = 0
            for pods in pod_sets(docs):
                flags = dict(a[2:].split("=", 1) for a in torchrun_args(pods)
                             if a.startswith("--") and "=" in a)
                ranks += pods.count * int(flags["nproc-per-node"])
                assert int(flags["nnodes"]) * int(flags["nproc-per-node"]) == 1 + cfg.clients.count
            total = ranks - 1
        else:
            total = sum(p.count for p in pods_of(docs, "worker"))
        assert total == cfg.clients.count, overlay


# --------------------------------------------------------------------------- torch.distributed


def torchrun_args(pods: PodSet) -> list[str]:
    c = pods.container()
    words = [*c["command"], *c.get("args", [])]
    return words[words.index("torchrun") + 1:] if "torchrun" in words else words


def dist_parts() -> tuple[list[dict[str, Any]], dict[str, Any], PodSet, PodSet]:
    docs = render("torchrun")
    (js,) = of_kind(docs, "JobSet")
    (coord,) = pods_of(docs, "coordinator")
    (workers,) = pods_of(docs, "worker")
    return docs, js, coord, workers


def coordinator_endpoint(js: dict[str, Any]) -> str:
    """What the JobSet controller writes into annotation jobset.sigs.k8s.io/coordinator."""
    c, net = js["spec"]["coordinator"], js["spec"]["network"]
    return (f"{js['metadata']['name']}-{c['replicatedJob']}-{c['jobIndex']}-{c['podIndex']}"
            f".{net['subdomain']}")


def test_dist_ranks_meet_at_the_coordinator_pod(tmp_path: Path) -> None:
    """Each pod's torchrun line, as the kubelet and sh make it, parsed by torchrun's own
    parser: node 0 is the coordinator pod, worker pod i is node i + 1, all meet at the
    coordinator pod's address, and the script is `rabo.dist` with its own valid flags."""
    run = pytest.importorskip("torch.distributed.run", reason="torch is not installed")
    from rabo.distcli import add_dist_args

    docs, js, coord, workers = dist_parts()
    master = coordinator_endpoint(js)
    assert master == "rabo-dist-coordinator-0-0.rabo-dist"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "torchrun").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bindir / "torchrun").chmod(0o755)

    def launched(pods: PodSet, index: int) -> list[str]:
        c = pods.container()
        env = {k: v for k, v in kubelet_env(c).items() if isinstance(v, str)}
        annotations = {"jobset.sigs.k8s.io/coordinator": master,
                       "batch.kubernetes.io/job-completion-index": str(index)}
        for var in c["env"]:
            field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
            m = re.fullmatch(r"metadata\.annotations\['(.+)'\]", field)
            if m:
                env[var["name"]] = annotations[m.group(1)]
        words = [expand(w, env) for w in [*c["command"], *c.get("args", [])]]
        proc = subprocess.run(words, env={**env, "PATH": f"{bindir}:/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    cfg = pod_config(docs)
    nodes = {}
    dist_parser = argparse_for(add_dist_args)
    for pods in (coord, workers):
        for index in range(pods.count):
            ns = run.get_args_parser().parse_args(launched(pods, index))
            assert (ns.master_addr, ns.master_port) == (master, 29500)
            assert ns.rdzv_backend == "static" and ns.module and ns.training_script == "rabo.dist"
            assert (int(ns.nnodes), int(ns.nproc_per_node)) == (1 + cfg.clients.count, 1)
            assert ns.node_rank not in nodes
            nodes[ns.node_rank] = (pods.component, index)
            flags = dist_parser.parse_args(ns.training_script_args)
            assert flags.config == "/etc/rabo/config.yaml"
            assert (flags.out is not None) == (pods.component == "coordinator")
    assert nodes == {0: ("coordinator", 0), **{i + 1: ("worker", i)
                                               for i in range(cfg.clients.count)}}
    # rank 0 writes the run folder to the state claim
    c = coord.container()
    out = dist_parser.parse_args(launched(coord, 0)[launched(coord, 0).index("rabo.dist") + 1:]
                                 ).out
    (mount,) = [m for m in c["volumeMounts"] if Path(out).is_relative_to(m["mountPath"])]
    claim = {v["name"]: v for v in coord.spec["volumes"]}[mount["name"]]
    named(docs, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])


def argparse_for(add: Any) -> Any:
    import argparse

    p = argparse.ArgumentParser()
    add(p)
    return p


def test_dist_headless_service_and_network_policy_cover_exactly_the_run() -> None:
    docs, js, coord, workers = dist_parts()
    svc = named(docs, "Service", js["spec"]["network"]["subdomain"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert js["spec"]["network"]["enableDNSHostnames"] is True
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 0  # rabo dist has no elastic restart
    assert js["spec"]["successPolicy"] == {"operator": "All"}
    assert {p["port"] for p in svc["spec"]["ports"]} == {29500}
    (policy,) = [p for p in of_kind(docs, "NetworkPolicy")
                 if selects(p["spec"]["podSelector"], coord.labels)]
    grpc_worker = pods_of(render("cpu"), "worker")[0].labels
    for pods in (coord, workers):
        assert selects({"matchLabels": svc["spec"]["selector"]}, pods.labels)
        assert selects(policy["spec"]["podSelector"], pods.labels)
        assert pods.job is not None and pods.job["completionMode"] == "Indexed"
        assert pods.job["backoffLimit"] == 0
        (rule,) = policy["spec"]["ingress"]
        assert "ports" not in rule  # gloo picks its own ports
        assert any(selects(peer["podSelector"], pods.labels) for peer in rule["from"])
        assert not any(selects(peer["podSelector"], grpc_worker) for peer in rule["from"])
        assert pods.container()["resources"]["requests"]["memory"] == \
            pods.container()["resources"]["limits"]["memory"]
    assert not selects({"matchLabels": svc["spec"]["selector"]}, grpc_worker)


# --------------------------------------------------------------------------- cert-manager


def test_cert_manager_issues_every_secret_the_pods_mount() -> None:
    docs = render_dir(K8S / "cert-manager")
    certs = {c["spec"]["secretName"]: c for c in of_kind(docs, "Certificate")}
    generated = {s["metadata"]["name"] for s in _secrets_with(secret_files_placeholder())}
    assert set(certs) == generated - {"rabo-auth"}  # the token is no certificate
    (issuer,) = of_kind(docs, "Issuer")
    (ca_cert,) = of_kind(render_dir(K8S / "cert-manager" / "ca"), "Certificate")
    assert issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
    assert ca_cert["spec"]["isCA"] is True
    for cert in certs.values():
        spec = cert["spec"]
        assert spec["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer",
                                     "group": "cert-manager.io"}
        assert spec["privateKey"]["algorithm"] == "ECDSA"
        assert parse_hours(spec["renewBefore"]) < parse_hours(spec["duration"])
        assert cert["metadata"]["namespace"] == issuer["metadata"]["namespace"] == "rabo"
    # the server certificate names what the workers dial; client certificates are for clients
    server = certs["rabo-tls"]["spec"]
    assert "server auth" in server["usages"] and "client auth" not in server["usages"]
    host = kubelet_env(container(component(render("cpu"), "worker")[0]))["RABO_COORDINATOR"]
    service = host.rsplit(":", 1)[0]
    assert {service, f"{service}.rabo.svc", f"{service}.rabo.svc.cluster.local"} <= \
        set(server["dnsNames"])
    names = set()
    for name in ("rabo-worker-tls", *WORKER_CERT_SECRETS):
        spec = certs[name]["spec"]
        assert spec["usages"] == ["digital signature", "client auth"], name
        names.add(spec["commonName"])
    assert len(names) == 1 + len(WORKER_CERT_SECRETS)
    for i, name in enumerate(WORKER_CERT_SECRETS):
        assert certs[name]["spec"]["commonName"] == f"worker-{i}"


def parse_hours(text: str) -> float:
    m = re.fullmatch(r"(\d+)h", text)
    assert m, text
    return float(m.group(1))


# --------------------------------------------------------------------------- two runs


def test_two_runs_share_a_namespace_by_name_prefix_and_instance(tmp_path: Path) -> None:
    """An overlay with namePrefix run2- and instance run2 renames every object and every
    reference (the Service the workers dial included), and its selectors pick only its own
    pods, for Deployments, Jobs and JobSets alike."""
    for overlay in ("cpu", "jobs", "jobset", "torchrun"):
        run2 = tmp_path / overlay
        run2.mkdir()
        (run2 / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [os.path.relpath(K8S / "overlays" / overlay, run2)],
            "namePrefix": "run2-",
            "labels": [{"pairs": {"app.kubernetes.io/instance": "run2"},
                        "includeSelectors": True, "includeTemplates": True}]}))
        first, second = render(overlay), render_dir(run2)
        ids = {(d["kind"], d["metadata"]["name"]) for d in first}
        assert {(k, f"run2-{n}") for k, n in ids} == \
            {(d["kind"], d["metadata"]["name"]) for d in second}, overlay
        names = {d["metadata"]["name"] for d in second}
        for pods in pod_sets(second):
            assert pods.labels["app.kubernetes.io/instance"] == "run2"
            volumes = pods.spec["volumes"]
            for v in volumes:  # references to the run's own objects follow the prefix
                ref = v.get("configMap", {}).get("name") or \
                    v.get("persistentVolumeClaim", {}).get("claimName")
                if ref and ref != "rabo-data":  # the data volume is shared by runs
                    assert ref in names, (overlay, ref)
            env = kubelet_env(pods.container())
            if "RABO_COORDINATOR" in env:
                assert env["RABO_COORDINATOR"] == "run2-rabo-coordinator:50051"
                named(second, "Service", "run2-rabo-coordinator")
        for js in of_kind(second, "JobSet"):
            net = js["spec"]["network"]
            if net.get("subdomain"):
                named(second, "Service", net["subdomain"])
                assert net["subdomain"] == "run2-rabo-dist"
        # neither run's Services and policies select the other's pods
        for mine, theirs in ((first, second), (second, first)):
            for doc in mine:
                if doc["kind"] == "Service":
                    selector = {"matchLabels": doc["spec"]["selector"]}
                elif doc["kind"] == "NetworkPolicy":
                    selector = doc["spec"]["podSelector"]
                else:
                    continue
                assert not any(selects(selector, p.labels) for p in pod_sets(theirs)), \
                    (overlay, doc["metadata"]["name"])


# --------------------------------------------------------------------------- check_manifests.py


def _problems(docs: list[dict[str, Any]]) -> list[str]:
    mod = checker()
    _, _, problems = mod.split(docs, mod.load_schemas())
    return problems + mod.problems_and_report(docs)[1]


def test_check_manifests_passes_every_render() -> None:
    for overlay in ALL_OVERLAYS:
        assert _problems(render(overlay)) == [], overlay
    for path in (K8S / "cert-manager", K8S / "cert-manager" / "ca", K8S / "data"):
        assert _problems(render_dir(path)) == [], path


def test_check_manifests_catches_what_schemas_do_not() -> None:
    base = render("jobs")

    def broken(change: Any) -> list[str]:
        docs = copy.deepcopy(base)
        change(docs)
        return _problems(docs)

    def job(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
        return named(docs, "Job", name)

    def projected(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        volumes = job(docs, "rabo-worker")["spec"]["template"]["spec"]["volumes"]
        return next(v for v in volumes if "projected" in v)["projected"]["sources"]

    def more_workers(docs: list[dict[str, Any]]) -> None:
        job(docs, "rabo-worker")["spec"]["completions"] = 5
        job(docs, "rabo-worker")["spec"]["parallelism"] = 5

    found = broken(more_workers)
    assert any("the workers add up to 5" in p and "clients.count" in p and " is 4" in p
               for p in found), found
    assert any("5 completions need certificates" in p for p in found), found

    found = broken(lambda d: projected(d).pop())
    assert any("3 certificate Secrets for 4 workers" in p for p in found), found

    def same_secret_twice(docs: list[dict[str, Any]]) -> None:
        projected(docs)[1]["secret"]["name"] = "rabo-worker-0-tls"

    assert any("listed twice" in p for p in broken(same_secret_twice))

    def worker_sees_all_keys(docs: list[dict[str, Any]]) -> None:
        spec = job(docs, "rabo-worker")["spec"]["template"]["spec"]
        spec["containers"][0]["volumeMounts"].append(
            {"name": "worker-certificates", "mountPath": "/certs", "readOnly": True})

    assert any("mounts every worker's key" in p for p in broken(worker_sees_all_keys))

    def dial_elsewhere(docs: list[dict[str, Any]]) -> None:
        env = job(docs, "rabo-worker")["spec"]["template"]["spec"]["containers"][0]["env"]
        next(e for e in env if e["name"] == "COORDINATOR_SERVICE")["value"] = "elsewhere"

    assert any("no Service elsewhere" in p for p in broken(dial_elsewhere))

    def late_variable(docs: list[dict[str, Any]]) -> None:
        env = job(docs, "rabo-worker")["spec"]["template"]["spec"]["containers"][0]["env"]
        env.append(env.pop(next(i for i, e in enumerate(env)
                                if e["name"] == "COORDINATOR_SERVICE")))

    found = broken(late_variable)
    assert any("uses $(COORDINATOR_SERVICE), which is not set before it" in p
               for p in found), found

    def uneven(docs: list[dict[str, Any]]) -> None:
        job(docs, "rabo-worker")["spec"]["parallelism"] = 2

    assert any("parallelism 2 != completions 4" in p for p in broken(uneven))


def test_check_manifests_validates_custom_resources_against_their_crds() -> None:
    def first(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        return next(d for d in docs if d["kind"] == kind)

    jobset = copy.deepcopy(render("jobset"))
    first(jobset, "JobSet")["spec"]["successPolicy"]["operater"] = "All"  # a typo
    found = _problems(jobset)
    assert any("spec.successPolicy" in p and "'operater' was unexpected" in p
               and "jobset-v0.8.0" in p for p in found), found

    jobset = copy.deepcopy(render("jobset"))
    first(jobset, "JobSet")["spec"]["successPolicy"]["operator"] = "Most"
    assert any("'Most' is not one of ['All', 'Any']" in p for p in _problems(jobset))

    certs = copy.deepcopy(render_dir(K8S / "cert-manager"))
    cert = first(certs, "Certificate")
    cert["spec"]["dnsName"] = cert["spec"].pop("dnsNames")
    found = _problems(certs)
    assert any("'dnsName' was unexpected" in p and "cert-manager-v1.21.1" in p
               for p in found), found

    certs = copy.deepcopy(render_dir(K8S / "cert-manager"))
    first(certs, "Certificate")["spec"]["usages"] = ["server-auth"]
    assert any("'server-auth' is not one of" in p for p in _problems(certs))

    issuers = copy.deepcopy(render_dir(K8S / "cert-manager"))
    del first(issuers, "Certificate")["spec"]["issuerRef"]
    assert any("'issuerRef' is a required property" in p for p in _problems(issuers))

    unknown = [{"apiVersion": "example.com/v1", "kind": "Widget",
                "metadata": {"name": "w"}}]
    assert any("no schema for example.com/v1 Widget" in p for p in _problems(unknown))

    # a JobSet's Job templates go to kubernetes-validate as Jobs
    mod = checker()
    builtin, checked, problems = mod.split(render("torchrun"), mod.load_schemas())
    assert problems == [] and checked == ["JobSet rabo-dist (jobset-v0.12.0, jobset-v0.8.0)"]
    jobs = [d for d in builtin if d["kind"] == "Job"]
    assert [j["metadata"]["name"] for j in jobs] == ["rabo-dist-coordinator-0",
                                                     "rabo-dist-workers-0"]
    assert all(j["apiVersion"] == "batch/v1" and j["spec"]["template"]["spec"]["containers"]
               for j in jobs)


# --------------------------------------------------------------------------- env and docs


def _rabo_env_vars() -> set[str]:
    names: set[str] = set()
    for overlay in ALL_OVERLAYS:
        for pods in pod_sets(render(overlay)):
            names |= {n for n in env_of(pods.container()) if n.startswith("RABO_")}
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
    write_bundle(certs, workers=4)
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
        for name, value in kubelet_env(c).items():
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


@pytest.mark.slow
def test_job_pods_run_a_job_to_the_end_and_every_process_exits_0(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    """The rendered jobs overlay, run as processes: the coordinator Job's args, the Indexed
    worker Job's env for indexes 0..3 with each worker's certificate picked by the init
    container's script, the Secrets built by deploy/k8s/secrets from `rabo certs`. Nothing
    stops them: the coordinator exits 0 after the last round and so does every worker, which
    is what lets the Jobs complete. Only ports and root paths are moved; two rounds."""
    from rabo.certs import write_bundle

    mnist = _bundled_mnist()
    if mnist is None:
        pytest.skip("bundled MNIST test set (../shared/data/mnist) is absent")
    docs = render("jobs")
    coord, workers = batch_pods("jobs")
    certs = tmp_path / "certs"
    write_bundle(certs, workers=workers.count)
    files = tuple(sorted((p.name, p.read_bytes()) for p in certs.iterdir()))
    secrets = {s["metadata"]["name"]: s for s in _secrets_with(files)}
    grpc_port, health_port = free_port(), free_port()

    def pod_env(pods: PodSet, index: int) -> dict[str, str]:
        root = tmp_path / f"{pods.component}-{index}"
        volumes = {v["name"]: v for v in pods.spec["volumes"]}
        c = pods.container()
        for m in c["volumeMounts"]:  # Secret volumes, as the kubelet mounts them
            secret = volumes[m["name"]].get("secret")
            if secret:
                where = root / m["mountPath"].lstrip("/")
                where.mkdir(parents=True, exist_ok=True)
                for key, value in secrets[secret["secretName"]]["data"].items():
                    (where / key).write_bytes(base64.b64decode(value))
        if pods.spec.get("initContainers"):  # this worker's own certificate
            proc = _init_container_picks(pods, index, secrets, root)
            assert proc.returncode == 0, proc.stderr
        env = {"PATH": os.environ["PATH"], "GRPC_VERBOSITY": "ERROR"}
        for name, value in kubelet_env(c).items():
            if isinstance(value, dict):  # downward API
                field = value.get("fieldRef", {}).get("fieldPath")
                value = str(index) if field == INDEX_FIELD else \
                    f"pod-{index}" if field else "1"
            elif value.startswith("/var/run/rabo/"):
                value = str(root / value.lstrip("/"))
            elif name == "RABO_DATA_DIR":
                value = str(mnist)
            elif name == "RABO_COORDINATOR":
                env["RABO_TLS_SERVER_NAME"] = value.rsplit(":", 1)[0]
                value = f"127.0.0.1:{grpc_port}"
            elif name == "RABO_METRICS_PORT":
                value = "0"
            env[name] = value
        return env

    cfg_file = tmp_path / "config.yaml"
    job = yaml.safe_load(pod_config_text(docs))
    job["rounds"] = 2
    cfg_file.write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "state" / "run"
    args = [a.replace("/etc/rabo/config.yaml", str(cfg_file))
            .replace("/var/lib/rabo/run", str(run_dir))
            .replace("0.0.0.0:50051", f"127.0.0.1:{grpc_port}")
            .replace("50052", str(health_port)) for a in coord.container()["args"]]
    rabo = [sys.executable, "-m", "rabo.cli"]
    log = tmp_path / "coordinator.log"
    processes.append(subprocess.Popen([*rabo, *args], env=pod_env(coord, 0), cwd=tmp_path,
                                      stdout=log.open("w"), stderr=subprocess.STDOUT,
                                      text=True))
    worker_logs = []
    for i in range(workers.count):
        worker_logs.append(tmp_path / f"worker-{i}.log")
        processes.append(subprocess.Popen(
            [*rabo, *workers.container()["args"]], env=pod_env(workers, i), cwd=tmp_path,
            stdout=worker_logs[-1].open("w"), stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 300
    for p in processes:
        left = max(1.0, deadline - time.monotonic())
        try:
            code = p.wait(timeout=left)
        except subprocess.TimeoutExpired:
            pytest.fail("a pod's process did not exit on its own:\n" + log.read_text()[-3000:]
                        + "".join(w.read_text()[-1500:] for w in worker_logs))
        assert code == 0, log.read_text()[-3000:] + "".join(w.read_text()[-1500:]
                                                            for w in worker_logs)
    out = log.read_text()
    assert "TLS with client certificates" in out and "token required" in out, out[-3000:]
    assert "serving until stopped" not in out
    assert (run_dir / "summary.json").is_file()
    for i, w in enumerate(worker_logs):  # slot i for completion index i
        text = w.read_text()
        assert f", client {i}" in text and "run finished" in text, text[-2000:]


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


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_object_and_pod_carries_the_recommended_labels(overlay: str) -> None:
    from rabo import __version__

    want = {"app.kubernetes.io/name": "rabo", "app.kubernetes.io/instance": "rabo",
            "app.kubernetes.io/version": __version__, "app.kubernetes.io/part-of": "rabo",
            "app.kubernetes.io/managed-by": "kustomize"}
    docs = render(overlay)
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        assert want.items() <= labels.items(), (doc["kind"], doc["metadata"]["name"], labels)
        for r in doc.get("spec", {}).get("replicatedJobs", []):  # a JobSet's child Jobs
            assert want.items() <= r["template"]["metadata"]["labels"].items(), r["name"]
    for pods in pod_sets(docs):
        assert want.items() <= pods.labels.items(), (pods.owner, pods.labels)
    selectors = {"Deployment": ("selector", "matchLabels"), "Service": ("selector",),
                 "NetworkPolicy": ("podSelector", "matchLabels")}
    for doc in docs:
        if doc["kind"] not in selectors:
            continue  # Jobs select their pods by controller uid
        selector = doc["spec"]
        for key in selectors[doc["kind"]]:
            selector = selector[key]
        # the run (instance) is part of every selector, so two runs in one namespace keep to
        # their own pods; the version is not: a Deployment's selector cannot change in place
        assert selector.get("app.kubernetes.io/instance") == "rabo", (doc["kind"], selector)
        assert "app.kubernetes.io/version" not in selector
