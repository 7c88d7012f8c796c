#!/usr/bin/env bash
# Render every kustomization under deploy/k8s and validate the result against the Kubernetes
# API schemas (strict: unknown fields fail). No cluster needed. Exits non-zero on the first
# failure and says which kustomization failed.
#
#   deploy/k8s/check.sh                       # from any directory
#   K8S_VERSIONS="1.31.0" deploy/k8s/check.sh # other schema versions
#
# Needs kubectl (its built-in kustomize; kustomize v5, kubectl >= 1.27) and kubernetes-validate
# (PyPI; `make install` puts it in .venv). It installs nothing: a missing tool is an error that
# says how to get it.
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

find_kubectl
find_validator

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# deploy/k8s/secrets builds from the files `rabo certs` writes; validate its generator against
# placeholder files in a copy, never against real keys that may sit in certs/.
mkdir -p "$TMP/secrets/certs"
cp "$K8S/secrets/kustomization.yaml" "$TMP/secrets/"
for f in token ca.crt coordinator.crt coordinator.key worker-0.crt worker-0.key; do
    echo "placeholder" > "$TMP/secrets/certs/$f"
done

targets=()
for dir in "$K8S"/overlays/*/; do
    targets+=("${dir%/}")
done
targets+=("$K8S/data" "$TMP/secrets")
[ "${#targets[@]}" -ge 5 ] || fail "expected the overlays cpu, gpu, heterogeneous under $K8S/overlays"

for target in "${targets[@]}"; do
    name=${target#"$TMP/"}
    out="$TMP/$(echo "$name" | tr '/' '_').yaml"
    if ! kubectl kustomize "$target" > "$out" 2> "$out.err"; then
        cat "$out.err" >&2
        fail "$name: kubectl kustomize failed (error above; these manifests need kustomize v5, kubectl >= 1.27)"
    fi
    [ -s "$out" ] || fail "$name: rendered nothing"
    for version in $K8S_VERSIONS; do
        if ! "$VALIDATE" --strict --quiet -k "$version" "$out" >&2; then
            fail "$name: does not validate against Kubernetes $version"
        fi
    done
    count=$(grep -c '^kind:' "$out" || true)
    echo "ok  $name: $count resources valid for Kubernetes ${K8S_VERSIONS// /, }"
done
