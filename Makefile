# Herald developer tasks. `make` (or `make help`) lists them.
#
# Targets that need Postgres and Redis call `scripts/dev-services.sh up` first:
# it reuses servers already answering on 127.0.0.1:5432 / :6379, or starts them
# (docker compose when a Docker engine is reachable, else local binaries in .dev/).
# DATABASE_URL / REDIS_URL, when set, are used as they are.

CARGO ?= cargo
DEV   := scripts/dev-services.sh
# Export the URLs matching what `$(DEV) up` provided (values already set win).
WITH_ENV = dev_env="$$($(DEV) env)" && eval "$$dev_env" &&

.DEFAULT_GOAL := help

.PHONY: help build run test test-tools coverage lint bench migrate services-up services-down services-status docker-up

help: ## List the targets
	@echo "Herald make targets:"
	@awk 'BEGIN { FS = ":.*## " } /^[a-zA-Z_-]+:.*## / { printf "  %-16s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

build: ## Build the release binary (target/release/herald)
	$(CARGO) build --release --bin herald

run: services-up ## Start dev services, then `herald run` (migrates, relays)
	$(WITH_ENV) $(CARGO) run --release --bin herald -- run

test: services-up test-tools ## Start dev services, then run the whole test suite
	$(WITH_ENV) $(CARGO) test

test-tools: ## Install the programs the suite starts itself (PgBouncer, redis-cli, Chromium) if missing
	scripts/test-tools.sh install

# `make coverage COVERAGE_ARGS="--test suite operator::"` measures one test module.
COVERAGE_ARGS ?=

coverage: services-up ## Run the test suite under cargo-llvm-cov: line coverage per file and in total
	@command -v cargo-llvm-cov >/dev/null || $(CARGO) install cargo-llvm-cov --locked
	@rustup component list --installed 2>/dev/null | grep -q '^llvm-tools' || rustup component add llvm-tools
	$(WITH_ENV) $(CARGO) llvm-cov $(COVERAGE_ARGS) --summary-only
	@echo "Leaving out the bench code (bench/), which only \`herald bench\` runs:"
	@$(CARGO) llvm-cov report --summary-only --ignore-filename-regex 'bench/src' | grep '^TOTAL'

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

bench: services-up ## Start dev services, then run every benchmark workload
	$(WITH_ENV) $(CARGO) run --release --bin herald -- bench all

migrate: services-up ## Apply the schema migrations to DATABASE_URL
	$(WITH_ENV) $(CARGO) run --release --bin herald -- migrate

services-up: ## Make sure Postgres and Redis answer (start them if needed)
	$(DEV) up

services-down: ## Stop the services that services-up started
	$(DEV) down

services-status: ## Say which services answer
	$(DEV) status

docker-up: ## Build the image and run Postgres, Redis and Herald's roles with docker compose (needs HERALD_ADMIN_TOKEN)
	docker compose up --build
