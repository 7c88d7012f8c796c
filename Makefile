# RABO: every target installs what it needs first (idempotent), so a fresh clone needs only
#   make demo    - the main job (see README.md)
#   make test    - the test suite
#
# GPU users: make install TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
OUT         ?= runs/demo
PYTEST_ARGS ?=
FULL        ?=
BENCH_FLAG  := $(if $(FULL),--full,)
RESULTS     := docs/results
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed

.PHONY: install test test-fast demo lint typecheck bench ablations proto k8s-check clean

install: $(STAMP)

# Reinstall when the project's dependency list or its pins change; otherwise this is a no-op.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: install
	$(BIN)/rabo local --config configs/default.yaml --workers 4 --out $(OUT) --overwrite

lint: install
	$(BIN)/ruff check rabo coordinator worker bench tests
	$(BIN)/mypy

# The reduced suite (at most 40 minutes on 2 cores: the experiments compare methods at
# convergence, 300 rounds x 3 seeds) regenerates docs/RESULTS.md and docs/results/; FULL=1
# runs the whole grids (many hours). Finished simulations are kept in runs/experiment-store
# (keyed by config and source hash): an interrupted make bench resumes where it stopped.
bench: install
	mkdir -p $(RESULTS)
	$(BIN)/rabo bench estimator --json > $(RESULTS)/bench_estimator.json.tmp && mv $(RESULTS)/bench_estimator.json.tmp $(RESULTS)/bench_estimator.json
	$(BIN)/rabo bench transport --json > $(RESULTS)/bench_transport.json.tmp && mv $(RESULTS)/bench_transport.json.tmp $(RESULTS)/bench_transport.json
	$(BIN)/rabo experiment claims $(BENCH_FLAG)
	$(BIN)/rabo experiment estimators $(BENCH_FLAG)
	$(BIN)/rabo experiment coverage $(BENCH_FLAG)
	$(BIN)/rabo experiment communication $(BENCH_FLAG)
	$(BIN)/rabo bench system $(BENCH_FLAG)
	@# the ratio policy's memory estimate against real workers (docs/RESULTS.md section 5d)
	$(BIN)/rabo bench policy --out $(RESULTS)/bench_policy.json.tmp && mv $(RESULTS)/bench_policy.json.tmp $(RESULTS)/bench_policy.json
	@# links as a resource (needs root and network namespaces; skipped where they cannot be made)
	if $(BIN)/rabo bench network --policy link --bandwidths 100,20,5,1 --rounds 6 --deadline 2 \
		--json > $(RESULTS)/bench_network_link.json.tmp; then \
		mv $(RESULTS)/bench_network_link.json.tmp $(RESULTS)/bench_network_link.json; \
	else rm -f $(RESULTS)/bench_network_link.json.tmp; echo "bench network: skipped"; fi
	@# compressed slices on a 10 Mbit/s link (the same; docs/RESULTS.md section 8)
	for d in float32 int8; do \
		if $(BIN)/rabo bench network --bandwidths 10 --rounds 3 --set wire.dtype=$$d \
			--json > $(RESULTS)/bench_network_wire_$$d.json.tmp; then \
			mv $(RESULTS)/bench_network_wire_$$d.json.tmp $(RESULTS)/bench_network_wire_$$d.json; \
		else rm -f $(RESULTS)/bench_network_wire_$$d.json.tmp; echo "bench network: skipped"; fi; \
	done
	$(BIN)/rabo experiment report

# What make bench leaves out to stay within its budget (about 60 minutes on 2 cores): the
# mask, scaler and weighting ablations, the robustness and wire experiments; RESULTS.md gains
# their sections. RABO's own runs come from the store when make bench ran on the same code.
ablations: install
	mkdir -p $(RESULTS)
	$(BIN)/rabo experiment ablations $(BENCH_FLAG)
	$(BIN)/rabo experiment robust $(BENCH_FLAG)
	$(BIN)/rabo experiment wire $(BENCH_FLAG)
	$(BIN)/rabo experiment report

# Regenerate the wire modules from proto/ (tests/test_proto.py fails when they are stale).
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. \
		proto/rabo_proto/v1/rabo.proto

# Render every kustomization under deploy/k8s and validate it (Kubernetes and vendored CRD
# schemas, worker totals, per-worker certificates; no cluster). It installs nothing beyond
# make install's .venv, and runs check.sh with the validator and Python from there.
k8s-check: install
	KUBERNETES_VALIDATE=$(BIN)/kubernetes-validate CHECK_PYTHON=$(BIN)/python deploy/k8s/check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
