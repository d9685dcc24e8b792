#!/usr/bin/env bash
# Instructions per 4 KiB I/O at queue depth 1, submit to completion, counted
# with callgrind: each path and operation runs twice, with $IOPATH_OPS and
# with $IOPATH_BASE_OPS operations (same setup), and the difference in
# instructions is divided by the difference in operations, so setup and
# teardown cancel out. The load loop (random offsets, latency clock reads)
# is included, as it is for every path.
#
# Prints one line per path and operation: iopath PATH OP INSTRUCTIONS_PER_IO
#   nvme-raw   the NVMe driver on its software controller (commands
#              completed in memory: the controller's own work is counted)
#   nvme-blob  a blob read/write on that driver
#   mem-raw    MemDevice
#   mem-blob   a blob read/write on MemDevice
# Usage: benches/iopath.sh <path to the iopath binary>
set -euo pipefail
bin=${1:?usage: iopath.sh <iopath binary>}
ops=${IOPATH_OPS:-20000}
base=${IOPATH_BASE_OPS:-5000}
if ! command -v valgrind >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing valgrind"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
  else
    echo "valgrind not found: install it (apt-get install valgrind)"; exit 1
  fi
fi

count() { # target op ops device -> instructions
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 1 "$3" "$4" 2>&1 >/dev/null |
    sed -n 's/.*Collected : *\([0-9]*\).*/\1/p'
}

for path in nvme-raw nvme-blob mem-raw mem-blob; do
  case $path in
    nvme-*) dev=soft-nvme ;;
    mem-*) dev=mem:67108864 ;;
  esac
  target=${path#*-}
  for op in read write; do
    hi=$(count "$target" "$op" "$ops" "$dev")
    lo=$(count "$target" "$op" "$base" "$dev")
    [ -n "$hi" ] && [ -n "$lo" ] || { echo "iopath $path $op: callgrind gave no count"; exit 1; }
    echo "iopath $path $op $(( (hi - lo) / (ops - base) ))"
  done
done
