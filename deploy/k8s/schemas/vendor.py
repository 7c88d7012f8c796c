#!/usr/bin/env python3
"""Vendor the schema of a custom resource for deploy/k8s/check_manifests.py.

kubernetes-validate knows the built-in kinds only; the JobSet and cert-manager objects in
deploy/k8s are checked against the openAPIV3Schema of their CustomResourceDefinition, as
the API server would check them, kept here one JSON file per kind and release:

    url=https://github.com/kubernetes-sigs/jobset/blob/v0.8.0/config/components/crd/bases
    curl -L -o jobsets.yaml "$url/jobset.x-k8s.io_jobsets.yaml?raw=true"
    python deploy/k8s/schemas/vendor.py jobsets.yaml --release jobset-v0.8.0 \\
        --source "$url/jobset.x-k8s.io_jobsets.yaml" --cut 'spec.replicatedJobs[].template'

writes deploy/k8s/schemas/jobset-v0.8.0/jobset.json: each served version's schema without
its descriptions (they are most of the bytes and none of the checking), and with every
``--cut`` subtree replaced by "any object" (check_manifests.py validates JobSet Job templates
as batch/v1 Jobs with kubernetes-validate instead, against the Kubernetes release's own
schemas). Needs PyYAML; downloads nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def cut(schema: dict[str, Any], path: str) -> None:
    """Replace the subtree at ``path`` (dotted property names; ``name[]`` for a list's
    items) by an object schema that accepts anything."""
    node = schema
    parts = path.split(".")
    for i, part in enumerate(parts):
        is_list = part.endswith("[]")
        name = part[:-2] if is_list else part
        props = node.get("properties", {})
        if name not in props:
            raise SystemExit(f"vendor.py: --cut {path}: no property {name!r} "
                             f"(has {sorted(props)})")
        if i == len(parts) - 1 and not is_list:
            props[name] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            return
        node = props[name]["items"] if is_list else props[name]
    raise SystemExit(f"vendor.py: --cut {path}: must end at a property")


def vendor(crd: dict[str, Any], release: str, source: str, cuts: list[str]) -> Path:
    if crd.get("kind") != "CustomResourceDefinition":
        raise SystemExit(f"vendor.py: not a CustomResourceDefinition: {crd.get('kind')}")
    spec = crd["spec"]
    kind = spec["names"]["kind"]
    versions = {}
    for version in spec["versions"]:
        if not version.get("served", False):
            continue
        schema = without_descriptions(version["schema"]["openAPIV3Schema"])
        for path in cuts:
            cut(schema, path)
        versions[f"{spec['group']}/{version['name']}"] = schema
    if not versions:
        raise SystemExit(f"vendor.py: {kind}: no served version")
    out = HERE / release / f"{kind.lower()}.json"
    out.parent.mkdir(exist_ok=True)
    doc = {"kind": kind, "release": release, "source": source,
           "cut": {p: "validated as a batch/v1 Job by kubernetes-validate" for p in cuts},
           "versions": versions}
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("crd", type=Path, help="a CustomResourceDefinition YAML file")
    p.add_argument("--release", required=True, help="folder name, e.g. jobset-v0.8.0")
    p.add_argument("--source", required=True, help="where the file came from (recorded)")
    p.add_argument("--cut", action="append", default=[], metavar="PATH",
                   help="a subtree validated elsewhere, e.g. spec.replicatedJobs[].template")
    args = p.parse_args(argv)
    out = vendor(yaml.safe_load(args.crd.read_text()), args.release, args.source, args.cut)
    print(f"wrote {out.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
