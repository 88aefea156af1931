# progress-sse: `make run` starts the service, `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
HOST   ?= 127.0.0.1
PORT   ?= 8000
DB     ?= ./progress.db
NODE   := tests/node
NODE_STAMP := $(NODE)/node_modules/.installed
# the programs the browser and interop tests run, and the Debian packages that have them
SYSTEM_TOOLS := chromium:chromium node:nodejs npm:npm nginx:nginx openssl:openssl

.PHONY: install run test test-lowest-uvicorn test-fast lint format bench bench-scale bench-eta attack demo browser-deps \
	system-deps node-deps clean

# the service alone (its runtime dependencies), for `make run` and `make demo`: the test
# and lint tools (playwright, schemathesis, mypy, ruff) come with `make test` or `make lint`
$(RUN_STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint,postgres,celery,arq]'
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

# `make run PORT=8001` for another port; the service prints its URL once it listens
run: $(RUN_STAMP)
	@$(BIN)/progress-sse serve --host $(HOST) --port $(PORT) --db $(DB)

demo: $(RUN_STAMP)
	$(BIN)/progress-sse demo --url http://$(HOST):$(PORT)

test: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest -q

# the whole suite again on the lowest uvicorn setup.cfg admits (`make test` has the
# highest): uvicorn_direct relies on its internals within that range (see its docstring)
UVICORN_LOWEST := $(shell sed -n 's/.*uvicorn\[standard\]>=\([0-9.]*\),.*/\1/p' setup.cfg)
VENV_LOWEST := .venv-uvicorn-$(UVICORN_LOWEST)
test-lowest-uvicorn: $(NODE_STAMP)
	test -x $(VENV_LOWEST)/bin/python || $(PYTHON) -m venv $(VENV_LOWEST)
	$(VENV_LOWEST)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_LOWEST)/bin/python -m pip install --quiet -e '.[test,postgres,celery,arq]' \
	    'uvicorn[standard]==$(UVICORN_LOWEST)'
	$(VENV_LOWEST)/bin/python -c 'import uvicorn; print("uvicorn", uvicorn.__version__)'
	$(VENV_LOWEST)/bin/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow and not browser'

lint: $(STAMP)
	$(BIN)/ruff check progress_sse tests bench
	$(BIN)/mypy --strict progress_sse

format: $(STAMP)
	$(BIN)/ruff format progress_sse tests bench
	$(BIN)/ruff check --fix progress_sse tests bench

bench: $(STAMP)
	$(BIN)/python bench/bench_service.py
	$(BIN)/python -m bench.bench_retention

# PostgreSQL (one and two instances) against SQLite: needs a server at 127.0.0.1:5432
# (or PROGRESS_SSE_BENCH_POSTGRES); see bench/bench_scale.py
bench-scale: $(STAMP)
	$(BIN)/python -m bench.bench_scale

bench-eta: $(STAMP)
	$(BIN)/python bench/bench_eta.py

# the issue's attack figures against a service process of its own (bench/attack.py)
attack: $(STAMP)
	$(BIN)/python bench/attack.py

# Debian's chromium (Playwright's own browser download does not work here), nodejs, npm,
# nginx and openssl for the dashboard and interop tests: apt-get installs what is missing
system-deps:
	@PATH="$$PATH:/usr/sbin:/sbin"; missing=""; for t in $(SYSTEM_TOOLS); do \
	    command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

browser-deps: system-deps

# the npm `eventsource` package for tests/test_interop_browser.py, as package-lock.json pins it
$(NODE_STAMP): $(NODE)/package.json $(NODE)/package-lock.json
	@if command -v npm >/dev/null; then \
	    npm ci --prefix $(NODE) --no-audit --no-fund && touch $@; \
	else \
	    echo "npm not found: the Node EventSource tests will be skipped (make system-deps)"; \
	fi

node-deps: $(NODE_STAMP)

clean:
	rm -rf $(VENV) .venv-uvicorn-* *.egg-info .pytest_cache .mypy_cache .ruff_cache test-output \
	    $(NODE)/node_modules
