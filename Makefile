# residency — see README.md. `make demo` runs the main job, `make test` runs every test tier.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
BIN := $(shell hack/build-binaries.sh path)
export PATH := $(CURDIR)/$(VENV)/bin:$(BIN):$(PATH)
export KUBECONFIG ?= $(CURDIR)/.cluster/kubeconfig
export MYPYPATH := src:operator:worker

.PHONY: all venv binaries crds cluster cluster-down lint docs docs-serve unit component e2e test reliability report scale demo demo-down clean help

help: ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

venv: $(STAMP) ## create .venv with the pinned Python dependencies

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

binaries: ## build etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm (cached)
	hack/build-binaries.sh all >/dev/null

crds: venv ## regenerate crds/ (and the chart's copy) from the pydantic models
	$(VENV)/bin/residency crds --out crds
	cp crds/*.yaml charts/residency/files/crds/

cluster: binaries ## start the local real control plane (idempotent)
	@hack/cluster.sh up

cluster-down: ## stop the local control plane and everything the demo started
	-@hack/demo.sh down
	@hack/cluster.sh down

lint: venv ## ruff, mypy --strict, import-linter
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

docs: venv ## build the documentation site into site/ (MkDocs Material, strict: a broken link fails)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: venv ## serve the documentation at http://127.0.0.1:8001, rebuilt on save
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8001

unit: venv ## fast tests of the pure core
	$(PY) -m pytest -q tests/unit

component: venv ## one process, tiny real models
	$(PY) -m pytest -q tests/component

e2e: venv binaries ## against the real control plane (starts it if needed)
	hack/cluster.sh up >/dev/null
	$(PY) -m pytest -q e2e

test: venv binaries lint docs ## everything CI runs
	$(PY) -m pytest -q tests
	hack/cluster.sh up >/dev/null
	$(PY) -m pytest -q e2e

reliability: venv binaries ## the whole reliability suite (faults, bad input, load, security) and its table
	hack/cluster.sh up >/dev/null
	rm -f reports/reliability-*.json
	@# both halves run and the table is printed either way; any failed test fails the target
	status=0; \
	RESIDENCY_RELIABILITY_JSON=reports/reliability-tests.json $(PY) -m pytest -q -m reliability --reliability-full tests || status=1; \
	RESIDENCY_RELIABILITY_JSON=reports/reliability-e2e.json $(PY) -m pytest -q -m reliability --reliability-full e2e || status=1; \
	echo; echo "== reliability suite =="; \
	$(PY) -m residency.reliability reports/reliability-tests.json reports/reliability-e2e.json || status=1; \
	if [ $$status -ne 0 ]; then echo "reliability: some tests failed (see above)" >&2; fi; \
	exit $$status

report: venv ## the GPU performance report into reports/<gpu>/ (a reduced CPU grid, marked emulated, without a GPU)
	$(VENV)/bin/residency report $(or $(REPORT_ARGS),$(shell $(PY) -c "import torch; print('' if torch.cuda.is_available() else '--quick')"))

scale: venv binaries ## fleet scale on a real control plane: hollow nodes, the operator, waves of models (SCALE_ARGS)
	$(PY) benchmarks/bench_scale.py $(or $(SCALE_ARGS),--nodes 100 --models 1000)

demo: venv binaries ## local control plane + operator + an example model, then `kubectl get llm`
	hack/demo.sh up

demo-down: ## stop the demo's processes (keeps the control plane)
	hack/demo.sh down

clean: cluster-down ## remove the venv and generated files (keeps the binary cache)
	rm -rf $(VENV) .demo site .pytest_cache .mypy_cache .ruff_cache
