#!/usr/bin/env bash
# RocksDB's own tools on BlobFS: env_basic_test (memory and file device),
# the README's db_bench command as written, ldb and sst_dump on the database
# it leaves, db_bench smoke on a file device, db_stress for a minute with
# verification (with its default compression), db_stress fault injection.
# Called by `make test-rocksdb` after `make rocksdb-tools`; the Rust
# integration tests (rocksdb-env/tests) run from the Makefile too.
#
#   cpp/test-rocksdb.sh <dir with db_bench, db_stress, env_basic_test, ldb, sst_dump>
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
# Removes images, each with its unsynced memory first (named by the
# image's device and inode numbers, see blobstore::device::unsynced_memory_path).
rm_images() {
  for img in "$@"; do
    [ -f "$img" ] || continue
    read -r dev ino < <(stat -c '%d %i' "$img")
    rm -f "$(printf '%s/blobstack-%x-%x.unsynced' "${BLOBSTACK_UNSYNCED_DIR:-/dev/shm}" "$dev" "$ino")"
    rm -f "$img"
  done
}
trap 'rm_images "$WORK"/*.img; rm -rf "$WORK/expected"' EXIT

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

step "README: the 'RocksDB on BlobFS' commands as written (db_bench's default compression, Snappy)"
# The sh block under that heading, with target/rocksdb/ meaning $TOOLS and
# `make rocksdb-tools` already done. Its image path is the README's.
README=$(dirname "$0")/../README.md
readme_cmds=$(awk '/^### RocksDB on BlobFS/ { f = 1; next }
  f && /^```sh/ { g = 1; next }  g && /^```/ { exit }  g' "$README" |
  grep -v '^make ' | sed "s#target/rocksdb/#$TOOLS/#g")
readme_img=$(printf '%s\n' "$readme_cmds" | grep -o "file:[^?;']*" | head -1)
readme_img=${readme_img#file:}
[ -n "$readme_cmds" ] && [ -n "$readme_img" ] ||
  { echo "no RocksDB on BlobFS command block in $README"; exit 1; }
trap 'rm_images "$WORK"/*.img "$readme_img"; rm -rf "$WORK/expected"' EXIT
printf '%s\n' "$readme_cmds"
bash -euo pipefail -c "$readme_cmds" 2>&1 | tee "$WORK/readme.log"
grep -q '^readrandom' "$WORK/readme.log" ||
  { echo "the README's db_bench printed no readrandom result"; exit 1; }

step "ldb and sst_dump on the README's database"
URI="blobfs://file:$readme_img;mkfs=never"
"$TOOLS/ldb" --fs_uri="$URI" --db=/bench put blobfs-key blobfs-value
got=$("$TOOLS/ldb" --fs_uri="$URI" --db=/bench get blobfs-key)
[ "$got" = blobfs-value ] || { echo "ldb get: '$got'"; exit 1; }
keys=$("$TOOLS/ldb" --fs_uri="$URI" --db=/bench scan --max_keys=1000 --hex | wc -l)
[ "$keys" -eq 1000 ] || { echo "ldb scan listed $keys keys, not 1000"; exit 1; }
"$TOOLS/ldb" --fs_uri="$URI" --db=/bench checkconsistency
"$TOOLS/sst_dump" --fs_uri="$URI" --file=/bench --command=check --show_properties \
  > "$WORK/sst_dump.log"
# RocksDB 11 names the compression of an SST file by its compression
# manager and type byte: BuiltinV2 with 01, kSnappyCompression.
grep -q 'SST file compression algo: BuiltinV2;01;' "$WORK/sst_dump.log" ||
  { grep 'compression algo' "$WORK/sst_dump.log" | head -5
    echo "sst_dump: no Snappy-compressed SST file"; exit 1; }
echo "ldb put/get/scan/checkconsistency and sst_dump check: OK ($(grep -c 'Process ' "$WORK/sst_dump.log") SST files)"

step "db_bench on BlobFS, file device"
"$TOOLS/db_bench" \
  --fs_uri="blobfs://file:$WORK/db_bench.img?size=4G;mkfs=always" \
  --db=/db_bench --benchmarks=fillseq,readrandom,overwrite,readwhilewriting \
  --num=100000 --reads=20000 --value_size=100 --compression_type=none \
  --threads=1 --progress_reports=0 --statistics=0

step "db_stress on BlobFS, file device, 4 x $STRESS_OPS ops, 5 reopens, verification on"
# Flags that differ from db_stress's defaults, and why (its compression
# defaults stand: Snappy and the "mixed" compression manager):
#   --read_fault_one_in=0 --metadata_read_fault_one_in=0  db_stress refuses
#       read faults in a release (NDEBUG) build (they need SyncPoint); the
#       write faults run in their own step below
#   --clear_column_family_one_in=0  required with --expected_values_dir
# Expected values live on the host (db_stress keeps them in Env::Default()).
rm -rf "$WORK/expected" && mkdir -p "$WORK/expected"
"$TOOLS/db_stress" \
  --fs_uri="blobfs://file:$WORK/db_stress.img?size=4G;mkfs=always" \
  --db=/db_stress --expected_values_dir="$WORK/expected" \
  --ops_per_thread="$STRESS_OPS" --threads=4 --reopen=5 --max_key=100000 \
  --verify_db_one_in=100000 --destroy_db_initially=1 \
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
  --destroy_db_initially=1 \
  --read_fault_one_in=0 --metadata_read_fault_one_in=0 \
  --write_fault_one_in=1000 --metadata_write_fault_one_in=1000 \
  --open_write_fault_one_in=16 --open_metadata_write_fault_one_in=16 \
  --sync_fault_injection=1 --clear_column_family_one_in=0 --progress_reports=0

step "RocksDB tools on BlobFS: all passed"
