# Quick start: `make up` runs everything on one machine, `make test` runs the suite.
# Both create .venv and install the project on first use (Python 3.11+).

PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: up test lint

# `make .venv` is the name to type; the stamp records that the install finished.
$(VENV): $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "embedstream needs Python 3.11+; set PYTHON=python3.11 or newer" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

up: $(VENV_STAMP)
	$(VENV)/bin/embedstream up

test: $(VENV_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
