# netblk: `make test` installs what it needs and runs every check: lint,
# types, host tests, then the in-VM tests in one QEMU guest boot.
VENV := .venv
BIN := $(VENV)/bin
PY_SRC := lib/netblk storaged/storaged certs/netblk_certs tls-bridge/tls_bridge admin-api/netblk_admin bench tests

.PHONY: test demo deps lint typecheck kmod-check engine-check pytest vm-test

test: deps lint typecheck kmod-check engine-check pytest vm-test

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
	$(BIN)/mypy bench/*.py

pytest: deps
	$(BIN)/pytest

vm-test: deps kmod
	scripts/vm-test

# netblk.ko, built on the host: the VM sees the repository read-only.
.PHONY: kmod
kmod:
	$(MAKE) -C kmod

# The driver must build warning-free with W=1 and clean under sparse (C=1).
kmod-check: deps
	@$(MAKE) -s -C kmod clean
	@$(MAKE) -C kmod C=1 W=1 >build-kmod.log 2>&1 || { cat build-kmod.log; exit 1; }
	@if grep -E "warning:|error:" build-kmod.log; then echo "kmod: not clean" >&2; exit 1; fi
	@echo "kmod: warning-free with W=1, sparse clean ($$(grep -c CHECK build-kmod.log) files checked)"

# storaged's engine must build warning-free with -Wall -Wextra (the flags the
# package build uses, here as errors).
ENGINE_CFLAGS := -Wall -Wextra -Werror -fPIC -O2 -fsyntax-only -Ikmod/include/uapi
engine-check: deps
	@include=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	for source in storaged/engine/*.c; do \
		$(CC) $(ENGINE_CFLAGS) -I"$$include" $$source || exit 1; \
	done
	@echo "engine: warning-free with -Wall -Wextra ($$(ls storaged/engine/*.c | wc -l) files)"
