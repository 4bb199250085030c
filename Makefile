# meshwave: `make demo` and `make test` are the two commands the README documents.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_VERSION := 25.3

.PHONY: setup bytecode prometheus services browser test test-distributed lint unit lab-up help demo stop bench rehearse docs

help:
	@echo "make setup   create .venv with the pinned dependencies, install Prometheus if missing"
	@echo "make test    lint and run every test (starts and stops the lab and Prometheus itself)"
	@echo "make test-distributed  CeleryExecutor on Postgres and Redis, two workers, one killed mid-wave"
	@echo "make rehearse  every wave of a plan on the lab, Prometheus and Airflow (PLAN=, TOPOLOGY=, SOAK=)"
	@echo "make lab-up  run the lab on the small topology in the foreground (Ctrl-C stops it)"
	@echo "make bench   measure parse cost, soak efficiency, Prometheus load, detection to rollback, the lab, the no-op floor, propose and the seed rehearsal"
	@echo "             (about 80 minutes, then the seed rehearsal: 20 minutes to hours; prints a table, writes bench/results.json; ONLY=parse,lab re-runs some)"
	@echo "make docs    regenerate docs/plan-reference.md, docs/plan.schema.json and docs/benchmarks.md (from the plan models and bench/results.json)"

setup: $(STAMP) prometheus services browser bytecode

# Every task run imports the meshwave package in a fresh process. An editable install has no bytecode, and with
# PYTHONDONTWRITEBYTECODE set (as on this machine) each process compiled it again: about 0.4 s of CPU per task run.
# compileall rewrites only what changed.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q plugins include dags

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check pip==$(PIP_VERSION)
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# The Prometheus server from the distribution's package (tests start their own instance of it).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo "installing prometheus (Debian package)"; \
	  $$SUDO apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
	@prometheus --version 2>&1 | head -1

# PostgreSQL and Redis servers from the distribution's packages, for the distributed test (it starts its own
# instances on free loopback ports; the packages' own services are not used).
services:
	@{ ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v redis-server >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo "installing postgresql and redis-server (Debian packages)"; \
	  $$SUDO apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends postgresql redis-server >/dev/null; }
	@redis-server --version | cut -d' ' -f1-3; ls /usr/lib/postgresql/

# Chromium and its driver from the distribution's packages, for the migration page's browser test (selenium drives
# them; no test tool downloads a browser of its own).
browser:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo "installing chromium and chromium-driver (Debian packages)"; \
	  $$SUDO apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }
	@chromium --version

lint: $(STAMP)
	$(BIN)/ruff check .

# Two parts at once, as both mostly wait (vmstat over a run one after the other: 85% and 51% idle): the tests that
# start no Airflow, on two workers each with its own lab and Prometheus, in the background into .test-unit.log; and
# the end-to-end and distributed ones in the foreground, in one process, as they share one Airflow stack at a time.
# The first part's summary is printed at the end, and `make test` fails when either part does.
test: setup lint
	@rm -f .test-unit.log .test-unit.rc; \
	( $(BIN)/pytest -n 2 -m "not e2e and not distributed" > .test-unit.log 2>&1; echo $$? > .test-unit.rc ) & \
	unit=$$!; trap 'pkill -TERM -P $$unit; exit 130' INT TERM; \
	$(BIN)/pytest -m "e2e or distributed"; e2e=$$?; \
	wait $$unit; code=$$(cat .test-unit.rc 2>/dev/null || echo 1); \
	echo "==== the tests that start no Airflow, run beside the above (all of it in .test-unit.log) ===="; \
	if [ "$$code" = 0 ]; then tail -1 .test-unit.log; else tail -80 .test-unit.log; fi; \
	echo "end to end and distributed: exit $$e2e; the tests that start no Airflow: exit $$code"; \
	[ "$$e2e" = 0 ] && [ "$$code" = 0 ]

# The distributed shape alone (`make test` runs it too): CeleryExecutor on Postgres and Redis, a killed worker.
test-distributed: setup
	$(BIN)/pytest tests/distributed

lab-up: setup
	$(BIN)/meshlab serve --topology include/lab/small.yaml --kubeconfig-dir .meshlab --metrics-port 9464

# Every wave of a plan on the lab, a Prometheus and Airflow, soaks shortened; its report in .rehearsal/ (the seed's plan
# on the seed's lab unless PLAN= and TOPOLOGY= say otherwise).
rehearse: setup
	$(BIN)/meshlab rehearse $(or $(PLAN),include/plans/seed-fleet.yaml) --topology $(or $(TOPOLOGY),include/lab/seed.yaml) \
	  --soak-seconds $(or $(SOAK),20) --out .rehearsal

# Benchmarks start and stop their own lab, Prometheus and Airflow; `make test` never times anything.
bench: setup
	$(BIN)/python -m bench.run $(if $(ONLY),--only $(ONLY) --merge)

# Generated documentation: the plan reference and JSON Schema from the pydantic models, the benchmarks page from
# bench/results.json. tests/unit/test_docs_generated.py fails when the committed files differ from this output.
docs: $(STAMP)
	$(BIN)/python docs/generate.py

demo: setup
	$(BIN)/python include/demo/demo.py start

stop:
	@test -x $(BIN)/python && $(BIN)/python include/demo/demo.py stop || true
