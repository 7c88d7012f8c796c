#!/usr/bin/env bash
# Render every kustomization under deploy/k8s and validate the result, with no cluster:
#   * built-in kinds against the Kubernetes API schemas (kubernetes-validate, strict: unknown
#     fields fail), for the oldest and the newest Kubernetes we support;
#   * JobSets and cert-manager's Certificates and Issuers against the schemas of their
#     CustomResourceDefinitions vendored in deploy/k8s/schemas (also strict), and the Job
#     templates inside a JobSet as batch/v1 Jobs with kubernetes-validate;
#   * what no schema says (check_manifests.py): the workers add up to clients.count in the
#     config the coordinator mounts, each worker of an Indexed Job mounts its own certificate
#     Secret, and RABO_COORDINATOR names the coordinator's Service.
# Exits non-zero on the first failure and says which kustomization failed.
#
#   deploy/k8s/check.sh                       # from any directory
#   K8S_VERSIONS="1.31.0" deploy/k8s/check.sh # other schema versions
#
# Needs kubectl (its built-in kustomize; kustomize v5, kubectl >= 1.27) and kubernetes-validate
# (PyPI; `make install` puts it in .venv), whose Python also runs check_manifests.py. It
# installs nothing: a missing tool is an error that says how to get it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."       # the repository root
ROOT=$PWD
K8S=deploy/k8s
# The oldest version we support (native gRPC probes are GA since 1.27) and the newest schemas
# kubernetes-validate ships.
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}

fail() { echo "check.sh: FAIL: $*" >&2; exit 1; }

find_kubectl() {
    command -v kubectl >/dev/null 2>&1 \
        || fail "kubectl is missing: install kubectl >= 1.27" \
                "(https://kubernetes.io/docs/tasks/tools/; e.g. apt-get install kubectl) and rerun"
}

find_validator() {
    for v in "${KUBERNETES_VALIDATE:-}" "$ROOT/.venv/bin/kubernetes-validate" \
             "$(command -v kubernetes-validate || true)"; do
        if [ -n "$v" ] && [ -x "$v" ]; then VALIDATE=$v; return 0; fi
    done
    fail "kubernetes-validate is missing: make install (the dev extra has it), or" \
         "pip install kubernetes-validate, or point KUBERNETES_VALIDATE at one"
}

find_python() {
    # check_manifests.py needs PyYAML and jsonschema, which kubernetes-validate depends on:
    # the interpreter it runs on has both.
    local shebang first rest candidate
    shebang=$(head -n 1 "$VALIDATE" 2>/dev/null || true)
    read -r first rest <<< "${shebang#\#!}" || true
    if [ "${first##*/}" = env ]; then first=$(command -v "${rest%% *}" || true); fi
    for candidate in "${CHECK_PYTHON:-}" "$first" "$ROOT/.venv/bin/python" \
                     "$(command -v python3 || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] \
                && "$candidate" -c 'import yaml, jsonschema' 2>/dev/null; then
            PY=$candidate
            return 0
        fi
    done
    fail "no Python with PyYAML and jsonschema for check_manifests.py: make install, or" \
         "pip install kubernetes-validate, or point CHECK_PYTHON at one"
}

find_kubectl
find_validator
find_python

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# deploy/k8s/secrets builds from the files `rabo certs` writes; validate its generator against
# placeholder files in a copy, never against real keys that may sit in certs/.
mkdir -p "$TMP/secrets/certs"
cp "$K8S/secrets/kustomization.yaml" "$TMP/secrets/"
for f in token ca.crt coordinator.crt coordinator.key worker-{0,1,2,3}.{crt,key}; do
    echo "placeholder" > "$TMP/secrets/certs/$f"
done

targets=()
for dir in "$K8S"/overlays/*/; do
    targets+=("${dir%/}")
done
targets+=("$K8S/data" "$TMP/secrets" "$K8S/cert-manager" "$K8S/cert-manager/ca")
[ "${#targets[@]}" -ge 10 ] || fail "expected the overlays cpu, gpu, heterogeneous, jobs, jobset," \
                                    "torchrun under $K8S/overlays"

for target in "${targets[@]}"; do
    name=${target#"$TMP/"}
    out="$TMP/$(echo "$name" | tr '/' '_').yaml"
    if ! kubectl kustomize "$target" > "$out" 2> "$out.err"; then
        cat "$out.err" >&2
        fail "$name: kubectl kustomize failed (error above; these manifests need kustomize v5, kubectl >= 1.27)"
    fi
    [ -s "$out" ] || fail "$name: rendered nothing"
    if ! "$PY" "$K8S/check_manifests.py" "$out" --builtin "$out.builtin" > "$out.report"; then
        fail "$name: check_manifests.py found problems (above)"
    fi
    for version in $K8S_VERSIONS; do
        if ! "$VALIDATE" --strict --quiet -k "$version" "$out.builtin" >&2; then
            fail "$name: does not validate against Kubernetes $version"
        fi
    done
    count=$(grep -c '^kind:' "$out" || true)
    builtin=$(grep -c '^kind:' "$out.builtin" || true)
    custom=$(grep -c '^    schema: ' "$out.report" || true)
    # (the built-in count includes the Job templates of JobSets, validated as Jobs)
    echo "ok  $name: $count objects valid (Kubernetes ${K8S_VERSIONS// /, }: $builtin;" \
         "vendored CRD schemas: $custom)"
    cat "$out.report"
done
