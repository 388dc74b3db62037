# The commands a newcomer runs. Each creates the virtual environment ($(VENV)) when it is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEMO_DIR ?= featcache-demo

.PHONY: demo test lint clean-venv

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## make demo: set up the environment if needed, then run the whole job on the embedded demo data
demo: $(VENV)/.installed
	$(BIN)/featcache demo --workdir $(DEMO_DIR)

## make test: set up the environment (with the test tools) if needed, then lint and run the tests
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
