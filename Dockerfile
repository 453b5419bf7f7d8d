# syntax=docker/dockerfile:1
# Herald image: `docker build -t herald .` then
#   docker run --rm -e DATABASE_URL=... -e REDIS_URL=... herald run
# (see docker-compose.yml for the whole stack).

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first, against a dummy crate, so this layer is reused while
# only src/ or sql/ change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/herald target/release/deps/herald-* \
       target/release/deps/libherald-* target/release/.fingerprint/herald-*

# The crate embeds the sql/ migrations at compile time: copy them before building.
COPY sql ./sql
COPY src ./src
RUN cargo build --release --locked \
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
