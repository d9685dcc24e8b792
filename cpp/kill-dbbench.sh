#!/usr/bin/env bash
# What a killed db_bench leaves, on BlobFS and on the host file system, with
# the same flags: RocksDB's default `sync=false` with the WAL on, which
# RocksDB documents as losing nothing when only the process dies.
#
#   cpp/kill-dbbench.sh <dir with db_bench> [work dir]   (make kill-dbbench)
#
# Two experiments per side, each followed by `readseq` on the reopened DB:
# - "after": fillseq of NUM keys runs to the end (every write acknowledged),
#   then db_bench goes on reading and is SIGKILLed: all NUM keys must come
#   back.
# - "during": fillseq is SIGKILLed SECS seconds in: the keys that come back
#   are counted (a prefix, by fillseq's order and RocksDB's WAL replay).
# Exit status 1 when a side loses an acknowledged key in "after".
set -euo pipefail

TOOLS=${1:?usage: kill-dbbench.sh <tools dir> [work dir]}
WORK=${2:-$(mktemp -d /tmp/kill-dbbench.XXXXXX)}
NUM=${NUM:-3000000}
SECS=${SECS:-4}
mkdir -p "$WORK"

COMMON=(--num="$NUM" --value_size=100 --sync=false --compression_type=none
  --compression_manager=none --threads=1 --progress_reports=0 --statistics=0)

# Per side: db_bench's file-system flags.
side_args() {
  case $1 in
    blobfs) echo "--fs_uri=blobfs://file:$WORK/kill.img?size=8G;mkfs=$2 --db=/kill" ;;
    posix) echo "--db=$WORK/posix-db" ;;
  esac
}

# Keys readseq finds in the side's database.
count_keys() {
  # shellcheck disable=SC2046
  "$TOOLS/db_bench" $(side_args "$1" never) "${COMMON[@]}" --use_existing_db=1 \
    --benchmarks=readseq 2>&1 | sed -n 's/^readseq .* \([0-9][0-9]*\) operations;.*/\1/p'
}

fresh() {
  # The image's unsynced memory goes with it (see BlockDevice::unsynced_memory).
  if [ -e "$WORK/kill.img" ]; then
    read -r dev ino < <(stat -c '%d %i' "$WORK/kill.img")
    rm -f "${BLOBSTACK_UNSYNCED_DIR:-/dev/shm}/blobstack-$(printf %x "$dev")-$(printf %x "$ino").unsynced"
  fi
  rm -rf "$WORK/posix-db" "$WORK/kill.img"
}

status=0
for side in blobfs posix; do
  # After fillseq: every write was acknowledged when the kill comes.
  fresh
  log=$WORK/$side-after.log
  : >"$log"
  # shellcheck disable=SC2046
  "$TOOLS/db_bench" $(side_args $side always) "${COMMON[@]}" \
    --benchmarks=fillseq,readrandom --reads=1000000000 >"$log" 2>&1 &
  pid=$!
  until grep -q '^fillseq ' "$log"; do
    kill -0 $pid 2>/dev/null || { echo "$side: db_bench exited early"; cat "$log"; exit 2; }
    sleep 0.2
  done
  sleep 0.5
  kill -9 $pid
  wait $pid 2>/dev/null || true
  got=$(count_keys $side)
  verdict=ok
  [ "$got" = "$NUM" ] || { verdict="LOST $((NUM - ${got:-0}))"; status=1; }
  echo "kill-dbbench $side after-fillseq: $got of $NUM acknowledged keys back ($verdict)"

  # During fillseq.
  fresh
  # shellcheck disable=SC2046
  "$TOOLS/db_bench" $(side_args $side always) "${COMMON[@]}" \
    --benchmarks=fillseq >"$WORK/$side-during.log" 2>&1 &
  pid=$!
  sleep "$SECS"
  kill -9 $pid
  wait $pid 2>/dev/null || true
  echo "kill-dbbench $side during-fillseq (killed after ${SECS}s): $(count_keys $side) keys back"
done
fresh
exit $status
