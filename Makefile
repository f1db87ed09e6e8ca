# Tether: `make demo` runs the main job, `make test` runs the whole suite.
# Each target installs what it needs into .venv (Python 3.11+, from PyPI).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh
	@bash scripts/bootstrap.sh "$(PYTHON)" "$(VENV)"
	@touch $(STAMP)

demo: install
	@$(BIN)/python scripts/demo.py

lint: install
	$(BIN)/ruff check src tests bench tools scripts
	$(BIN)/ruff format --check src tests bench tools scripts

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -n 2 -q

test: lint typecheck unit

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .demo
