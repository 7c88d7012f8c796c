#!/usr/bin/env python3
"""Check one rendered kustomization (``kubectl kustomize DIR``) beyond the API schemas.

    check_manifests.py RENDERED.yaml --builtin OUT.yaml

check.sh runs it on every kustomization under deploy/k8s, then runs kubernetes-validate on
OUT.yaml. It

* splits the objects: built-in kinds go to OUT.yaml for kubernetes-validate; custom ones
  (JobSet, cert-manager's Certificate and Issuer) are validated here against the schemas of
  their CustomResourceDefinitions vendored in schemas/ (every release kept there, strict:
  unknown fields fail, as ``kubectl apply`` with its default server-side field validation
  does). The Job templates inside a JobSet go to OUT.yaml as batch/v1 Jobs, so the pods get
  kubernetes-validate's full check. CEL rules (x-kubernetes-validations) are not evaluated.
  A kind with neither a built-in API group nor a vendored schema is an error;
* checks what a schema cannot:
  - the workers (Deployment replicas, Job completions, JobSet replicas x completions x
    torchrun ranks) add up to ``clients.count`` of the config the coordinator mounts, and a
    torch.distributed run has 1 + that many ranks in all;
  - every worker of an Indexed Job has its own certificate: its projected volume has one
    distinct Secret per completion index, each under worker-<i>/;
  - ``RABO_COORDINATOR``, expanded as the kubelet does, names a Service of the render and
    its gRPC port; every ``$(VAR)`` in env, command and args names a variable set before it.

Needs PyYAML and jsonschema (both come with kubernetes-validate); prints one line per check
and exits 1 on the first file with a problem, listing every problem found in it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

HERE = Path(__file__).resolve().parent
SCHEMAS = HERE / "schemas"
# API groups kubernetes-validate has schemas for (what these manifests may use of them)
BUILTIN_GROUPS = {"", "apps", "batch", "networking.k8s.io", "policy", "autoscaling",
                  "rbac.authorization.k8s.io", "scheduling.k8s.io", "storage.k8s.io"}
CONFIG_PATH = "/etc/rabo"  # where the coordinator reads --config /etc/rabo/config.yaml
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
Doc = dict[str, Any]


# --------------------------------------------------------------------------- schemas


def strict(schema: Any) -> Any:
    """An OpenAPI v3 schema of a CRD as JSON Schema that rejects unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "additionalProperties", "not") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def load_schemas(folder: Path = SCHEMAS) -> dict[tuple[str, str], list[tuple[str, Any]]]:
    """(apiVersion, kind) -> [(release, validator)] for every vendored schema file."""
    found: dict[tuple[str, str], list[tuple[str, Any]]] = {}
    for path in sorted(folder.glob("*/*.json")):
        doc = json.loads(path.read_text())
        for api_version, schema in doc["versions"].items():
            validator = jsonschema.Draft7Validator(strict(schema))
            found.setdefault((api_version, doc["kind"]), []).append((doc["release"], validator))
    return found


def group_of(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def describe(doc: Doc) -> str:
    return f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"


def jobset_jobs(doc: Doc) -> Iterator[Doc]:
    """A JobSet's Job templates as the batch/v1 Jobs the controller would create."""
    meta = doc.get("metadata", {})
    for rjob in doc.get("spec", {}).get("replicatedJobs", []):
        template = rjob.get("template", {})
        job_meta = dict(template.get("metadata", {}))
        job_meta["name"] = f"{meta.get('name')}-{rjob.get('name')}-0"
        if "namespace" in meta:
            job_meta["namespace"] = meta["namespace"]
        yield {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta,
               "spec": template.get("spec", {})}


def split(docs: list[Doc], schemas: dict[tuple[str, str], list[tuple[str, Any]]]
          ) -> tuple[list[Doc], list[str], list[str]]:
    """(objects for kubernetes-validate, what was validated here, problems)."""
    builtin: list[Doc] = []
    checked: list[str] = []
    problems: list[str] = []
    for doc in docs:
        api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        key = (api_version, kind)
        if key in schemas:
            for release, validator in schemas[key]:
                errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
                for e in errors:
                    where = ".".join(str(p) for p in e.path) or "(top)"
                    problems.append(f"{describe(doc)}: {where}: {e.message} "
                                    f"(schema of {release})")
            meta_keys = set(doc.get("metadata", {})) - {"name", "namespace", "labels",
                                                         "annotations"}
            if meta_keys or not doc.get("metadata", {}).get("name"):
                problems.append(f"{describe(doc)}: metadata needs a name and may hold only "
                                f"namespace, labels, annotations (has {sorted(meta_keys)})")
            checked.append(f"{kind} {doc['metadata'].get('name')} "
                           f"({', '.join(r for r, _ in schemas[key])})")
            if kind == "JobSet":
                builtin.extend(jobset_jobs(doc))
        elif group_of(api_version) in BUILTIN_GROUPS:
            builtin.append(doc)
        else:
            problems.append(f"{describe(doc)}: no schema for {api_version} {kind}: vendor its "
                            "CustomResourceDefinition with deploy/k8s/schemas/vendor.py")
    return builtin, checked, problems


# --------------------------------------------------------------------------- pods


class Pods:
    """One pod template of a workload and how many pods run from it."""

    def __init__(self, owner: str, template: Doc, count: int, job: Doc | None) -> None:
        self.owner, self.template, self.count, self.job = owner, template, count, job

    @property
    def labels(self) -> dict[str, str]:
        return self.template.get("metadata", {}).get("labels", {})

    @property
    def spec(self) -> Doc:
        return self.template.get("spec", {})

    @property
    def component(self) -> str | None:
        return self.labels.get("app.kubernetes.io/component")


def pod_templates(docs: list[Doc]) -> Iterator[Pods]:
    for doc in docs:
        kind, spec = doc.get("kind"), doc.get("spec", {})
        if kind == "Deployment":
            yield Pods(describe(doc), spec.get("template", {}), int(spec.get("replicas", 1)),
                       None)
        elif kind == "Job":
            yield Pods(describe(doc), spec.get("template", {}), _job_pods(spec), spec)
        elif kind == "JobSet":
            for rjob in spec.get("replicatedJobs", []):
                job = rjob.get("template", {}).get("spec", {})
                yield Pods(f"{describe(doc)} replicatedJob {rjob.get('name')}",
                           job.get("template", {}),
                           int(rjob.get("replicas", 1)) * _job_pods(job), job)


def _job_pods(job: Doc) -> int:
    return int(job.get("completions", job.get("parallelism", 1)))


def torchrun_flags(container: Doc) -> dict[str, str] | None:
    """``--flag=value`` arguments of a container that runs torchrun, else None."""
    words = [*container.get("command", []), *container.get("args", [])]
    if not any("torchrun" in w for w in words):
        return None
    flags: dict[str, str] = {}
    for w in words:
        m = re.match(r"--([a-z-]+)=(.*)", w)
        if m:
            flags[m.group(1).replace("_", "-")] = m.group(2)
    return flags


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: $$ is a $, an unknown $(VAR) stays as it is."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  text)


def container_env(container: Doc) -> tuple[dict[str, str], list[str]]:
    """The container's literal env values, expanded in order; and references to variables
    not set before them (the kubelet leaves those unexpanded)."""
    env: dict[str, str] = {}
    unresolved: list[str] = []
    for var in container.get("env", []):
        value = var.get("value")
        if value is None:
            env[var["name"]] = f"<{var['name']} from {next(iter(var.get('valueFrom', {})), '?')}>"
            continue
        for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", value):
            if ref not in env:
                unresolved.append(f"{var['name']} uses $({ref}), which is not set before it")
        env[var["name"]] = expand(value, env)
    for word in [*container.get("command", []), *container.get("args", [])]:
        for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", word):
            if ref not in env:
                unresolved.append(f"{word!r} uses $({ref}), which the container does not set")
    return env, unresolved


# --------------------------------------------------------------------------- checks


def job_config(docs: list[Doc]) -> tuple[str, Doc] | None:
    """(ConfigMap name, parsed config.yaml) the coordinator mounts at /etc/rabo, if any."""
    for pods in pod_templates(docs):
        if pods.component != "coordinator":
            continue
        volumes = {v["name"]: v for v in pods.spec.get("volumes", [])}
        for c in pods.spec.get("containers", []):
            for m in c.get("volumeMounts", []):
                cm = volumes.get(m["name"], {}).get("configMap")
                if m["mountPath"] == CONFIG_PATH and cm:
                    for doc in docs:
                        if doc.get("kind") == "ConfigMap" and \
                                doc["metadata"]["name"] == cm["name"]:
                            return cm["name"], yaml.safe_load(doc["data"]["config.yaml"])
                    raise LookupError(f"{pods.owner} mounts ConfigMap {cm['name']}, which "
                                      "the render does not have")
    return None


def check_worker_count(docs: list[Doc]) -> tuple[list[str], list[str]]:
    """(report lines, problems): the workers add up to clients.count. Under torchrun each
    pod is one node of --nproc-per-node ranks, rank 0 coordinates and every other rank is a
    worker, whatever its pod."""
    try:
        found = job_config(docs)
    except LookupError as exc:
        return [], [str(exc)]
    all_pods = list(pod_templates(docs))
    workers = [p for p in all_pods if p.component == "worker"]
    if found is None:
        return ([], [f"{workers[0].owner}: workers but no coordinator config"]
                if workers else [])
    name, cfg = found
    count = int((cfg.get("clients") or {}).get("count", 0))
    problems: list[str] = []
    for pods in all_pods:
        job = pods.job
        if job is not None and "parallelism" in job and \
                job.get("parallelism") != job.get("completions"):
            problems.append(f"{pods.owner}: parallelism {job.get('parallelism')} != "
                            f"completions {job.get('completions')}: every worker must run at "
                            "once")
    launched = [(p, torchrun_flags(p.spec.get("containers", [{}])[0])) for p in all_pods]
    torchrun = [(p, f) for p, f in launched if f is not None]
    if torchrun:
        worlds = {int(f.get("nnodes", 0)) * int(f.get("nproc-per-node", 1))
                  for _, f in torchrun}
        ranks = sum(p.count * int(f.get("nproc-per-node", 1)) for p, f in torchrun)
        if worlds != {ranks}:
            problems.append(f"torchrun --nnodes x --nproc-per-node gives {sorted(worlds)} "
                            f"ranks, but the pods that run it start {ranks}")
        if any(f is None for _, f in launched):
            problems.append("some pods of a torch.distributed run do not run torchrun")
        total, parts = ranks - 1, [f"{ranks} ranks - rank 0"]
    else:
        total = sum(p.count for p in workers)
        parts = [f"{p.count} ({p.owner})" for p in workers]
    if total != count:
        problems.append(f"the workers add up to {total} ({' + '.join(parts) or 'none'}) but "
                        f"clients.count in ConfigMap {name} is {count}: one worker per data "
                        "partition")
    return [f"workers {' + '.join(parts)} = {total}, clients.count {count}"], problems


def check_worker_certificates(docs: list[Doc]) -> tuple[list[str], list[str]]:
    """Every worker of an Indexed Job has a certificate Secret of its own."""
    report: list[str] = []
    problems: list[str] = []
    for pods in pod_templates(docs):
        if pods.component != "worker" or pods.job is None:
            continue
        projected = [v for v in pods.spec.get("volumes", []) if "projected" in v]
        if not projected:
            continue  # a torch.distributed worker: no certificates
        owner = pods.owner
        if pods.job.get("completionMode") != "Indexed":
            problems.append(f"{owner}: per-worker certificates need completionMode Indexed")
            continue
        completions = int(pods.job.get("completions", 0))
        secrets: list[str] = []
        paths: dict[str, set[str]] = {}
        for volume in projected:
            for source in volume["projected"].get("sources", []):
                secret = source.get("secret")
                if not secret:
                    continue
                secrets.append(secret["name"])
                for item in secret.get("items", []):
                    folder, _, key = item["path"].partition("/")
                    paths.setdefault(folder, set()).add(key)
                    if key != item["key"]:
                        problems.append(f"{owner}: {secret['name']} key {item['key']} lands "
                                        f"as {item['path']}")
        if len(set(secrets)) != len(secrets):
            problems.append(f"{owner}: a certificate Secret is listed twice: {secrets}")
        want = {f"worker-{i}" for i in range(completions)}
        if set(paths) != want:
            problems.append(f"{owner}: {completions} completions need certificates "
                            f"{sorted(want)}, the projected volume has {sorted(paths)}")
        for folder, keys in paths.items():
            if keys != {"ca.crt", "tls.crt", "tls.key"}:
                problems.append(f"{owner}: {folder}/ holds {sorted(keys)}, not ca.crt, "
                                "tls.crt, tls.key")
        if len(secrets) != completions:
            problems.append(f"{owner}: {len(secrets)} certificate Secrets for {completions} "
                            "workers")
        env_of_init = [e for c in pods.spec.get("initContainers", [])
                       for e in c.get("env", [])
                       if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                       == INDEX_ANNOTATION]
        if not env_of_init:
            problems.append(f"{owner}: no init container reads the completion index")
        for c in pods.spec.get("containers", []):
            for m in c.get("volumeMounts", []):
                if m["name"] in {v["name"] for v in projected}:
                    problems.append(f"{owner}: container {c['name']} mounts every worker's "
                                    f"key ({m['name']}); only the init container may")
        report.append(f"{owner}: {len(secrets)} workers, {len(set(secrets))} certificate "
                      "Secrets")
    return report, problems


def check_references(docs: list[Doc]) -> tuple[list[str], list[str]]:
    """RABO_COORDINATOR names a Service and its port; $(VAR) references resolve."""
    services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
    report: list[str] = []
    problems: list[str] = []
    for pods in pod_templates(docs):
        for c in [*pods.spec.get("initContainers", []), *pods.spec.get("containers", [])]:
            env, unresolved = container_env(c)
            problems += [f"{pods.owner} container {c['name']}: {u}" for u in unresolved]
            target = env.get("RABO_COORDINATOR")
            if target is None:
                continue
            host, _, port = target.rpartition(":")
            svc = services.get(host)
            if svc is None:
                problems.append(f"{pods.owner}: RABO_COORDINATOR is {target}, but there is no "
                                f"Service {host} (Services: {sorted(services)})")
                continue
            ports = {str(p["port"]) for p in svc["spec"].get("ports", [])}
            if port not in ports:
                problems.append(f"{pods.owner}: RABO_COORDINATOR port {port} is not a port of "
                                f"Service {host} ({sorted(ports)})")
            report.append(f"{pods.owner} dials {target}")
    return sorted(set(report)), problems


def problems_and_report(docs: list[Doc]) -> tuple[list[str], list[str]]:
    report: list[str] = []
    problems: list[str] = []
    for check in (check_worker_count, check_worker_certificates, check_references):
        lines, found = check(docs)
        report += lines
        problems += found
    return report, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rendered", type=Path, help="output of kubectl kustomize")
    p.add_argument("--builtin", type=Path, required=True,
                   help="write the objects for kubernetes-validate here")
    args = p.parse_args(argv)
    docs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
    builtin, checked, problems = split(docs, load_schemas())
    report, found = problems_and_report(docs)
    problems += found
    args.builtin.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    for line in [*(f"schema: {c}" for c in checked), *report]:
        print(f"    {line}")
    for line in problems:
        print(f"check_manifests.py: {args.rendered.name}: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
