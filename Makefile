# Two commands on a fresh machine (each creates .venv when missing):
#   make main   - the main job: starter corpus, dense vs PEER at equal FLOPs, evaluation, comparison
#   make test   - lint (ruff), type check (mypy), then the test suite
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: main test test-all lint env clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# CPU torch first, from the pinned local build; then the project (editable) and its test extras
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

env: $(STAMP)

main: $(STAMP)
	$(VENV)/bin/peer main

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests tools studies
	$(VENV)/bin/ruff format --check src tests tools studies
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m ""

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
