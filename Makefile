# depin-pipeline — the two commands: `make demo` (set up + run the main job) and `make test` (set up + run the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test bench lint up clean readme-plots

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev]'
	@touch $@

demo: $(VENV)/.base  ## set up .venv and run the main job (emulator -> train_and_publish -> gateway -> invoke)
	$(VENV)/bin/depin demo --json

up: $(VENV)/.base  ## Prefect server + UI on 127.0.0.1:4200, DIMO emulator, gateway, served deployments; Ctrl-C stops (ARGS="--port 4300")
	$(VENV)/bin/depin up $(ARGS)

TEST_WORKERS ?= 2
test: $(VENV)/.dev  ## set up .venv with dev extras and run the test suite (pytest-xdist, TEST_WORKERS=2 processes)
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile

bench: $(VENV)/.dev  ## benchmarks (print ratios against baselines measured in the same run; they reuse test fixtures)
	$(PY) bench/ingest.py
	$(PY) bench/train.py
	$(PY) bench/serve.py
	$(PY) bench/pipeline.py
	$(PY) bench/dispatch.py

readme-plots: $(VENV)/.base  ## regenerate the README's pictures (docs/img/) from the demo's fixed-seed fleet
	$(PY) docs/readme_plots.py --out docs/img

lint: $(VENV)/.dev  ## ruff (lint + format) and mypy over the packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .venv-dimo-sdk .depin .pytest_cache
