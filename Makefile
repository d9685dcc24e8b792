# The two commands a newcomer needs (see README.md):
#   make bench   runs the main benchmark and prints its table
#   make test    runs every test
# Both install what they need first (Debian, as root) via `make deps`.

CARGO ?= cargo
SHELL := /bin/bash

# System packages the build and tests need. Installed only when missing.
# fuse3: fusermount3 and /dev/fuse setup for the FUSE mount test of blobfs.
APT_PACKAGES := build-essential pkg-config fuse3

.PHONY: all deps test test-rust test-vm lint bench bench-criterion crashtest fuzz fuzz-build fmt clippy

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
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test-rust: deps
	$(CARGO) test --workspace --release

test: lint test-rust test-vm

# The blobstore crash test alone, with its report (points, violations, seeds).
# CRASH_POINTS=N make crashtest runs N crash points (default 10,000);
# CRASH_SEED=S replays one run.
crashtest: deps
	$(CARGO) test --release -p blobstore --test crash -- --nocapture

# Options for the table, e.g. make bench BENCH_ARGS='--devices mem --seconds 2 --json out.json'
BENCH_ARGS ?=

# The userspace NVMe driver against QEMU's NVMe controller in a VM (TCG, an
# emulated IOMMU, vfio-pci in the guest): driver tests, the blobstore suite on
# NvmeDevice, perf. Installs qemu-system-x86, linux-image-amd64,
# busybox-static and cpio when missing. See blobstore/NVME.md.
test-vm: deps
	CARGO="$(CARGO)" blobstore/tests/vm/run.sh

# cargo-fuzz targets of blobstore/fuzz (decoders, image load, model-based
# API with failing I/O). `make fuzz` builds them all and runs each for
# FUZZ_SECONDS (default 10); FUZZ_SECONDS=600 make fuzz for a real run.
# Stable toolchain: cargo-fuzz's nightly flags through RUSTC_BOOTSTRAP=1.
FUZZ_SECONDS ?= 10
FUZZ_TARGETS := super_block md_page load_image model
FUZZ_ENV := RUSTC_BOOTSTRAP=1

fuzz-build: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	cd blobstore/fuzz && $(FUZZ_ENV) $(CARGO) fuzz build -O

fuzz: fuzz-build
	cd blobstore/fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS)s"; \
	  $(FUZZ_ENV) $(CARGO) fuzz run -O $$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1 || exit 1; \
	done

bench: deps
	$(CARGO) run --release -p benches --bin blobfs-bench -- $(BLOBFS_BENCH_ARGS)
	$(CARGO) run --release -p benches --bin blobstore-bench -- $(BENCH_ARGS)

bench-criterion: deps
	$(CARGO) bench -p benches --bench blobstore
