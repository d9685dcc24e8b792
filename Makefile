# The two commands a newcomer needs (see README.md):
#   make bench   runs the main benchmark (kvbench: RocksDB on BlobFS vs
#                POSIX) and prints its tables
#   make test    runs every test
# Both install what they need first (Debian, as root) via `make deps`.
#
#   make rocksdb-tools  builds db_bench, db_stress, env_basic_test with the
#                       BlobFS plugin into $(TARGET_DIR)/rocksdb/ (db_stress
#                       with the plugin's test machinery, see there)
#   make test-rocksdb   runs RocksDB's env_basic_test, db_bench, db_stress on
#                       BlobFS and the rocksdb-env integration tests

CARGO ?= cargo
SHELL := /bin/bash

# System packages the build and tests need. Installed only when missing.
# fuse3: fusermount3 and /dev/fuse setup for the FUSE mount test of blobfs.
# libclang-dev: bindgen in librocksdb-sys; libgflags-dev: db_bench, db_stress.
APT_PACKAGES := build-essential pkg-config fuse3 libclang-dev libgflags-dev

# Cargo's target directory (CARGO_TARGET_DIR if set).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
ROCKSDB_TOOLS := $(TARGET_DIR)/rocksdb

.PHONY: all deps test test-rust test-vm test-vm-tcp bench-vm lint bench bench-iopath bench-micro bench-mount kvbench-smoke bench-criterion crashtest fuzz fuzz-build fmt clippy rocksdb-tools test-rocksdb crashtest-rocksdb rocksdb-debug-tools crashtest-rocksdb-debug test-rocksdb-suites kill-dbbench

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
	# --all-features: the test machinery (feature `testing`) and the targets
	# that need it (crash driver, power-loss tests) are linted too; the
	# second run lints the production libraries, which refuse it. Features
	# of our crates never reach librocksdb-sys: no second RocksDB build.
	$(CARGO) clippy --release --workspace --all-targets --all-features -- -D warnings
	$(CARGO) clippy --release -p blobstore -p rocksdb-env --lib -- -D warnings
	# The blobstore without its default feature (no NVMe driver: a build
	# for a machine without VFIO) still builds, warning-free.
	$(CARGO) clippy --release -p blobstore --lib --no-default-features -- -D warnings
	# Every crate's rustdoc, warnings denied (--release reuses RocksDB's
	# build-script output instead of building it for another profile).
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --release --workspace --no-deps --all-features

# The Rust suites (with the READMEs' Rust snippets as rocksdb-env's
# doctests; --all-features: with the test machinery the crash, fault and
# power-loss tests need), the production build's refusal of that machinery,
# then the three examples a newcomer starts from.
test-rust: deps
	$(CARGO) test --workspace --release --all-features
	$(CARGO) test --release -p blobstore --test refusals
	# The blobstore's suites again in a debug build, the one place its
	# invariant checks (debug_assert!, and the store-wide check at the end
	# of every metadata transaction) run: the release profile compiles them
	# out. No RocksDB in it (the blobstore does not link it).
	$(CARGO) test -p blobstore --features testing
	$(CARGO) run --release -p blobstore --example hello_blob
	$(CARGO) run --release -p blobfs --example hello_blobfs
	$(CARGO) run --release -p rocksdb-env --example hello_rocksdb

test: lint test-rust test-rocksdb crashtest-rocksdb kvbench-smoke test-vm fuzz

# The blobstore crash test alone, with its report (points, violations, seeds).
# CRASH_POINTS=N make crashtest runs N crash points (default 10,000);
# CRASH_SEED=S replays one run.
crashtest: deps
	$(CARGO) test --release -p blobstore --features testing --test crash -- --nocapture

# Options for blobstore-bench, e.g. make bench-micro BENCH_ARGS='--devices mem --seconds 2 --json out.json'
BENCH_ARGS ?=

# The userspace NVMe driver against QEMU's NVMe controller in a VM (TCG, an
# emulated IOMMU, vfio-pci in the guest): driver tests, the blobstore suite on
# NvmeDevice, bdevperf. Installs qemu-system-x86, linux-image-amd64,
# busybox-static and cpio when missing. See blobstore/NVME.md.
test-vm: deps rocksdb-tools
	CARGO="$(CARGO)" ROCKSDB_TOOLS=$(ROCKSDB_TOOLS) blobstore/tests/vm/run.sh

# Only the NVMe/TCP steps of the VM test that need neither BlobFS nor the
# RocksDB tools: our initiator against the kernel's nvmet-tcp target in the
# guest (driver tests, the blobstore suite, bdevperf). See blobstore/NVME-TCP.md.
test-vm-tcp: deps
	CARGO="$(CARGO)" VM_ONLY=tcp blobstore/tests/vm/run.sh

# The VM's measurements (not a test), about 20 minutes under TCG on an
# idle 2-core machine: our NVMe driver (with and without completion
# interrupts) against the kernel's NVMe path (fio: io_uring, polled
# io_uring, io_uring passthrough) on the same emulated namespace, then
# kvbench's nvme configuration (RocksDB on BlobFS on our driver vs RocksDB
# on ext4 on the kernel's driver, two namespaces of one controller), with
# and without interrupts. BENCH_ROUNDS, BENCH_SECONDS, KV_MODES,
# KVBENCH_VM_ARGS (default --keys 500000 --duration 30).
bench-vm: deps rocksdb-tools
	CARGO="$(CARGO)" ROCKSDB_TOOLS=$(ROCKSDB_TOOLS) VM_MODE=bench blobstore/tests/vm/run.sh

# cargo-fuzz targets of blobstore/fuzz (decoders, image load, model-based
# API with failing I/O). `make fuzz` builds them all and runs each for
# FUZZ_SECONDS (default 10); FUZZ_SECONDS=600 make fuzz for a real run.
# Stable toolchain: cargo-fuzz's nightly flags through RUSTC_BOOTSTRAP=1.
FUZZ_SECONDS ?= 10
FUZZ_TARGETS := super_block md_page load_image model tcp_pdu
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

# The key-value acceleration benchmark: db_bench (SPDK's RocksDB suite plus
# multiget and scan) on BlobFS vs the kernel file system in four
# configurations (disk, direct, memory, and budget: a memory cgroup of a
# third of the database; as root), about 25 minutes on 2 cores. Tables on stdout; JSON, chart and
# db_bench logs in $(TARGET_DIR)/kvbench-out. Options through KVBENCH_ARGS,
# e.g. make bench KVBENCH_ARGS='--configs memory --keys 500000 --duration 10'
KVBENCH_ARGS ?=

bench: rocksdb-tools
	$(CARGO) run --release -p benches --bin kvbench -- $(KVBENCH_ARGS)

# kvbench --quick (under 3 minutes): the smoke test `make test` runs. Its
# own output directory, so it does not overwrite the last `make bench`.
kvbench-smoke: rocksdb-tools
	$(CARGO) run --release -p benches --bin kvbench -- --quick --out $(TARGET_DIR)/kvbench-smoke

# The micro benchmarks: BlobFS vs ext4 file I/O, blobstore vs raw device.
bench-micro: deps
	$(CARGO) run --release -p benches --bin blobfs-bench -- $(BLOBFS_BENCH_ARGS)
	$(CARGO) run --release -p benches --bin blobstore-bench -- $(BENCH_ARGS)

# Clean BlobFS mount time with 1,000, 10,000 and 100,000 files of 100
# bytes, on a memory device and on a file image in $(TMPDIR) (median of 5
# mounts each; under a minute on 2 cores). Builds only
# blobstore and blobfs, not RocksDB. Options through MOUNT_BENCH_ARGS, e.g.
# make bench-mount MOUNT_BENCH_ARGS='--files 1000,10000 --mounts 3'
MOUNT_BENCH_ARGS ?=

bench-mount: deps
	$(CARGO) run --release -p blobfs --example mount_scale -- $(MOUNT_BENCH_ARGS)

# Instructions per 4 KiB I/O at queue depth 1, submit to completion, counted
# with callgrind (valgrind): the NVMe driver on its software controller
# (nvme-raw), the driver's own share of it (nvme-driver), a blob on it
# (nvme-blob), MemDevice (mem-raw) and a blob on it (mem-blob); prints
# `iopath PATH OP INSTRUCTIONS_PER_IO`. Each figure is
# (instructions of IOPATH_OPS ops - of IOPATH_BASE_OPS ops) / the difference,
# so setup cancels out. See benches/iopath.sh.
bench-iopath: deps
	$(CARGO) build --release -p benches --example iopath
	benches/iopath.sh $(TARGET_DIR)/release/examples/iopath

bench-criterion: deps
	$(CARGO) bench -p benches --bench blobstore

# The RocksDB sources and the compression libraries' headers (shell
# command substitutions for recipes; cpp/rocksdb-src.sh says why).
ROCKSDB_SRC_DIR = $$(cpp/rocksdb-src.sh $(CARGO) src)
COMPRESSION_INCLUDES = $$(cpp/rocksdb-src.sh $(CARGO) includes)

# RocksDB tools from the librocksdb-sys sources, linked with the plugin. The
# cargo build is the one RocksDB build; the tools link its librocksdb.a
# (bundled into librocksdb_env.a) and compile only their own sources.
# Two builds of the plugin, one RocksDB (the features of rocksdb-env and
# blobstore do not reach librocksdb-sys): the production one for db_bench,
# env_basic_test, ldb and sst_dump, and one with the feature `testing`
# (`powerloss=on`, `fault_injection=on`) for db_stress, which the crash
# tests run on the power-loss device. Each archive is hard-linked from
# cargo's output (which the other build replaces) into $(PLUGIN_DIR), so a
# tool is relinked only when its plugin changed; the comparison stops a
# build in which cargo left the other archive in place.
PLUGIN_DIR := $(ROCKSDB_TOOLS)/plugin
rocksdb-tools: deps
	@mkdir -p $(PLUGIN_DIR)/production $(PLUGIN_DIR)/testing
	$(CARGO) build --release -p rocksdb-env
	ln -f $(TARGET_DIR)/release/librocksdb_env.a $(PLUGIN_DIR)/production/ 2>/dev/null || \
	  cp -p $(TARGET_DIR)/release/librocksdb_env.a $(PLUGIN_DIR)/production/
	$(CARGO) build --release -p rocksdb-env --features testing
	ln -f $(TARGET_DIR)/release/librocksdb_env.a $(PLUGIN_DIR)/testing/ 2>/dev/null || \
	  cp -p $(TARGET_DIR)/release/librocksdb_env.a $(PLUGIN_DIR)/testing/
	@! cmp -s $(PLUGIN_DIR)/production/librocksdb_env.a $(PLUGIN_DIR)/testing/librocksdb_env.a \
	  || { echo "the production and testing plugins are the same archive"; exit 1; }
	@src=$(ROCKSDB_SRC_DIR) && inc=$(COMPRESSION_INCLUDES) && \
	$(MAKE) -f cpp/rocksdb-tools.mk -j$$(nproc) ROCKSDB_SRC="$$src" \
	  COMPRESSION_INCLUDES="$$inc" PLUGIN_LIB=$(PLUGIN_DIR)/production/librocksdb_env.a \
	  TESTING_PLUGIN_LIB=$(PLUGIN_DIR)/testing/librocksdb_env.a OUT=$(ROCKSDB_TOOLS)

test-rocksdb: rocksdb-tools
	$(CARGO) test --release -p rocksdb-env --features testing
	cpp/test-rocksdb.sh $(ROCKSDB_TOOLS)

# RocksDB crash test (rocksdb-env/src/bin/rocksdb-crashtest/, after
# RocksDB's db_crashtest.py blackbox mode): db_stress on BlobFS with
# verification, SIGKILLed at a random moment (MIN_SECS..MAX_SECS after its
# start), restarted on the same DB, ROUNDS times. MODE=strict kills and
# expects every acknowledged write back, synced or not (POSIX's promise
# for a process crash: db_stress without --sync_fault_injection, WAL on);
# MODE=kill only kills;
# MODE=powerloss runs the device with powerloss=on and plays a power cut on
# the image after each kill (unflushed writes undone, kept or torn, and
# the unsynced memory lost with the machine's); about half its rounds
# after the first stop mid-I/O instead, db_stress killing itself at a
# random device write or flush (the test-only device option
# powerloss_cut_after=N). MODE unset runs all three. The kill and
# powerloss rounds pass --sync_fault_injection=1 (a power cut loses what
# was not synced, and kill rounds also run without a WAL), so db_stress
# traces its expected state and accepts any prefix of the acknowledged
# writes, and nothing synced. The default (5 rounds of 2-4 s per mode) is
# the `make test` setting; e.g.
#   ROUNDS=100 MODE=powerloss make crashtest-rocksdb
# CRASH_SEED=S replays a run's knobs; CRASHTEST_DIR keeps images elsewhere.
ROUNDS ?= 5
MIN_SECS ?= 2
MAX_SECS ?= 4
MODE ?=
CRASHTEST_DIR ?= $(or $(TMPDIR),/tmp)/rocksdb-crashtest

crashtest-rocksdb: rocksdb-tools
	$(CARGO) build --release -p rocksdb-env --features testing --bin rocksdb-crashtest
	@for m in $(or $(MODE),strict kill powerloss); do \
	  $(TARGET_DIR)/release/rocksdb-crashtest --db-stress $(ROCKSDB_TOOLS)/db_stress \
	    --mode $$m --rounds $(ROUNDS) --min-secs $(MIN_SECS) --max-secs $(MAX_SECS) \
	    --dir $(CRASHTEST_DIR)/$$m $(if $(CRASH_SEED),--seed $(CRASH_SEED)) || exit 1; \
	done

# What a SIGKILLed db_bench (sync=false, WAL on) leaves on BlobFS and on
# the host file system: after a fillseq that finished (every key must come
# back) and in the middle of one. NUM and SECS set the size and the kill
# time (defaults 3000000, 4).
kill-dbbench: rocksdb-tools
	cpp/kill-dbbench.sh $(ROCKSDB_TOOLS)

# db_stress's own fault injection (read, write and sync faults through
# RocksDB's FaultInjectionTestFS on top of BlobFS) needs a RocksDB built
# without NDEBUG, so this opt-in target builds a SECOND RocksDB (asserts and
# SyncPoint on, -O1; about 45 min on 2 shared cores the first time,
# incremental after)
# and is not part of `make test`. cpp/rocksdb-debug.mk builds the debug
# librocksdb.a from the librocksdb-sys sources (never writing into them), a
# cargo build in its own target directory bundles it into librocksdb_env.a
# (with the feature `testing`: the crash loops' powerloss mode needs it)
# (librocksdb-sys pointed at it with ROCKSDB_LIB_DIR; the plugin C++ built
# without NDEBUG too: ROCKSDB_ENV_DEBUG_ROCKSDB=1), and db_stress links that.
# Then rocksdb-crashtest --faults runs the kill and powerloss crash loops and
# a plain (no kill) loop with the debug db_stress: a round passes only if
# db_stress does not exit on its own (plain: exits 0), prints nothing on
# stderr (db_crashtest.py's rule) and no verification or corruption line.
# ROUNDS, MIN_SECS, MAX_SECS, CRASH_SEED, CRASHTEST_DIR as above; MODE picks
# some of kill, powerloss, plain (all by default); PLAIN_OPS is the plain
# rounds' operations per thread; WRITE_FAULTS=N injects write and
# metadata-write faults at 1 in N instead of db_crashtest's odds. E.g.
#   ROUNDS=100 make crashtest-rocksdb-debug
ROCKSDB_DEBUG := $(TARGET_DIR)/rocksdb-debug
PLAIN_OPS ?= 10000
DEBUG_CARGO_ENV := CARGO_TARGET_DIR=$(abspath $(ROCKSDB_DEBUG))/cargo \
  ROCKSDB_LIB_DIR=$(abspath $(ROCKSDB_DEBUG))/lib ROCKSDB_STATIC=1 ROCKSDB_ENV_DEBUG_ROCKSDB=1

rocksdb-debug-tools: deps
	@src=$(ROCKSDB_SRC_DIR) && inc=$(COMPRESSION_INCLUDES) || exit 1; \
	nice -n 10 $(MAKE) -f cpp/rocksdb-debug.mk -j$$(nproc) ROCKSDB_SRC="$$src" \
	  COMPRESSION_INCLUDES="$$inc" OUT=$(ROCKSDB_DEBUG) lib tool-objects || exit 1; \
	stamp=$(ROCKSDB_DEBUG)/cargo/bundled.stamp; \
	if [ -e "$$stamp" ] && [ $(ROCKSDB_DEBUG)/lib/librocksdb.a -nt "$$stamp" ]; then \
	  echo "debug librocksdb.a changed: rebuilding the crates that bundle it"; \
	  $(DEBUG_CARGO_ENV) $(CARGO) clean --release -p librocksdb-sys; fi; \
	$(DEBUG_CARGO_ENV) nice -n 10 $(CARGO) build --release -p rocksdb-env --features testing --lib || exit 1; \
	touch "$$stamp"; \
	$(MAKE) -f cpp/rocksdb-debug.mk ROCKSDB_SRC="$$src" OUT=$(ROCKSDB_DEBUG) \
	  COMPRESSION_INCLUDES="$$inc" PLUGIN_LIB=$(ROCKSDB_DEBUG)/cargo/release/librocksdb_env.a db_stress
	@# One RocksDB, the debug one: the plugin archive defines DB::Open once
	@# and SyncPoint (compiled only without NDEBUG) once, db_stress has
	@# SyncPoint, and its link map names no release-profile archive.
	@lib=$(ROCKSDB_DEBUG)/cargo/release/librocksdb_env.a; \
	defs=$$(nm -C --defined-only $$lib 2>/dev/null); \
	n=$$(grep -c ' T rocksdb::DB::Open(rocksdb::Options const&' <<<"$$defs"); \
	m=$$(grep -c ' T rocksdb::SyncPoint::GetInstance()' <<<"$$defs"); \
	[ "$$n" = 1 ] && [ "$$m" = 1 ] \
	  || { echo "$$lib: DB::Open defined $$n times, SyncPoint $$m times (want 1, 1)"; exit 1; }
	@nm -C $(ROCKSDB_DEBUG)/db_stress | grep -q ' T rocksdb::SyncPoint::GetInstance()' \
	  || { echo "db_stress has no SyncPoint: not a debug RocksDB"; exit 1; }
	@! grep -q '$(TARGET_DIR)/release/' $(ROCKSDB_DEBUG)/db_stress.map \
	  || { echo "db_stress links release objects"; exit 1; }

# RocksDB's own DB test suites (DBTestBase and the other TEST_FS_URI
# ones), built against the debug RocksDB and the plugin, each run on POSIX
# and on BlobFS (blobfs://mem:6G): a table per suite and every test that
# fails only on BlobFS, with why. Opt-in, like the debug RocksDB it needs.
# SUITES picks them, e.g. make test-rocksdb-suites SUITES=db_flush_test
SUITES ?= db_basic_test db_flush_test fault_injection_test db_compaction_filter_test column_family_test
test-rocksdb-suites: rocksdb-debug-tools
	@src=$(ROCKSDB_SRC_DIR) && inc=$(COMPRESSION_INCLUDES) || exit 1; \
	$(MAKE) -f cpp/rocksdb-debug.mk -j$$(nproc) ROCKSDB_SRC="$$src" OUT=$(ROCKSDB_DEBUG) \
	  COMPRESSION_INCLUDES="$$inc" PLUGIN_LIB=$(ROCKSDB_DEBUG)/cargo/release/librocksdb_env.a \
	  SUITES="$(SUITES)" suites
	cpp/test-rocksdb-suites.sh $(ROCKSDB_DEBUG)/suites $(SUITES)

crashtest-rocksdb-debug: rocksdb-debug-tools
	$(CARGO) build --release -p rocksdb-env --features testing --bin rocksdb-crashtest
	@for m in $(or $(MODE),kill powerloss plain); do \
	  $(TARGET_DIR)/release/rocksdb-crashtest --db-stress $(ROCKSDB_DEBUG)/db_stress \
	    --faults --mode $$m --rounds $(ROUNDS) --min-secs $(MIN_SECS) --max-secs $(MAX_SECS) \
	    --ops $(PLAIN_OPS) --dir $(CRASHTEST_DIR)/debug-$$m $(if $(CRASH_SEED),--seed $(CRASH_SEED)) \
	    $(if $(WRITE_FAULTS),--write-faults $(WRITE_FAULTS)) || exit 1; \
	done
