# Quick start: `make up` runs everything on one machine, `make test` runs the suite,
# `make test-fast` all of it but the tests marked slow (the real model, several processes).
# Each creates .venv and installs the project on first use (Python 3.11+): `make up`
# installs what running needs, the test and lint targets add the test tools.
#
#   make up PORT=9000 WORKERS=2           another port, two worker processes
#   make up TORCH_INDEX=https://download.pytorch.org/whl/cpu   CPU-only PyTorch (no CUDA libraries)

PYTHON ?= python3
VENV := .venv
RUN_STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=
PORT ?=
WORKERS ?=
TORCH_INDEX ?=

UP_ARGS := $(if $(PORT),--port $(PORT)) $(if $(WORKERS),--workers $(WORKERS))

.PHONY: up test test-fast test-nemesis-sentinel lint

# `make .venv` is the name to type; the stamps record that an install finished.
$(VENV): $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "embedstream needs Python 3.11+; set PYTHON=python3.11 or newer" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(VENV)/bin/python -m pip install --quiet torch==2.13.0 --index-url $(TORCH_INDEX))
	$(VENV)/bin/python -m pip install --quiet -e .
	touch $@

$(DEV_STAMP): $(RUN_STAMP)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

up: $(RUN_STAMP)
	$(VENV)/bin/embedstream up $(UP_ARGS)

test: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The nemesis test (tests/e2e/test_nemesis.py) on a primary, a replica and three sentinels
# instead of the cluster `make test` runs it on; NEMESIS_S=60 for a shorter run.
NEMESIS_S ?=
test-nemesis-sentinel: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 EMBEDSTREAM_NEMESIS_ON=sentinel \
		$(if $(NEMESIS_S),EMBEDSTREAM_NEMESIS_S=$(NEMESIS_S)) \
		$(VENV)/bin/python -m pytest -q -s tests/e2e/test_nemesis.py $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
