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
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed

.PHONY: install test test-fast demo lint typecheck bench proto k8s-check clean

install: $(STAMP)

# Reinstall when the project's dependency list changes; otherwise this is a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: install
	$(BIN)/rabo local --config configs/default.yaml --workers 4 --out $(OUT)

lint: install
	$(BIN)/ruff check rabo coordinator worker tests
	$(BIN)/mypy

bench: install
	$(BIN)/rabo bench estimator
	$(BIN)/rabo bench transport

# Regenerate the wire modules from proto/ (tests/test_proto.py fails when they are stale).
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. \
		proto/rabo_proto/v1/rabo.proto

# Render every kustomize overlay and validate it against the Kubernetes schemas.
k8s-check: install
	deploy/k8s/check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
