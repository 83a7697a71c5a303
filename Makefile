# The two commands a new user needs: `make up` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install up test test-fast proto check-proto lint

$(BIN)/sglmesh: pyproject.toml clients/python/pyproject.toml scripts/install.sh
	bash scripts/install.sh
	@touch $@

install: $(BIN)/sglmesh

up: install
	$(BIN)/sglmesh up

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

proto:
	$(BIN)/python scripts/gen_protos.py

check-proto:
	$(BIN)/python scripts/gen_protos.py --check

lint:
	$(BIN)/ruff check services tests scripts benchmarks
	$(BIN)/mypy services
