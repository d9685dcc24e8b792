#!/usr/bin/env bash
# RocksDB's own tools on BlobFS: env_basic_test (memory and file device),
# db_bench smoke on a file device, db_stress for a minute with verification.
# Called by `make test-rocksdb` after `make rocksdb-tools`; the Rust
# integration tests (rocksdb-env/tests) run from the Makefile too.
#
#   cpp/test-rocksdb.sh <dir with db_bench, db_stress, env_basic_test>
#
# Images go to $BLOBFS_TEST_DIR (default: a fresh directory under /tmp) and
# are removed at the end.
set -euo pipefail

TOOLS=${1:?usage: test-rocksdb.sh <tools dir>}
# About a minute of db_stress on an idle 2-core machine (db_stress has no
# time limit flag; 4 threads x this many operations).
STRESS_OPS=${STRESS_OPS:-200000}
WORK=${BLOBFS_TEST_DIR:-$(mktemp -d /tmp/blobfs-rocksdb.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -rf "$WORK"/*.img "$WORK/expected"' EXIT

step() { printf '\n=== %s\n' "$*"; }

# env_basic_test: every test of the file, with the CustomEnv instances on
# BlobFS. Its EnvMoreTestWithParam.GetChildrenIgnoresDotAndDotDot uses
# Env::Default() under the test directory, so that directory must exist on
# the host too (RocksDB's own CustomEnv runs have the same need).
mkdir -p "/tmp/rocksdbtest-$(id -u)"
step "env_basic_test on BlobFS, memory device"
TEST_FS_URI="blobfs://mem:1G" "$TOOLS/env_basic_test"

step "env_basic_test on BlobFS, file device"
TEST_FS_URI="blobfs://file:$WORK/env_basic.img?size=1G;mkfs=always" \
  "$TOOLS/env_basic_test"

step "db_bench on BlobFS, file device"
"$TOOLS/db_bench" \
  --fs_uri="blobfs://file:$WORK/db_bench.img?size=4G;mkfs=always" \
  --db=/db_bench --benchmarks=fillseq,readrandom,overwrite,readwhilewriting \
  --num=100000 --reads=20000 --value_size=100 --compression_type=none \
  --threads=1 --progress_reports=0 --statistics=0

step "db_stress on BlobFS, file device, 4 x $STRESS_OPS ops, 5 reopens, verification on"
# Flags that differ from db_stress's defaults, and why:
#   --compression_manager=none  the default "mixed" manager crashes (SIGSEGV in
#       MultiCompressorWrapper::MaybeCloneSpecialized) in a RocksDB built
#       without compression libraries, on the POSIX file system too
#   --read_fault_one_in=0 --metadata_read_fault_one_in=0  db_stress refuses
#       read faults in a release (NDEBUG) build (they need SyncPoint); the
#       write faults run in their own step below
#   --clear_column_family_one_in=0  required with --expected_values_dir
#   --compression_type=none  no compression libraries are linked
# Expected values live on the host (db_stress keeps them in Env::Default()).
rm -rf "$WORK/expected" && mkdir -p "$WORK/expected"
"$TOOLS/db_stress" \
  --fs_uri="blobfs://file:$WORK/db_stress.img?size=4G;mkfs=always" \
  --db=/db_stress --expected_values_dir="$WORK/expected" \
  --ops_per_thread="$STRESS_OPS" --threads=4 --reopen=5 --max_key=100000 \
  --verify_db_one_in=100000 --destroy_db_initially=1 \
  --compression_manager=none --compression_type=none \
  --read_fault_one_in=0 --metadata_read_fault_one_in=0 \
  --clear_column_family_one_in=0 \
  --progress_reports=0

step "db_stress fault injection on BlobFS, file device: open-time write faults, sync faults"
# What a release build of db_stress injects, through RocksDB's
# FaultInjectionTestFS wrapped around our FileSystem:
#   --open_write_fault_one_in, --open_metadata_write_fault_one_in  errors on
#       writes and metadata writes (create, rename, sync dir...) while the DB
#       opens; db_stress then checks the open fails cleanly and retries
#   --sync_fault_injection=1  unsynced data dropped at each reopen
#   --write_fault_one_in, --metadata_write_fault_one_in  accepted, but their
#       per-operation injection is compiled only without NDEBUG
#       (db_stress_test_base.cc), so in this build they inject nothing
# Read faults (--read_fault_one_in, --metadata_read_fault_one_in) and the
# per-operation write faults need a debug build of RocksDB: the opt-in
# `make crashtest-rocksdb-debug` builds one (a second RocksDB, not in
# `make test`) and runs them all in the crash loops. rocksdb-env's own tests
# inject device read and write errors under BlobFS through
# fault_injection=on.
# --reopen=0: with open faults and reopens, db_stress fails its pre-reopen WAL
# flush ("Writer has previous error") on the POSIX file system too.
rm -rf "$WORK/expected" && mkdir -p "$WORK/expected"
"$TOOLS/db_stress" \
  --fs_uri="blobfs://file:$WORK/db_fault.img?size=2G;mkfs=always" \
  --db=/db_fault --expected_values_dir="$WORK/expected" \
  --ops_per_thread="$((STRESS_OPS / 4))" --threads=2 --reopen=0 --max_key=20000 \
  --destroy_db_initially=1 --compression_manager=none --compression_type=none \
  --read_fault_one_in=0 --metadata_read_fault_one_in=0 \
  --write_fault_one_in=1000 --metadata_write_fault_one_in=1000 \
  --open_write_fault_one_in=16 --open_metadata_write_fault_one_in=16 \
  --sync_fault_injection=1 --clear_column_family_one_in=0 --progress_reports=0

step "RocksDB tools on BlobFS: all passed"
