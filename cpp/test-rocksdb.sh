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
STRESS_SECONDS=${STRESS_SECONDS:-60}
WORK=${BLOBFS_TEST_DIR:-$(mktemp -d /tmp/blobfs-rocksdb.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -f "$WORK"/*.img' EXIT

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
  --threads=1 --histogram=1 --statistics=0

step "db_stress on BlobFS, file device, ${STRESS_SECONDS}s with verification"
mkdir -p "$WORK/expected"
"$TOOLS/db_stress" \
  --fs_uri="blobfs://file:$WORK/db_stress.img?size=4G;mkfs=always" \
  --db=/db_stress --expected_values_dir="$WORK/expected" \
  --duration="$STRESS_SECONDS" --ops_per_thread=100000000 --threads=4 \
  --max_key=100000 --compression_type=none --destroy_db_initially=1 \
  --reopen=0 --verify_db_one_in=100000 --checkpoint_one_in=0 \
  --backup_one_in=0 --mmap_read=0 --use_direct_reads=0 \
  --use_direct_io_for_flush_and_compaction=0

step "RocksDB tools on BlobFS: all passed"
