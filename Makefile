# Set-up and everyday commands. Every target creates .venv when it is missing.
#   make demo   - run the main job on the embedded CPU default (configs/demo.yaml)
#   make test   - run the test suite (what CI runs)
#   make lint   - ruff check + format check
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The slowest tests are listed at the end of every run (the suite aims at 20 minutes).
PYTEST_ARGS ?= --durations=25
DEMO_ARGS ?=

.PHONY: install demo test test-fast lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m embr_rl.run configs/demo.yaml $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
