# syntax=docker/dockerfile:1
# Herald image: `docker build -t herald .` then
#   docker run --rm -e DATABASE_URL=... -e REDIS_URL=... herald run
# (see docker-compose.yml for the whole stack).

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first, against dummy crates, so this layer is reused while
# only the sources change. The workspace is the library (src/), the `herald`
# binary (cli/) and the bench harness (bench/).
COPY Cargo.toml Cargo.lock ./
COPY cli/Cargo.toml cli/
COPY bench/Cargo.toml bench/
RUN mkdir -p src cli/src bench/src \
    && echo 'fn main() {}' > cli/src/main.rs \
    && touch src/lib.rs bench/src/lib.rs \
    && for t in $(sed -n 's#^path = "\.\./\(tests/.*\)"#\1#p' cli/Cargo.toml); do \
         mkdir -p "$(dirname "$t")" && touch "$t"; done \
    && cargo build --release --locked -p herald-cli \
    && rm -rf src cli/src bench/src tests target/release/herald \
       target/release/deps/*herald* target/release/.fingerprint/herald*

# The library embeds the sql/ migrations at compile time: copy them before building.
COPY sql ./sql
COPY src ./src
COPY cli/src ./cli/src
COPY bench/src ./bench/src
RUN for t in $(sed -n 's#^path = "\.\./\(tests/.*\)"#\1#p' cli/Cargo.toml); do \
         mkdir -p "$(dirname "$t")" && touch "$t"; done \
    && cargo build --release --locked -p herald-cli \
    && cp target/release/herald /usr/local/bin/herald

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /home/herald --shell /usr/sbin/nologin herald
COPY --from=builder /usr/local/bin/herald /usr/local/bin/herald
USER herald
WORKDIR /home/herald
ENV RUST_LOG=info
ENTRYPOINT ["herald"]
CMD ["run"]
