# netblk: `make test` installs what it needs and runs every check: lint,
# types, host tests, then the in-VM tests in one QEMU guest boot.
VENV := .venv
BIN := $(VENV)/bin
PY_SRC := storaged/storaged certs/netblk_certs tls-bridge/tls_bridge bench tests

.PHONY: test demo deps lint typecheck pytest vm-test

test: deps lint typecheck pytest vm-test

# The whole stack in a QEMU guest, narrated (scripts/demo-guest).
demo:
	scripts/demo

deps:
	@scripts/bootstrap

lint: deps
	$(BIN)/ruff check $(PY_SRC)
	$(BIN)/ruff format --check $(PY_SRC)

typecheck: deps
	$(BIN)/mypy

pytest: deps
	$(BIN)/pytest

vm-test: deps kmod
	scripts/vm-test

# netblk.ko, built on the host: the VM sees the repository read-only.
.PHONY: kmod
kmod:
	$(MAKE) -C kmod
