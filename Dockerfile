# sse-relay: release binary on Debian slim. Needs BuildKit (Docker's default
# builder since 23.0) for the optional `benche[s]` copy below.
#   docker build -t sse-relay .        (or `make docker`)
#   docker run -p 8080:8080 -e NATS_URL=nats://host:4222 -e RELAY_JWT_SECRET=... sse-relay

FROM rust:1-bookworm AS builder
WORKDIR /app

# 1. Dependencies only: build the real Cargo.toml/Cargo.lock against stub
#    sources, so this layer is reused until the dependencies change. Every
#    [[bench]]/[[test]] target that Cargo.toml declares must exist for cargo to
#    read the manifest, so give each a stub too.
COPY Cargo.toml Cargo.lock build.r[s] ./
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

# 2. The real sources. benches/ is optional (the wildcard may match nothing).
#    Touch them: COPY keeps the context's mtimes, which can be older than the
#    stub build, and cargo would then keep the stub binary.
COPY src ./src
COPY benche[s] ./benches/
RUN find src -type f -exec touch {} + \
 && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=builder /app/target/release/sse-relay /usr/local/bin/
USER relay
EXPOSE 8080
ENV RELAY_LISTEN=0.0.0.0:8080
ENTRYPOINT ["sse-relay"]
CMD ["serve"]
