# The two commands of the README. Each creates or reuses .venv first (seconds when ready).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup serve test test-fast lint bench-kernels clean-venv load browser

setup:
	@bash scripts/setup_venv.sh

serve: setup
	$(VENV)/bin/sae-serve $(ARGS)

# Lint first: a type or style error fails in seconds rather than after the suite.
test: setup lint browser
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# Debian's chromium for the playground's browser tests (seconds when installed).
browser:
	@bash scripts/setup_browser.sh

# ruff (style, imports, likely bugs) and mypy (types) over the project, as configured in
# pyproject.toml. `make test` runs it first.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Unit tests only: no vLLM engine.
test-fast: setup
	$(PY) -m pytest tests -q -m "not slow" $(PYTEST_ARGS)

bench-kernels: setup
	$(PY) benchmarks/kernels.py $(ARGS)

clean-venv:
	rm -rf $(VENV)

# Bounded load run (benchmarks/load.py): starts sae-serve, runs Locust headless, stops it,
# prints requests/s, p50/p95/p99 per route, failures and generated tokens/s.
# make load LOAD_ARGS="--users 8 --duration 120"
load: setup
	$(PY) benchmarks/load.py $(LOAD_ARGS)
