# Every target CI runs is here; `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The application installs from lock files with hashes (`make lock` refreshes them from the
# ranges in pyproject.toml, which stay for library users); the project itself goes in without
# dependencies, so nothing is resolved anew at install time.
LOCKS  := requirements/app.lock requirements/dev.lock
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCKS) | cksum | cut -d' ' -f1)
UV_COMPILE := $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --no-header --quiet

.DEFAULT_GOAL := help
.PHONY: help install lock browser promtool run run-cells capacity test test-fast lint format bench bench-quick loadtest proto clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(LOCKS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "iiot needs Python 3.11 or newer (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## Create .venv and install the project with its dev tools (from the lock files)

lock: $(STAMP) ## Re-resolve requirements/*.lock from pyproject.toml's ranges (needs the package index)
	$(UV_COMPILE) -o requirements/app.lock
	$(UV_COMPILE) --extra dev -o requirements/dev.lock

run: $(STAMP) ## Run the whole stack (embedded PostgreSQL and MQTT unless IIOT_DATABASE_URL / IIOT_MQTT_URL are set)
	$(BIN)/iiot run

run-cells: $(STAMP) ## Three cells side by side (own database, broker, ingest, API, simulator) and the national aggregator (docs/scaling.md)
	$(BIN)/iiot run --cells 3

test: $(STAMP) browser promtool ## Run the test suite against real PostgreSQL and MQTT (found or started)
	$(BIN)/pytest

test-fast: $(STAMP) ## Only the tests that need no service (parsing, encoding, validation, settings)
	$(BIN)/pytest -m fast

browser: ## Debian's chromium for the dashboard's browser tests (installed when run as root)
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
		else echo "chromium is missing: install Debian's chromium package for the dashboard tests"; fi; }

promtool: ## Debian's promtool (prometheus package) for the alert rules' tests (installed when run as root)
	@command -v promtool >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
		else echo "promtool is missing: install Debian's prometheus package for the alert rule tests"; fi; }

lint: $(STAMP) ## ruff and mypy (strict on the packages)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## Apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) ## Benchmarks beside their baselines (several minutes; see docs/benchmarks.md)
	$(BIN)/python -m bench.mqtt_drain
	$(BIN)/python -m bench.mqtt_scaleout
	$(BIN)/python -m bench.kafka_drain
	$(BIN)/python -m bench.kafka_scaleout
	$(BIN)/python -m bench.registry_events
	$(BIN)/python -m bench.registry_events --writers 3
	$(BIN)/python -m bench.api_requests
	$(BIN)/python -m bench.soak
	$(BIN)/python -m bench.national_intake

bench-quick: $(STAMP) ## The benchmarks at a tenth of their size (a smoke run)
	$(BIN)/python -m bench.mqtt_drain --quick
	$(BIN)/python -m bench.mqtt_scaleout --quick
	$(BIN)/python -m bench.kafka_drain --quick
	$(BIN)/python -m bench.kafka_scaleout --quick
	$(BIN)/python -m bench.registry_events --quick
	$(BIN)/python -m bench.api_requests --quick
	$(BIN)/python -m bench.soak --quick
	$(BIN)/python -m bench.national_intake --quick

loadtest: $(STAMP) ## A bounded load test: 1,000 gateways x 1,000 devices against iiot run, checked (see loadtests/README.md)
	$(BIN)/python -m loadtests.run $(LOADTEST_ARGS)

capacity: $(STAMP) ## A cell's capacity: fleets stepped up at one reading a minute until one fails (see loadtests/README.md)
	$(BIN)/python -m loadtests.capacity $(CAPACITY_ARGS)

proto: ## Regenerate ingest/sparkplug_b_pb2.py(i) from ingest/sparkplug_b.proto (needs network for grpcio-tools)
	test -x .proto-venv/bin/python || $(PYTHON) -m venv .proto-venv
	.proto-venv/bin/python -m pip install --quiet "grpcio-tools>=1.85,<2"
	.proto-venv/bin/python -m grpc_tools.protoc -I ingest --python_out=ingest --pyi_out=ingest ingest/sparkplug_b.proto

clean: ## Remove the virtualenv and the embedded services' data (.iiot)
	rm -rf $(VENV) .proto-venv .iiot
