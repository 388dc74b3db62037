# The commands a newcomer runs. Each creates the virtual environment ($(VENV)) when it is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: test lint clean-venv

$(BIN)/featcache: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## make test: set up the environment if needed, then lint and run the whole test suite
test: $(BIN)/featcache
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
