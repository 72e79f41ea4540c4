# TTG — `make` with no target prints this help. Targets are thin: one ansible-playbook
# (or pytest) call each; the logic lives in roles/ and in the worker.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules --no-print-directory

##@ Variables (override on the command line: make demo BACKEND=redis PARAMS=1000)
SCALE ?=## preset: small (1000 params, chunk 10, 100 ms) or medium (10000, 100, 10 ms)
ifeq ($(SCALE),small)
PARAMS ?= 1000
CHUNK ?= 10
WORK_MS ?= 100
else ifeq ($(SCALE),medium)
PARAMS ?= 10000
CHUNK ?= 100
WORK_MS ?= 10
else ifneq ($(SCALE),)
$(error SCALE must be small or medium, got '$(SCALE)')
endif
BACKEND ?= redis## redis | rabbitmq | static
PLATFORM ?= local## local | kind | aks | k8s (any existing cluster: KUBECONFIG, K8S_CONTEXT; or the one of make k8s-up)
PARAMS ?= 10000## parameters in the sweep
CHUNK ?= 100## parameters per chunk
WORKERS ?= 3## worker processes
WORK_MS ?=## simulated ms of work per point (empty: 1 for built-in tasks, 0 for yours)
TASK ?= reference## built-in task name or module:function (your function over one point)
CODE ?=## directory of your task's code (and its requirements.txt), put on the workers' path
SPACE ?=## parameter space file (YAML/JSON: range, grid, file, random); empty: 0..PARAMS-1
OBJECTIVE ?=## numeric output summarized in the run's result and report (empty: value)
GOAL ?= min## report: the best points have the smallest (min) or largest (max) OBJECTIVE
RUN_ID ?=## empty: generated as YYYYmmdd-HHMMSS-xxxx
TLS ?=## yes = the local brokers listen with TLS only (rediss://, amqps://; a CA of the project's signs them)
FAULT ?= all## chaos: comma-separated faults (ttg chaos-plan lists them) or all
AT ?= 0.3## chaos: progress at which a fault strikes
DRY_RUN ?=## clean: 1 = list what would be stopped, touch nothing
CONFIRM ?=## clean: yes = do not ask
ANSIBLE_ARGS ?=## extra ansible-playbook arguments, e.g. -e ttg_state_dir=/tmp/x -v
DASHBOARD_PORT ?= 8765## dashboard: port of the web view (bound to 127.0.0.1)
VERBOSE ?=## 1 = Ansible's full output and the commands (default: one line per stage, errors last)

VENV ?= .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
INVENTORY := inventories/$(if $(wildcard inventories/$(PLATFORM)/hosts.yml),$(PLATFORM),local)
SWEEP_VARS := -e 'ttg_platform=$(PLATFORM)' -e 'ttg_backend=$(BACKEND)' -e 'ttg_params=$(PARAMS)' \
	-e 'ttg_chunk_size=$(CHUNK)' -e 'ttg_workers=$(WORKERS)' $(if $(WORK_MS),-e 'ttg_work_ms=$(WORK_MS)') \
	-e 'ttg_task=$(TASK)' -e 'ttg_run_id=$(RUN_ID)' -e 'ttg_objective=$(OBJECTIVE)' -e 'ttg_goal=$(GOAL)' \
	-e 'ttg_code=$(if $(CODE),$(abspath $(CODE)))' -e 'ttg_space=$(if $(SPACE),$(abspath $(SPACE)))' \
	$(if $(TLS),-e 'ttg_tls=$(if $(filter yes,$(TLS)),true,false)')
PLAYBOOK := ansible-playbook -i $(INVENTORY)
# Quiet by default (ansible.cfg: the project's stdout callback); VERBOSE=1: everything.
ifneq ($(VERBOSE),)
export ANSIBLE_STDOUT_CALLBACK := ansible.builtin.default
Q :=
else
Q := @
endif

##@ General

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "\nUsage:\n  make \033[36m<target>\033[0m [VAR=value ...]\n"} \
	  /^[a-zA-Z0-9_-]+:.*?##/ { printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2 } \
	  /^[A-Z_]+ \?=.*##/ { split($$0, a, "##"); n = a[1]; v = a[1]; sub(/ \?=.*/, "", n); sub(/^[^=]*= ?/, "", v); \
	    printf "  \033[33m%-12s\033[0m %-10s %s\n", n, v, a[2] } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Setup

.PHONY: setup
setup: $(VENV)/.installed ## Create .venv with what make demo needs (requirements.lock) and the worker (ttg)

# The collections the playbooks use, copied from the pinned ansible wheel (not the whole bundle).
ANSIBLE_BUNDLE := 12.3.0
COLLECTIONS := community/general kubernetes/core azure/azcollection community/crypto community/rabbitmq
PIP := $(VENV)/bin/pip --disable-pip-version-check

$(VENV)/.installed: requirements.lock worker/pyproject.toml scripts/install-collections.py
	@echo "setup: building $(VENV) from requirements.lock (runtime only; make dev adds the test tools)"
	$(Q)$(PYTHON) -m venv $(VENV)
	$(Q)$(PIP) install --quiet -r requirements.lock
	$(Q)$(PIP) download --quiet --no-deps --dest .cache/wheels ansible==$(ANSIBLE_BUNDLE)
	$(Q)$(VENV)/bin/python scripts/install-collections.py .cache/wheels/ansible-$(ANSIBLE_BUNDLE)-py3-none-any.whl \
	  "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" $(COLLECTIONS)
	$(Q)$(PIP) install --quiet --no-deps -e worker
	$(Q)touch $@

.PHONY: dev
dev: $(VENV)/.installed-dev ## setup + what only contributors need (requirements-dev.lock: lint, molecule, pytest)

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.lock
	$(PIP) install --quiet -r requirements.lock -r requirements-dev.lock
	touch $@

.PHONY: lock
lock: ## Re-pin requirements.lock and requirements-dev.lock from the .txt files (needs the registry)
	rm -rf .cache/lockvenv && $(PYTHON) -m venv .cache/lockvenv
	.cache/lockvenv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	{ echo "# Runtime pins (make setup), by 'make lock' from requirements.txt (Python 3.11)."; \
	  .cache/lockvenv/bin/pip freeze --exclude-editable; } > requirements.lock
	.cache/lockvenv/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -r requirements-dev.txt
	{ echo "# Dev-only pins (make dev), by 'make lock' from requirements-dev.txt (Python 3.11)."; \
	  .cache/lockvenv/bin/pip freeze --exclude-editable | grep -vxFf requirements.lock; } > requirements-dev.lock

##@ Run

.PHONY: demo
demo: setup ## Run a sweep end to end on PLATFORM with BACKEND and print the verified result
	$(Q)$(PLAYBOOK) site.yml $(SWEEP_VARS) $(ANSIBLE_ARGS)

.PHONY: chaos
chaos: setup ## One sweep per fault (FAULT=a,b or all), each verified; then what each fault cost
	$(PLAYBOOK) playbooks/chaos.yml $(SWEEP_VARS) -e 'chaos_faults=$(FAULT)' -e 'chaos_at=$(AT)' $(ANSIBLE_ARGS)

.PHONY: report
report: setup ## Write runs/<RUN_ID or latest>/report.md with its plots, from what the run recorded
	ttg report $(if $(RUN_ID),--run-dir runs/$(RUN_ID),--runs-dir runs) \
	  $(if $(OBJECTIVE),--objective $(OBJECTIVE)) --goal $(GOAL)

# TLS=yes: the local brokers' TLS URLs and the project's CA, for the targets that call ttg directly
LOCAL_TLS_ENV = $(if $(filter yes,$(TLS)),TTG_BROKER_CA_FILE=$(abspath .state/tls)/ca.crt \
	TTG_BROKER_URL=$(if $(filter rabbitmq,$(BACKEND)),amqps://ttg@127.0.0.1:5673/ttg,rediss://127.0.0.1:16379/0))

.PHONY: monitor
monitor: setup ## Attach to a running local run: live progress until it finishes (RUN_ID, BACKEND)
	$(LOCAL_TLS_ENV) TTG_BROKER_PASSWORD_FILE=.state/secrets/$(if $(filter rabbitmq,$(BACKEND)),rabbitmq,redis).pass \
	  ttg status --watch --backend $(BACKEND) --run-id $(or $(RUN_ID),$$(basename "$$(readlink runs/latest)"))

.PHONY: dashboard
dashboard: setup ## A live, read-only web view of the runs (127.0.0.1:DASHBOARD_PORT; Ctrl-C stops)
	$(Q)$(LOCAL_TLS_ENV) TTG_BROKER_PASSWORD_FILE=$(abspath .state/secrets)/$(if $(filter rabbitmq,$(BACKEND)),rabbitmq,redis).pass \
	  ttg serve --runs-dir runs --port $(DASHBOARD_PORT) --backend $(BACKEND) \
	  $(if $(wildcard .state/secrets/*.pass),--live)

.PHONY: status
status: setup ## What the project has running where: processes, ports, data dirs, runs, disk (read-only)
	$(Q)$(PLAYBOOK) playbooks/status.yml -e ttg_platform=$(PLATFORM) $(ANSIBLE_ARGS)

.PHONY: recover
recover: setup ## After a reboot or a crash: bring the platform back, verify the data, resume the run
	$(PLAYBOOK) playbooks/recover-infra.yml $(SWEEP_VARS) $(ANSIBLE_ARGS)

.PHONY: clean
clean: setup ## Stop the project's processes (DRY_RUN=1 lists them; CONFIRM=yes skips the question)
	$(PLAYBOOK) playbooks/cleanup.yml -e ttg_platform=$(PLATFORM) -e ttg_backend=$(BACKEND) \
	  -e 'cleanup_confirm=$(CONFIRM)' $(if $(DRY_RUN),--check --diff) $(ANSIBLE_ARGS)

.PHONY: bench
bench: setup ## Measure every backend against the performance targets (runs/bench/latest.json)
	$(PLAYBOOK) playbooks/bench.yml $(ANSIBLE_ARGS)

.PHONY: manifests
manifests: setup ## Render kind/aks x redis/rabbitmq/static manifests into build/manifests/ (offline)
	for p in kind aks; do ansible-playbook -i inventories/$$p playbooks/render-manifests.yml $(ANSIBLE_ARGS); done

##@ Kubernetes (a real control plane on this machine: etcd, kube-apiserver, controller-manager, scheduler)
PURGE ?=## k8s-down: yes = also remove .state/k8s (etcd data, PKI, kubeconfigs)
ifneq ($(filter-out yes,$(PURGE)),)
$(error PURGE must be yes or empty, got '$(PURGE)')
endif

.PHONY: k8s-build
k8s-build: ## Build the pinned Kubernetes binaries and etcd into the cache (/var/cache/ttg-k8s), if absent
	tools/k8s/build.sh

.PHONY: k8s-up
k8s-up: setup ## Start the local control plane; then export KUBECONFIG=.state/k8s/admin.kubeconfig
	ansible-playbook -i inventories/local playbooks/k8s-up.yml $(ANSIBLE_ARGS)

.PHONY: k8s-down
k8s-down: setup ## Stop every process of the local control plane (PURGE=yes removes its data too)
	ansible-playbook -i inventories/local playbooks/k8s-down.yml -e 'local_k8s_purge=$(if $(filter yes,$(PURGE)),true,false)' $(ANSIBLE_ARGS)

##@ Test

TEST_JOBS ?= 2## make test: how many of lint, pytest and the Molecule scenarios run at once (pytest beside one other: 4 on 2 cores made timing-bound tests race)
PYTEST_WORKERS ?= 3## make test: pytest-xdist workers (the tests mostly wait on brokers and sleeps)
MOLECULE_ROLES := $(patsubst roles/%/molecule/default/molecule.yml,%,$(wildcard roles/*/molecule/default/molecule.yml))

# make test: pytest first (the longest), lint and the Molecule scenarios beside it; each part's
# output is shown whole when it ends (--output-sync), and any failure fails make test.
.PHONY: test
test: dev ## Everything a contributor keeps green: lint, molecule, pytest (in parallel)
	$(MAKE) --jobs=$(TEST_JOBS) --keep-going --output-sync=target pytest lint molecule

.PHONY: pytest
pytest: dev ## The pytest suite, PYTEST_WORKERS at once (what tests share: conftest.py)
	env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL pytest -rs --durations=15 -n $(PYTEST_WORKERS) --dist loadgroup -m "not lint and not molecule" worker/tests tests

FUZZ_EXAMPLES ?= 10000## fuzz: examples per parser property
.PHONY: fuzz
fuzz: setup ## Property tests of every parser with FUZZ_EXAMPLES examples each (slow)
	TTG_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) pytest -p no:cacheprovider -q --durations=0 \
	  worker/tests/test_fuzz_redis.py worker/tests/test_fuzz_records.py worker/tests/test_fuzz_cli.py

.PHONY: lint
lint: dev ## ruff, yamllint, ansible-lint (production profile), playbook syntax checks
	ruff check .
	yamllint --strict .
	ansible-lint
	$(PLAYBOOK) --syntax-check site.yml playbooks/*.yml

.PHONY: molecule
molecule: $(addprefix molecule-,$(MOLECULE_ROLES)) ## Molecule scenario of every role (delegated driver, local connection)

.PHONY: $(addprefix molecule-,$(MOLECULE_ROLES))
# molecule reset first: an instance state left by an earlier run (the delegated driver keeps
# it under ~/.ansible/tmp) would make Molecule skip the scenario's prepare step.
$(addprefix molecule-,$(MOLECULE_ROLES)): molecule-%: dev
	cd roles/$* && molecule reset >/dev/null && molecule test
