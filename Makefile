# servekit: turn bare GPU servers into verified vLLM endpoints.
# `make help` lists the targets. Everything runs from this directory.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# SANDBOX_HOSTS=N (N > 1): a sandbox fleet, N hosts behind a gateway on localhost:8080,
# with the inventory that `servekit sandbox up --gateway` writes.
SANDBOX_HOSTS ?= 1
SANDBOX_FLEET := $(filter-out 0 1,$(SANDBOX_HOSTS))
ifeq ($(SANDBOX_FLEET),)
INVENTORY ?= inventory/sandbox/hosts.yml
else
INVENTORY ?= .sandbox/inventory/hosts.yml
endif
ANSIBLE_ARGS ?=
PYTEST_ARGS ?=
# Hosts updated at once by `make roll`: a number or a share ("25%").
ROLL_BATCH ?= 1
# Hosts `make deploy` may restart at once on a fleet: a number or a share ("25%"). Unset: 1
# behind a gateway; without one, every host at once unless it is set.
MAX_UNAVAILABLE ?=
# DEEP=1: `make verify` also hashes every model file against its manifest's SHA-256.
DEEP ?=
VENV := .venv
PY := $(VENV)/bin/python
IS_SANDBOX := $(filter inventory/sandbox/% .sandbox/inventory/%,$(INVENTORY))
# The sandbox hosts reach the sandbox registry as servekit-control:5000; this machine at 127.0.0.1.
IMAGES_ARGS := --inventory $(INVENTORY) $(if $(IS_SANDBOX),--registry-alias servekit-control:5000=127.0.0.1:5000)

export ANSIBLE_CONFIG := $(CURDIR)/ansible/ansible.cfg
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONUNBUFFERED := 1
# `make test` writes each phase's wall time here (tests/conftest.py, scripts/phase).
PHASES := reports/phases.tsv
test: export SERVEKIT_PHASES := $(CURDIR)/$(PHASES)
# Every test's outcome and time (JUnit) and the slowest ones at the end of the output.
TEST_REPORT_ARGS := --junitxml=reports/test.junit.xml --durations=25 --durations-min=5

.PHONY: help venv host-tools sandbox deploy lock-images engine-facts record-fixtures roll verify probe test test-unit test-e2e test-faults test-fleet lint destroy clean

help: ## Show this list
	@echo "servekit: make TARGET [INVENTORY=inventory/<site>/hosts.yml]"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: requirements.txt pyproject.toml
	@echo "==> creating the pinned Python environment in $(VENV)"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

venv: $(VENV)/.installed ## Create the pinned Python environment (.venv)

host-tools: ## Install what this machine needs (Docker engine, debootstrap, ssh) if missing
	@sh scripts/ensure-host-tools.sh

sandbox: venv host-tools ## Bring up the local sandbox host, registry and model mirror [SANDBOX_HOSTS=3: a fleet]
	$(PY) -m servekit sandbox up --hosts $(SANDBOX_HOSTS) $(if $(SANDBOX_FLEET),--gateway)

deploy: venv ## Converge INVENTORY (default: the local sandbox, brought up first); on a fleet vLLM restarts a batch at a time [MAX_UNAVAILABLE=1]
ifneq ($(IS_SANDBOX),)
	@$(MAKE) --no-print-directory sandbox
endif
	@$(PY) -m servekit images check $(IMAGES_ARGS)
	ansible-playbook -i $(INVENTORY) ansible/playbooks/site.yml $(if $(MAX_UNAVAILABLE),-e servekit_max_unavailable=$(MAX_UNAVAILABLE)) $(ANSIBLE_ARGS)

lock-images: venv ## Resolve the image tags INVENTORY deploys to digests: images.lock.yml beside it (commit it)
	$(PY) -m servekit images lock $(IMAGES_ARGS)

engine-facts: venv host-tools ## Record what the pinned vLLM release accepts (reasoning parsers), read from its CPU image
	$(PY) -m servekit sandbox engine-facts

record-fixtures: venv host-tools ## Re-record the vLLM fixtures (tests/unit/fixtures/vllm) from the sandbox's image of servekit_vllm_version
	$(PY) tests/unit/fixtures/vllm/record_all.py

roll: venv ## Roll a change through INVENTORY a batch at a time: drain, update, verify, put back [ROLL_BATCH=1]
	@$(PY) -m servekit images check $(IMAGES_ARGS)
	ansible-playbook -i $(INVENTORY) ansible/playbooks/rolling.yml -e servekit_rolling_batch=$(ROLL_BATCH) $(ANSIBLE_ARGS)

verify: venv ## Prove every host of INVENTORY works: host checks, then request probes [DEEP=1: hash the model files]
	$(PY) -m servekit verify --inventory $(INVENTORY) --report-dir reports $(if $(filter-out 0,$(DEEP)),--deep)

probe: venv ## Probe any endpoint: make probe URL=http://host:8000 MODEL=Qwen3-8B [API_KEY=...]
	$(PY) -m servekit probe --url $(URL) --model $(MODEL) $(if $(API_KEY),--api-key $(API_KEY))

lint: venv ## ansible-lint (production profile), yamllint, ruff
	yamllint -c .yamllint .
	ansible-lint
	ruff check src tests ansible benchmarks
	ruff format --check src tests ansible benchmarks

test-unit: venv ## Unit tests only (no Docker)
	pytest tests/unit -q $(PYTEST_ARGS)

test-e2e: venv host-tools ## Sandbox end to end: deploy, verify, re-deploy (changed=0), break, destroy
	pytest tests/e2e -q --ignore tests/e2e/test_faults.py --ignore tests/e2e/test_fleet_live.py $(PYTEST_ARGS)

test-faults: venv host-tools ## Fault suite on the sandbox: kill, freeze, crash loop, reboot, load, key; prints the fault table
	pytest tests/e2e/test_faults.py -q $(PYTEST_ARGS)

test-fleet: venv host-tools ## Sandbox fleet (3 hosts + gateway): a host killed and rolling updates under load, no failed request
	pytest tests/e2e/test_fleet_live.py -q $(PYTEST_ARGS)

test: venv host-tools ## What CI runs: lint, unit tests, the sandbox end to end, the fault suite, the fleet; time per phase
	@mkdir -p reports && : > $(PHASES)
	@scripts/prepare-sandbox start
	@scripts/phase lint $(MAKE) --no-print-directory lint || { scripts/prepare-sandbox stop; scripts/phase-table $(PHASES); exit 1; }
	@# One session: the single-host modules, then the fleet (3 hosts + gateway), which takes the
	@# single host over as it is as its first host, then the lifecycle module, which purges.
	SERVEKIT_PREPARED_DEPLOY=$(CURDIR)/reports/deploy-1.rc pytest tests/unit tests/e2e -q $(TEST_REPORT_ARGS) $(PYTEST_ARGS) || { scripts/prepare-sandbox stop; scripts/phase-table $(PHASES); exit 1; }
	@scripts/phase-table $(PHASES)

fault-table: ## Write the fault table of the last make test (reports/faults.json) into README.md
	@scripts/fault-table reports/faults.json README.md

.PHONY: bench bench-model fault-table

bench: venv host-tools ## Benchmark on the sandbox (~25 min on 2 cores; recreates the host): times vs floors, reports/bench.json
	$(PY) -m benchmarks.bench --out reports/bench.json

bench-model: venv ## Model supply benchmark only (mirror throughput, model role re-runs): reports/bench-model.json
	$(PY) benchmarks/model_supply.py reports/bench-model.json

destroy: venv ## Remove the sandbox (hosts, their volumes, registry, mirror; the image caches stay)
	$(PY) -m servekit sandbox down
	rm -rf ansible/.facts

clean: venv ## Also remove the registry cache, the venv, caches and reports
	$(PY) -m servekit sandbox down --purge
	rm -rf ansible/.facts $(VENV) .cache reports
