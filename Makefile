# netblk: `make test` installs what it needs and runs every check.
VENV := .venv
BIN := $(VENV)/bin
PY_SRC := storaged/storaged certs/netblk_certs tests

.PHONY: test deps lint typecheck pytest

test: deps lint typecheck pytest

deps:
	@scripts/bootstrap

lint: deps
	$(BIN)/ruff check $(PY_SRC)
	$(BIN)/ruff format --check $(PY_SRC)

typecheck: deps
	$(BIN)/mypy

pytest: deps
	$(BIN)/pytest
