#!/usr/bin/env bash
# Instructions per 4 KiB I/O at queue depth 1, submit to completion, counted
# with callgrind: each path and operation runs twice, with $IOPATH_OPS and
# with $IOPATH_BASE_OPS operations (same setup), and the difference in
# instructions is divided by the difference in operations, so setup and
# teardown cancel out. The load loop (random offsets, latency clock reads)
# is included, as it is for every path.
#
# Prints one line per path and operation: iopath PATH OP INSTRUCTIONS_PER_IO
#   nvme-raw     the NVMe driver on its software controller (commands
#                completed in memory: the controller's own work is counted)
#   nvme-driver  the driver's own share of nvme-raw (see below)
#   nvme-blob    a blob read/write on that driver
#   mem-raw      MemDevice
#   mem-blob     a blob read/write on MemDevice
#   mem-fs-straight, mem-fs-bounce (reads only)  a BlobFS direct read of
#                4 KiB on MemDevice straight into the caller's buffer, and
#                the same through a DMA buffer and a copy (see iopath.rs)
#
# nvme-driver runs nvme-raw again with callgrind collecting nothing at start
# and --toggle-collect on five functions, so that what is counted is:
#   + everything inside the driver's two entry points, the channel layer's
#     calls of NamespaceBackend's ChannelBackend::submit and ::reap (made
#     through the backend's vtable, so never inlined away): command and
#     tracker setup, PRPs, doorbells, completion handling, the periodic
#     clock and controller checks, and every reap the executor makes,
#     the empty ones included;
#   - the software controller's register accesses inside them
#     (SoftController's Bar::read32 and ::write32): there the model fetches
#     the command, walks the PRPs, copies the 4 KiB and posts the
#     completion, work a hardware controller does; the call instruction
#     into the model stays counted, as the MMIO access it stands for;
#   - the channel's completion callback (IoChannel::poll's closure) that a
#     reap calls per finished op: channel-layer work every device pays
#     (mem-raw too).
# A toggle function entered outside the driver (the model's registers
# during setup) switches collection on for its duration; that is setup,
# the same in both runs, and cancels in the difference. A renamed entry
# point collects nothing, which is reported as an error, not a zero.
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

count() { # target op ops device [callgrind options] -> instructions
  local target=$1 op=$2 n=$3 dev=$4
  shift 4
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" "$bin" "$target" "$op" 1 "$n" "$dev" 2>&1 >/dev/null |
    sed -n 's/.*Collected : *\([0-9]*\).*/\1/p'
}

nvme=blobstore::device::nvme
driver_only=(
  --collect-atstart=no
  "--toggle-collect=<$nvme::NamespaceBackend as blobstore::device::ChannelBackend>::submit"
  "--toggle-collect=<$nvme::NamespaceBackend as blobstore::device::ChannelBackend>::reap"
  "--toggle-collect=<$nvme::soft::SoftController as $nvme::regs::Bar>::read32"
  "--toggle-collect=<$nvme::soft::SoftController as $nvme::regs::Bar>::write32"
  "--toggle-collect=blobstore::device::IoChannel::poll::{{closure}}"
)

for path in nvme-raw nvme-driver nvme-blob mem-raw mem-blob mem-fs-straight mem-fs-bounce; do
  opts=()
  ops_of=(read write)
  case $path in
    nvme-driver) dev=soft-nvme target=raw opts=("${driver_only[@]}") ;;
    nvme-*) dev=soft-nvme target=${path#*-} ;;
    mem-fs-*) dev=mem:67108864 target=${path#mem-} ops_of=(read) ;;
    mem-*) dev=mem:67108864 target=${path#*-} ;;
  esac
  for op in "${ops_of[@]}"; do
    hi=$(count "$target" "$op" "$ops" "$dev" "${opts[@]}")
    lo=$(count "$target" "$op" "$base" "$dev" "${opts[@]}")
    [ -n "$hi" ] && [ -n "$lo" ] || { echo "iopath $path $op: callgrind gave no count"; exit 1; }
    [ "$hi" -gt "$lo" ] || { echo "iopath $path $op: nothing collected per I/O (entry points renamed?)"; exit 1; }
    echo "iopath $path $op $(( (hi - lo) / (ops - base) ))"
  done
done
