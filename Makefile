# progress-sse: `make run` starts the service, `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
DB     ?= ./progress.db

.PHONY: install run test test-fast lint format bench bench-eta attack demo browser-deps clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/progress-sse serve --host $(HOST) --port $(PORT) --db $(DB)

demo: $(STAMP)
	$(BIN)/progress-sse demo --url http://$(HOST):$(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

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

bench-eta: $(STAMP)
	$(BIN)/python bench/bench_eta.py

# the issue's attack figures against a service process of its own (bench/attack.py)
attack: $(STAMP)
	$(BIN)/python bench/attack.py

# Debian's Chromium for the dashboard tests (Playwright's own browser download does not work here)
browser-deps:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache test-output
