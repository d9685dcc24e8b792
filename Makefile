# The two commands a newcomer needs (see README.md):
#   make bench   runs the main benchmark and prints its table
#   make test    runs every test
# Both install what they need first (Debian, as root) via `make deps`.
#
#   make rocksdb-tools  builds db_bench, db_stress, env_basic_test with the
#                       BlobFS plugin into $(TARGET_DIR)/rocksdb/
#   make test-rocksdb   runs RocksDB's env_basic_test, db_bench, db_stress on
#                       BlobFS and the rocksdb-env integration tests

CARGO ?= cargo
SHELL := /bin/bash

# System packages the build and tests need. Installed only when missing.
# libclang-dev: bindgen in librocksdb-sys; libgflags-dev: db_bench, db_stress.
APT_PACKAGES := build-essential pkg-config libclang-dev libgflags-dev

# Cargo's target directory (CARGO_TARGET_DIR if set).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
ROCKSDB_TOOLS := $(TARGET_DIR)/rocksdb

.PHONY: all deps test test-rust lint bench bench-criterion fmt clippy rocksdb-tools test-rocksdb

all: test

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "run as root (or install:$$missing)"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup)"; exit 1; }

lint: deps
	$(CARGO) fmt --all -- --check
	# --release: the same profile as the tests, so RocksDB (librocksdb-sys,
	# ~14 min on 2 cores) is built once, not once per profile.
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

test-rust: deps
	$(CARGO) test --workspace --release

test: lint test-rust

# Options for the table, e.g. make bench BENCH_ARGS='--devices mem --seconds 2 --json out.json'
BENCH_ARGS ?=

bench: deps
	$(CARGO) run --release -p benches --bin blobstore-bench -- $(BENCH_ARGS)

bench-criterion: deps
	$(CARGO) bench -p benches --bench blobstore

# RocksDB tools from the librocksdb-sys sources, linked with the plugin. The
# cargo build is the one RocksDB build; the tools link its librocksdb.a
# (bundled into librocksdb_env.a) and compile only their own sources.
rocksdb-tools: deps
	$(CARGO) build --release -p rocksdb-env
	@src=$$($(CARGO) metadata --format-version 1 | grep -o '"manifest_path":"[^"]*/librocksdb-sys-[^"]*/Cargo.toml"' | head -1 | sed 's/^"manifest_path":"//; s/Cargo.toml"$$/rocksdb/'); \
	test -d "$$src" || { echo "librocksdb-sys sources not found"; exit 1; }; \
	$(MAKE) -f cpp/rocksdb-tools.mk -j$$(nproc) ROCKSDB_SRC="$$src" \
	  PLUGIN_LIB=$(TARGET_DIR)/release/librocksdb_env.a OUT=$(ROCKSDB_TOOLS)

test-rocksdb: rocksdb-tools
	$(CARGO) test --release -p rocksdb-env
	cpp/test-rocksdb.sh $(ROCKSDB_TOOLS)
