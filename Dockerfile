# sse-relay: the stripped release binary on Debian slim, run as uid 10001.
#   docker build -t sse-relay .            (or `make docker`; podman/buildah alike)
#   docker run --stop-timeout 15 -p 8080:8080 \
#     -e NATS_URL=nats://host:4222 -e RELAY_JWT_SECRET=... sse-relay
#
# Stop timeout: on SIGTERM the relay spreads the end of its streams over
# --drain-seconds (RELAY_DRAIN_SECONDS, 4 s by default), each with a
# `retry:` hint, waits up to 2 s for their last bytes, then gives NATS up to
# 2 s to drain: give it at least the drain + 5 s before the kill. Docker's and Podman's default is 10 s, so
# pass `--stop-timeout 15` (Compose: `stop_grace_period: 15s`); fly.toml's
# kill_timeout and the Kubernetes manifests in deploy/ are sized the same
# way.
#
# Base images are pinned by tag and spelled with their registry, so podman
# and buildah (which have no default registry) build this file unchanged.
# Bump both tags together; the Rust tag must be at least Cargo.toml's
# rust-version.

FROM docker.io/library/rust:1.95.0-bookworm AS builder
WORKDIR /app

# 1. Dependencies only: build the real Cargo.toml/Cargo.lock against stub
#    sources, so this layer is reused until the dependencies change. Every
#    [[bench]]/[[test]] target that Cargo.toml declares must exist for cargo to
#    read the manifest, so give each a stub too.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && awk ' \
      function val(l) { sub(/^[^=]*=[ \t]*"/, "", l); sub(/".*/, "", l); return l } \
      function flush() { \
        if (sec == "bench") print (path != "" ? path : "benches/" name ".rs"); \
        if (sec == "test")  print (path != "" ? path : "tests/" name ".rs") } \
      /^[ \t]*\[/ { flush(); sec = ""; name = ""; path = "" } \
      /^[ \t]*\[\[bench\]\]/ { sec = "bench" } \
      /^[ \t]*\[\[test\]\]/  { sec = "test" } \
      sec != "" && /^[ \t]*name[ \t]*=/ { name = val($0) } \
      sec != "" && /^[ \t]*path[ \t]*=/ { path = val($0) } \
      END { flush() }' Cargo.toml \
    | while read -r f; do mkdir -p "$(dirname "$f")"; echo 'fn main() {}' > "$f"; done \
 && cargo build --release --locked \
 && rm -rf src

# 2. The real sources (benches/ too: Cargo.toml declares them; no globs in
#    COPY, which builders treat differently when nothing matches). Touch
#    them: COPY keeps the context's mtimes, which can be older than the stub
#    build, and cargo would then keep the stub binary.
#    `cargo build --release --locked` is also what CI builds (.ci/run), and
#    checks: [profile.release] strips the binary (no debug info, no symbol
#    table); `cargo build --profile bench` keeps them for profiling.
COPY src ./src
COPY benches ./benches/
RUN find src -type f -exec touch {} + \
 && cargo build --release --locked

FROM docker.io/library/debian:bookworm-20250811-slim
# ca-certificates: the system roots, for NATS over TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /app/target/release/sse-relay /usr/local/bin/
# Numeric, so Kubernetes' runAsNonRoot can verify it without an /etc/passwd
# lookup; no user entry is needed.
USER 10001:10001
EXPOSE 8080
ENV RELAY_LISTEN=0.0.0.0:8080
# The image has no curl: the binary checks itself. GET /healthz on
# RELAY_LISTEN (0.0.0.0 is asked on 127.0.0.1), 2 s budget, exit 0 on 2xx.
# For "ready for browsers" (NATS connected) use
# `sse-relay health --url http://127.0.0.1:8080/readyz`.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["sse-relay", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sse-relay"]
CMD ["serve"]
