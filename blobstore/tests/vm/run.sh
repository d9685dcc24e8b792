#!/usr/bin/env bash
# The NVMe driver's VM test: boots QEMU (TCG) with an emulated NVMe
# controller behind an emulated Intel IOMMU, binds it to vfio-pci inside the
# guest, and runs there:
#   - tests/nvme_vm.rs (identify, I/O, threads, errors, blobstore + reset),
#   - the core blobstore suite (tests/blobstore.rs) on NvmeDevice,
#   - the bdevperf tool on the controller and on MemDevice, and a QD32 read
#     with and without shadow doorbells: IOPS, IOPS per guest CPU second
#     (from the guest's /proc/stat) and the ratio, three runs each,
#     alternating, medians,
#   - BlobFS's kill test (blobfs/tests/kill.rs) on both namespaces: a child
#     killed with unsynced appends in hugepage memory and live queues; the
#     next open resets the controller and the mount writes them back,
#   - RocksDB on BlobFS on both namespaces: env_basic_test, db_bench,
#     db_stress with verification, and strict kill rounds of
#     rocksdb-crashtest (every acknowledged write back after each kill),
#   - nvme-setup's refusals (a function that is not NVMe, a namespace that
#     holds data) and db_bench on nvme: as an unprivileged user, after
#     `nvme-setup bind --user` (and refused with a clear message when its
#     locked-memory limit is too low).
#   - the NVMe/TCP transport against the kernel's own target (nvmet and
#     nvmet-tcp on 127.0.0.1, one subsystem, namespace 1 on a ramdisk with
#     512-byte blocks, namespace 2 on a file of ext4 on a ramdisk with
#     4096-byte blocks): tests/nvme_tcp_vm.rs (identify, I/O, digests,
#     threads, errors, the target going away mid-I/O and coming back), the
#     core blobstore suite on nvme-tcp:, bdevperf, and BlobFS's kill test and
#     RocksDB (env_basic_test, db_bench) on nvme-tcp:.
# Reports pass/fail per test from the serial console; exits non-zero on any
# failure, or when the VM does not finish within VM_TIMEOUT seconds.
#
# VM_ONLY=tcp runs only the NVMe/TCP steps that need no RocksDB tools or
# BlobFS (nvme_tcp_vm, the blobstore suite and bdevperf on nvme-tcp:): no
# ROCKSDB_TOOLS needed, a few minutes.
#
# VM_MODE=bench (make bench-vm) boots the same VM to measure instead: the
# device layer alone, our driver (`bdevperf`) against the kernel's NVMe path on
# the same namespace (fio: io_uring with O_DIRECT on the block device, with
# interrupts and on polled queues, and io_uring passthrough on the generic
# char device), 4 KiB random read and write at QD1 and QD32 (ours with
# completion interrupts, as by default, and without: always polling), sides
# alternating (the controller is rebound between vfio-pci and nvme),
# BENCH_ROUNDS (3) rounds of BENCH_SECONDS (5) each; IOPS and IOPS per
# guest CPU second (all of the guest's non-idle CPU in /proc/stat, so the
# kernel's interrupt and completion work counts), medians, as a table.
# Then, in the same VM, `kvbench --configs nvme`: RocksDB's db_bench on
# BlobFS on our driver (namespace 3) against db_bench on ext4 on the
# kernel's nvme driver (namespace 4, same size and format, same
# controller), sides alternating, the controller rebound between them,
# page cache dropped before each run, the guest's whole CPU per op;
# KVBENCH_VM_ARGS (--keys 500000 --duration 30) sets the scale. It runs
# once per KV_MODES entry ("interrupts polled": BlobFS with the driver's
# completion interrupts, the default, and without); the tables are printed
# and the JSON kept as $VM_WORK/kvbench-<mode>.json.
#
# Needs Debian (as root: installs qemu-system-x86, linux-image-amd64,
# busybox-static and cpio when missing; for the bench also fio and
# e2fsprogs). Environment:
#   CARGO (cargo), CARGO_TARGET_DIR, VM_TIMEOUT (1800; bench 4800), VM_WORK (a temp dir),
#   VM_CPUS (2), VM_KEEP=1 keeps the work dir, ROCKSDB_TOOLS (the directory
#   of `make rocksdb-tools`' db_bench, db_stress and env_basic_test: required).
#   VM_MEM (MiB; 3072, bench 4096), VM_ONLY (empty, or tcp: see above).
set -euo pipefail

MODE=${VM_MODE:-test}
case $MODE in test|bench) ;; *) echo "VM_MODE=$MODE: test or bench" >&2; exit 1 ;; esac
ONLY=${VM_ONLY:-}
case $ONLY in ""|tcp) ;; *) echo "VM_ONLY=$ONLY: empty or tcp" >&2; exit 1 ;; esac
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_SECONDS=${BENCH_SECONDS:-5}
KVBENCH_VM_ARGS=${KVBENCH_VM_ARGS:---keys 500000 --duration 30}
KV_MODES=${KV_MODES:-interrupts polled}
if [ "$MODE" = bench ]; then MEM=${VM_MEM:-4096}; else MEM=${VM_MEM:-3072}; fi
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
CARGO=${CARGO:-cargo}
if [ "$MODE" = bench ]; then TIMEOUT=${VM_TIMEOUT:-4800}; else TIMEOUT=${VM_TIMEOUT:-1800}; fi
CPUS=${VM_CPUS:-2}
WORK=${VM_WORK:-$(mktemp -d /tmp/nvme-vm.XXXXXX)}
mkdir -p "$WORK"
[ "${VM_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
log() { echo "[vm-test $(date +%T)] $*"; }

# 1. Host packages.
PKGS="qemu-system-x86 busybox-static linux-image-amd64 cpio e2fsprogs"
[ "$MODE" = bench ] && PKGS="$PKGS fio"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  log "installing:$missing"
  if [ "$(id -u)" != 0 ]; then echo "run as root, or install:$missing" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
KVER=$(ls /lib/modules | grep -- '-amd64$' | sort -V | tail -1 || true)
[ -n "$KVER" ] && [ -f "/boot/vmlinuz-$KVER" ] || { echo "no Debian amd64 kernel in /boot" >&2; exit 1; }
log "guest kernel $KVER"

# 2. Test binaries.
cd "$ROOT"
log "building (release)"
$CARGO build --release -q -p blobstore --bins
$CARGO build --release -q -p benches --bin bdevperf
json=$($CARGO test --release -q -p blobstore --test nvme_vm --test nvme_tcp_vm --test blobstore --no-run --message-format=json)
[ -n "$ONLY" ] || json="$json
$($CARGO test --release -q -p blobfs --features cli --test kill --no-run --message-format=json)"
exe_of() { echo "$json" | grep -o "\"executable\":\"[^\"]*/$1-[0-9a-f]*\"" | tail -1 | cut -d'"' -f4; }
NVME_VM=$(exe_of nvme_vm)
NVME_TCP_VM=$(exe_of nvme_tcp_vm)
SUITE=$(exe_of blobstore)
KILL=$(exe_of kill || true)
TARGET=$(dirname "$(dirname "$NVME_VM")")
[ -x "$NVME_VM" ] && [ -x "$NVME_TCP_VM" ] && [ -x "$SUITE" ] || { echo "test binaries not found" >&2; exit 1; }
[ -n "$ONLY" ] || [ -x "$KILL" ] || { echo "blobfs kill test binary not found" >&2; exit 1; }
if [ -n "$ONLY" ]; then
  TOOLS=""
else
  TOOLS=${ROCKSDB_TOOLS:?set ROCKSDB_TOOLS to the directory of make rocksdb-tools}
fi
if [ -n "$ONLY" ]; then
  :
elif [ "$MODE" = test ]; then
  $CARGO build --release -q -p rocksdb-env --features testing --bin rocksdb-crashtest
  for t in db_bench db_stress env_basic_test; do
    [ -x "$TOOLS/$t" ] || { echo "$TOOLS/$t not found (make rocksdb-tools)" >&2; exit 1; }
  done
else
  $CARGO build --release -q -p benches --bin kvbench
  [ -x "$TOOLS/db_bench" ] || { echo "$TOOLS/db_bench not found (make rocksdb-tools)" >&2; exit 1; }
fi

# 3. Initramfs: busybox, vfio modules of the Debian kernel, binaries, libs.
IRD="$WORK/initramfs"
rm -rf "$IRD"
mkdir -p "$IRD"/{bin,dev,proc,sys,tmp,etc,lib/modules}
# A user to run the database as (nvme-setup bind --user).
printf 'root:x:0:0:root:/:/bin/sh\ndbuser:x:1000:1000:db:/tmp:/bin/sh\n' > "$IRD/etc/passwd"
printf 'root:x:0:\ndbuser:x:1000:\n' > "$IRD/etc/group"
cp /bin/busybox "$IRD/bin/busybox"
cp "$NVME_VM" "$IRD/bin/nvme_vm"
cp "$NVME_TCP_VM" "$IRD/bin/nvme_tcp_vm"
cp "$SUITE" "$IRD/bin/blobstore_suite"
[ -n "$ONLY" ] || cp "$KILL" "$IRD/bin/blobfs_kill"
cp "$TARGET/bdevperf" "$TARGET/nvme-setup" "$IRD/bin/"
# The NVMe/TCP target's namespace 2 is a file on ext4 (on a ramdisk).
cp "$(command -v mkfs.ext4)" "$IRD/bin/"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$IRD/etc/"
echo "VM_ONLY=$ONLY" > "$IRD/vm.conf"
if [ "$MODE" = bench ]; then
  cp "$(command -v fio)" "$IRD/bin/fio"
  printf 'ROUNDS=%s\nSECS=%s\nKVBENCH_ARGS="%s"\nKV_MODES="%s"\n' "$BENCH_ROUNDS" "$BENCH_SECONDS" \
    "$KVBENCH_VM_ARGS" "$KV_MODES" > "$IRD/bench.conf"
fi
if [ -n "$ONLY" ]; then
  :
elif [ "$MODE" = test ]; then
  cp "$TOOLS/db_bench" "$TOOLS/db_stress" "$TOOLS/env_basic_test" "$TARGET/rocksdb-crashtest" "$IRD/bin/"
  # rocksdb-crashtest line-buffers db_stress's output through stdbuf, to see
  # when the workload starts (and time the kill from there).
  mkdir -p "$IRD/usr/bin" "$IRD/usr/libexec/coreutils"
  cp /usr/bin/stdbuf "$IRD/usr/bin/"
  cp /usr/libexec/coreutils/libstdbuf.so "$IRD/usr/libexec/coreutils/"
else
  cp "$TOOLS/db_bench" "$TARGET/kvbench" "$IRD/bin/"
fi
for b in "$IRD"/bin/*; do
  # busybox is static (ldd fails on it).
  case $b in */busybox) continue ;; esac
  ldd "$b" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$IRD$(dirname "$lib")"
    cp -nL "$lib" "$IRD$lib"
  done
done
MODDIR=/lib/modules/$KVER
: > "$IRD/modules.order"
add_module() { # $1: path relative to $MODDIR; dependencies first
  local m=$1 deps d
  grep -qx "$(basename "$m")" "$IRD/modules.order" && return 0
  deps=$(grep "^$m:" "$MODDIR/modules.dep" | cut -d: -f2)
  for d in $(echo "$deps" | tr ' ' '\n' | tac); do add_module "$d"; done
  cp "$MODDIR/$m" "$IRD/lib/modules/"
  basename "$m" >> "$IRD/modules.order"
}
# The kernel's own nvme driver too: nvme-setup must take the function from it.
for m in kernel/drivers/vfio/vfio_iommu_type1.ko kernel/drivers/vfio/pci/vfio-pci.ko \
         kernel/drivers/nvme/host/nvme.ko; do
  add_module "$m"
done
# ext4 for kvbench's POSIX side and the NVMe/TCP target's file namespace
# (crc32c: its metadata checksums); the kernel's NVMe/TCP target, and a
# ramdisk to back it.
for m in kernel/crypto/crc32c_generic.ko kernel/fs/ext4/ext4.ko \
         kernel/drivers/nvme/target/nvmet.ko kernel/drivers/nvme/target/nvmet-tcp.ko \
         kernel/drivers/block/brd.ko; do
  add_module "$m"
done
# The kernel's NVMe/TCP initiator, for the bench's comparison.
[ "$MODE" = bench ] && add_module kernel/drivers/nvme/host/nvme-tcp.ko
cat > "$IRD/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
  case $m in vfio_iommu_type1.ko) insmod /lib/modules/$m allow_unsafe_interrupts=1 ;;
             # Polled queues, for the bench's io_uring hipri side.
             nvme.ko) insmod /lib/modules/$m poll_queues=1 ;;
             # Two 256 MiB ramdisks for the NVMe/TCP target.
             brd.ko) insmod /lib/modules/$m rd_nr=2 rd_size=262144 ;;
             *) insmod /lib/modules/$m ;; esac
done
export RUST_BACKTRACE=1 PATH=/bin
. /vm.conf
echo "VMTEST: guest up, kernel $(uname -r), $(nproc) cpus"
nvme-setup hugepages 256
PCI=""
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/class)" = 0x010802 ] && PCI=$(basename $d)
done
FAILED=""
run() { # name, command...
  name=$1; shift
  echo "VMTEST-BEGIN $name"
  start=$(date +%s)
  "$@"; rc=$?
  echo "VMTEST-END $name rc=$rc seconds=$(( $(date +%s) - start ))"
  [ $rc = 0 ] || FAILED="$FAILED $name"
}
# Non-idle time of every CPU together, in centiseconds: elapsed time
# (/proc/uptime) times CPUs minus idle and iowait (/proc/stat, USER_HZ 100),
# so kernel threads and interrupts count. Not the sum of /proc/stat's user
# and system times: those are sampled at timer ticks, which a TCG guest
# loses (a polling process showed under one CPU second per second).
NCPU=$(nproc)
cpu_busy() {
  read -r up _ < /proc/uptime
  read -r _ _ _ _ idle iow _ < /proc/stat
  echo $(( ${up%.*}${up#*.} * NCPU - idle - iow ))
}
# The kernel's NVMe/TCP target on loopback: one subsystem, namespace 1 on
# a ramdisk (512-byte blocks), namespace 2 on a file of ext4 on another
# (4096-byte blocks: the file's block size), port 1 on 127.0.0.1:4420.
NQN=nqn.2024-01.io.blobstack:vm
NVMET=/sys/kernel/config/nvmet
TCP_SPEC=nvme-tcp:127.0.0.1:4420/$NQN
tcp_target_up() {
  mount -t configfs none /sys/kernel/config 2>/dev/null
  ip link set lo up || return 1
  mkfs.ext4 -q -F -b 4096 /dev/ram1 && mkdir -p /mnt/tcpns && mount -t ext4 /dev/ram1 /mnt/tcpns || return 1
  dd if=/dev/zero of=/mnt/tcpns/ns2.img bs=1M count=0 seek=192 2>/dev/null || return 1
  S=$NVMET/subsystems/$NQN
  mkdir $S && echo 1 > $S/attr_allow_any_host || return 1
  mkdir $S/namespaces/1 && echo -n /dev/ram0 > $S/namespaces/1/device_path &&
    echo 1 > $S/namespaces/1/enable || return 1
  mkdir $S/namespaces/2 && echo -n /mnt/tcpns/ns2.img > $S/namespaces/2/device_path &&
    echo 1 > $S/namespaces/2/enable || return 1
  P=$NVMET/ports/1
  mkdir $P && echo tcp > $P/addr_trtype && echo ipv4 > $P/addr_adrfam &&
    echo 127.0.0.1 > $P/addr_traddr && echo 4420 > $P/addr_trsvcid || return 1
  ln -s $S $P/subsystems/$NQN
}
EOF
if [ "$MODE" = test ]; then cat >> "$IRD/init" <<'EOF'
# NVMe/TCP: our initiator against the kernel's target on loopback.
run nvme-tcp-target-up tcp_target_up
NVME_TCP_TEST_SPEC=$TCP_SPEC NVME_TCP_TEST_CONFIGFS=$NVMET run nvme-tcp-driver \
  nvme_tcp_vm --ignored --test-threads=1 --nocapture
BLOBSTORE_TEST_NVME_TCP=$TCP_SPEC run blobstore-suite-on-nvme-tcp blobstore_suite --test-threads=1
run bdevperf-nvme-tcp-randread bdevperf --device $TCP_SPEC/ns=2 --qd 32 --bs 4096 --rw randread --seconds 4
run bdevperf-nvme-tcp-randrw-2threads bdevperf --device $TCP_SPEC/ns=1 --qd 32 --bs 4096 --rw randrw --mix 70 --seconds 4 --threads 2
run bdevperf-nvme-tcp-seqwrite-128k bdevperf --device "$TCP_SPEC/ns=2?digest=both" --qd 8 --bs 131072 --rw write --seconds 4
if [ -z "$VM_ONLY" ]; then
  # BlobFS and RocksDB on nvme-tcp: (need the blobfs kill test and the
  # RocksDB tools). Unsynced appends of an nvme-tcp: device live on tmpfs.
  mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
  for ns in 1 2; do
    BLOBFS_KILL_DEVICE=$TCP_SPEC/ns=$ns run blobfs-kill-on-nvme-tcp-ns$ns \
      blobfs_kill a_killed_process_loses_no_acknowledged_write --exact --test-threads=1 --nocapture
    U="blobfs://$TCP_SPEC/ns=$ns;cache=64M"
    mkdir -p /tmp/rocksdbtest-0
    TEST_FS_URI="$U;mkfs=force" run rocksdb-env-basic-nvme-tcp-ns$ns env_basic_test
    run rocksdb-db-bench-nvme-tcp-ns$ns db_bench --fs_uri="$U;mkfs=force" --db=/db_bench \
      --benchmarks=fillseq,readrandom,overwrite --num=50000 --reads=10000 --value_size=100 \
      --compression_type=none --threads=1 --progress_reports=0 --statistics=0
  done
fi
if [ -z "$VM_ONLY" ]; then
# The setup helper: the kernel's nvme driver has the function; namespace 1
# in use (as swap) must make `bind` refuse; once free, bind takes it.
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/nvme0n1 ] && break; sleep 1; done
mkswap /dev/nvme0n1 >/dev/null && swapon /dev/nvme0n1
nvme-setup status
run setup-refuses-busy-device sh -c "! nvme-setup bind $PCI"
swapoff /dev/nvme0n1
# Not in use any more, but it still holds swap: refused too, until wiped.
run setup-refuses-device-holding-data sh -c \
  "nvme-setup bind $PCI 2>&1 | grep -q 'holds a Linux swap area' && ! nvme-setup bind $PCI"
dd if=/dev/zero of=/dev/nvme0n1 bs=4096 count=17 2>/dev/null
# A typo must not take the host bridge (or a NIC, a GPU) from the kernel.
run setup-refuses-non-nvme-function sh -c \
  "nvme-setup bind 0000:00:00.0 2>&1 | grep -q 'host bridge' && ! nvme-setup bind 0000:00:00.0"
run setup-bind nvme-setup bind "$PCI"
ls -l /dev/vfio
export NVME_TEST_PCI=$PCI
run driver nvme_vm --ignored --test-threads=1 --nocapture
BLOBSTORE_TEST_NVME=$PCI run blobstore-suite-on-nvme blobstore_suite --test-threads=1
run bdevperf-nvme-randread bdevperf --device nvme:$PCI/ns=2 --qd 32 --bs 4096 --rw randread --seconds 4
run bdevperf-nvme-randrw-2threads bdevperf --device nvme:$PCI/ns=1 --qd 32 --bs 4096 --rw randrw --mix 70 --seconds 4 --threads 2
run bdevperf-nvme-seqwrite-128k bdevperf --device nvme:$PCI/ns=2 --qd 8 --bs 131072 --rw write --seconds 4
run bdevperf-mem-randread bdevperf --device mem:256M --qd 32 --bs 4096 --rw randread --seconds 4
# Shadow doorbells: the same QD32 random read with and without, sides
# alternating. Guest CPU = cpu_busy, so time QEMU spends trapping a
# doorbell counts.
perf_cpu() { # on|off: prints "IOPS OPS_PER_CPU_SECOND"
  b0=$(cpu_busy)
  out=$(bdevperf --device nvme:$PCI/ns=2 --qd 32 --bs 4096 --rw randread --seconds 3 --shadow-doorbells "$1") || return 1
  b1=$(cpu_busy)
  echo "$out" | sed 's/^/    /' >&2
  ops=$(echo "$out" | sed -n 's/^  worker [0-9]*: \([0-9]*\) ops.*/\1/p' | head -1)
  iops=$(echo "$out" | sed -n 's/^total: \([0-9]*\) IOPS.*/\1/p')
  echo "$iops $(( ops * 100 / ( (b1 - b0) > 0 ? (b1 - b0) : 1 ) ))"
}
median() { sort -n | sed -n 2p; }
ratio() { r=$(( $1 * 1000 / ($2 > 0 ? $2 : 1) )); printf '%d.%03d' $((r / 1000)) $((r % 1000)); }
shadow_compare() {
  : > /tmp/on; : > /tmp/off
  for i in 1 2 3; do
    for side in on off; do
      r=$(perf_cpu $side) || return 1
      echo "VMTEST-PERF shadow-doorbells=$side run=$i iops=${r% *} iops_per_cpu_s=${r#* }"
      echo "$r" >> /tmp/$side
    done
  done
  on_iops=$(cut -d' ' -f1 /tmp/on | median); off_iops=$(cut -d' ' -f1 /tmp/off | median)
  on_cpu=$(cut -d' ' -f2 /tmp/on | median); off_cpu=$(cut -d' ' -f2 /tmp/off | median)
  echo "VMTEST-PERF shadow-doorbells median: on iops=$on_iops iops_per_cpu_s=$on_cpu; off iops=$off_iops iops_per_cpu_s=$off_cpu; ratio on/off iops=$(ratio $on_iops $off_iops) iops_per_cpu_s=$(ratio $on_cpu $off_cpu)"
}
run bdevperf-nvme-shadow-doorbells-on-vs-off shadow_compare
# A killed BlobFS process loses no acknowledged write on NVMe either.
for ns in 1 2; do
  BLOBFS_KILL_DEVICE=nvme:$PCI/ns=$ns run blobfs-kill-on-nvme-ns$ns \
    blobfs_kill a_killed_process_loses_no_acknowledged_write --exact --test-threads=1 --nocapture
done
# RocksDB on BlobFS on NVMe, both namespace formats: the same tools and
# flags as make test-rocksdb on file:, at a scale TCG runs in minutes.
mkdir -p /tmp/rocksdbtest-0
for ns in 1 2; do
  U="blobfs://nvme:$PCI/ns=$ns;cache=64M"
  TEST_FS_URI="$U;mkfs=force" run rocksdb-env-basic-ns$ns env_basic_test
  run rocksdb-db-bench-ns$ns db_bench --fs_uri="$U;mkfs=force" --db=/db_bench \
    --benchmarks=fillseq,readrandom,overwrite --num=50000 --reads=10000 --value_size=100 \
    --compression_type=none --threads=1 --progress_reports=0 --statistics=0
  rm -rf /tmp/expected && mkdir -p /tmp/expected
  run rocksdb-db-stress-ns$ns db_stress --fs_uri="$U;mkfs=force" --db=/db_stress \
    --expected_values_dir=/tmp/expected --ops_per_thread=5000 --threads=2 --reopen=2 \
    --max_key=10000 --verify_db_one_in=100000 --destroy_db_initially=1 \
    --compression_manager=none --compression_type=none --read_fault_one_in=0 \
    --metadata_read_fault_one_in=0 --clear_column_family_one_in=0 --progress_reports=0
  # Seed 2: 10,000 keys, one column family. Kills must land in the
  # workload (past the open), not only in recovery.
  run rocksdb-crashtest-strict-ns$ns sh -c "set -o pipefail; \
    rocksdb-crashtest --db-stress /bin/db_stress --device nvme:$PCI/ns=$ns --mode strict \
      --rounds 3 --seed 2 --min-secs 5 --max-secs 10 --dir /tmp/crashtest-ns$ns \
      | tee /tmp/crashtest.log && grep -q 'rounds past the open: *[1-9]' /tmp/crashtest.log"
done
ls -l /dev/hugepages
# The database without root: the VFIO group goes to dbuser, who runs
# db_bench with the limit nvme-setup asks for, and gets a message naming
# `ulimit -l` when the limit is too low. The root runs above left their
# (root-only) unsynced memory files, which a clean handover removes.
rm -f /dev/hugepages/blobstack-*
cat > /tmp/user-bench.sh <<EOS
db_bench --fs_uri='blobfs://nvme:$PCI/ns=2;cache=64M;mkfs=force' --db=/db_user \
  --num=20000 --reads=5000 --value_size=100 --progress_reports=0 "\$@"
EOS
run setup-bind-for-user sh -c \
  "nvme-setup bind $PCI --user dbuser 2>&1 | tee /tmp/bind.log; grep -q 'owned by dbuser' /tmp/bind.log"
run db-bench-as-user-low-memlock-refused sh -c \
  "ulimit -l 64; ! su dbuser -s /bin/sh -c 'sh /tmp/user-bench.sh --benchmarks=fillseq' >/tmp/low.out 2>&1; \
   grep -o 'ulimit -l.*' /tmp/low.out | head -1; grep -q 'ulimit -l' /tmp/low.out"
run db-bench-as-user sh -c \
  "ulimit -l unlimited; su dbuser -s /bin/sh -c 'id; sh /tmp/user-bench.sh --benchmarks=fillseq,readrandom'"
run setup-unbind-and-bind-again sh -c "nvme-setup unbind $PCI && nvme-setup status && nvme-setup bind $PCI"
fi
if [ -z "$FAILED" ]; then echo "VMTEST-RESULT: PASS"; else echo "VMTEST-RESULT: FAIL:$FAILED"; fi
EOF
else
  cat >> "$IRD/init" <<'EOF'
# The device layer alone: our driver against the kernel's NVMe path on the
# same namespace (2: 4096-byte blocks), sides alternating.
. /bench.conf
NS=2
measure() { # path qd rw command...: one VMBENCH line
  p=$1 qd=$2 rw=$3; shift 3
  b0=$(cpu_busy)
  out=$("$@" 2>&1); rc=$?
  b1=$(cpu_busy)
  case $p in
    ours*) iops=$(echo "$out" | sed -n 's/^total: \([0-9]*\) IOPS.*/\1/p') ;;
    *) f=8; [ "$rw" = randwrite ] && f=49
       iops=$(echo "$out" | tail -1 | cut -d';' -f$f | cut -d. -f1) ;;
  esac
  busy=$((b1 - b0)); [ $busy -gt 0 ] || busy=1
  if [ $rc != 0 ] || [ -z "$iops" ]; then
    echo "$out" | tail -5; echo "VMBENCH-FAIL $p qd=$qd $rw"; FAILED="$FAILED $p-$qd-$rw"; return
  fi
  echo "VMBENCH $p $qd $rw $iops $((iops * SECS * 100 / busy))"
}
fio_run() { # fio's flags for the engine and target
  fio --name=b --bs=4096 --time_based --runtime=$SECS --norandommap \
    --randrepeat=0 --output-format=terse --terse-version=3 "$@"
}
# NVMe/TCP: `bdevperf` on nvme-tcp: against fio (io_uring, O_DIRECT) on the
# kernel's own NVMe/TCP initiator, both on the same nvmet-tcp target on
# loopback (namespace 2), 4 KiB random reads at QD1 and QD32, sides
# alternating. The kernel initiator is connected once, through
# /dev/nvme-fabrics, and stays connected (idle) while ours runs.
tcp_bench() {
  tcp_target_up || { echo "VMBENCH-FAIL nvmet-tcp target"; FAILED="$FAILED nvmet-tcp"; return; }
  before=$(ls /sys/block)
  echo "transport=tcp,traddr=127.0.0.1,trsvcid=4420,nqn=$NQN" > /dev/nvme-fabrics ||
    { echo "VMBENCH-FAIL kernel nvme-tcp connect"; FAILED="$FAILED kernel-tcp-connect"; return; }
  KDEV=""
  for i in $(seq 1 50); do
    for b in $(ls /sys/block); do
      case " $(echo $before) " in *" $b "*) continue ;; esac
      # Namespace 2: 192 MiB.
      [ "$(cat /sys/block/$b/size)" = 393216 ] && KDEV=$b
    done
    [ -n "$KDEV" ] && [ -b /dev/$KDEV ] && break
    sleep 0.2
  done
  [ -n "$KDEV" ] || { echo "VMBENCH-FAIL no kernel nvme-tcp namespace"; FAILED="$FAILED kernel-tcp-dev"; return; }
  echo "VMBENCH-TCP-SHAPE kernel initiator /dev/$KDEV ($(cat /sys/block/$KDEV/queue/logical_block_size)-byte blocks), ours $TCP_SPEC/ns=2"
  for r in $(seq 1 $ROUNDS); do
    for qd in 1 32; do
      measure ours-tcp $qd randread bdevperf --device $TCP_SPEC/ns=2 --qd $qd --bs 4096 --rw randread --seconds $SECS
      measure kernel-tcp-io_uring $qd randread fio_run --ioengine=io_uring --direct=1 --filename=/dev/$KDEV --rw=randread --iodepth=$qd
    done
  done
  # Disconnect the kernel's initiator (the PCIe steps count controllers).
  for c in /sys/class/nvme/*; do
    [ "$(cat $c/transport 2>/dev/null)" = tcp ] && echo 1 > $c/delete_controller
  done
}
tcp_bench
if [ -z "$VM_ONLY" ]; then
to_kernel() {
  nvme-setup unbind $PCI >/dev/null
  for i in $(seq 1 50); do [ -b /dev/nvme0n$NS ] && [ -c /dev/ng0n$NS ] && break; sleep 0.2; done
}
to_kernel
echo "VMBENCH-SHAPE $(nproc) vCPUs, kernel $(uname -r), namespace $NS of $(( $(cat /sys/block/nvme0n$NS/size) / 2048 )) MiB, $(cat /sys/block/nvme0n$NS/queue/logical_block_size)-byte blocks, io_poll=$(cat /sys/block/nvme0n$NS/queue/io_poll)"
for r in $(seq 1 $ROUNDS); do
  nvme-setup bind $PCI >/dev/null
  for qd in 1 32; do for rw in randread randwrite; do
    measure ours $qd $rw bdevperf --device nvme:$PCI/ns=$NS --qd $qd --bs 4096 --rw $rw --seconds $SECS
    # Without completion interrupts: every wait spins on the queue.
    measure ours-polled $qd $rw bdevperf --device nvme:$PCI/ns=$NS --qd $qd --bs 4096 --rw $rw --seconds $SECS --interrupts off
  done; done
  to_kernel
  for qd in 1 32; do for rw in randread randwrite; do
    measure io_uring $qd $rw fio_run --ioengine=io_uring --direct=1 --filename=/dev/nvme0n$NS --rw=$rw --iodepth=$qd
    measure io_uring-polled $qd $rw fio_run --ioengine=io_uring --direct=1 --hipri=1 --filename=/dev/nvme0n$NS --rw=$rw --iodepth=$qd
    # The generic char device has no page cache (and refuses O_DIRECT).
    measure io_uring-passthru $qd $rw fio_run --ioengine=io_uring_cmd --cmd_type=nvme --filename=/dev/ng0n$NS --rw=$rw --iodepth=$qd
  done; done
done
# RocksDB: BlobFS on our driver (namespace 3) vs ext4 on the kernel's
# (namespace 4); kvbench rebinds the controller for each side. Once with
# the driver's completion interrupts (the default), once without.
for mode in $KV_MODES; do
  case $mode in polled) irq=off ;; *) irq=on ;; esac
  echo "VMKV-BEGIN $mode"
  echo "BlobFS with BLOBSTACK_NVME_INTERRUPTS=$irq"
  BLOBSTACK_NVME_INTERRUPTS=$irq kvbench --configs nvme --nvme $PCI --nvme-namespaces 3,4 \
    --blobfs-cache 1G --db-bench /bin/db_bench --nvme-setup /bin/nvme-setup --dir /tmp/kvbench \
    --out /tmp/kv-$mode $KVBENCH_ARGS 2>/tmp/kv-$mode.err || { FAILED="$FAILED kvbench-$mode"; tail -30 /tmp/kv-$mode.err; }
  tr '\r' '\n' < /tmp/kv-$mode.err | grep -a -e 'ops/s' -e '^kvbench' -e '^note' | grep -av '(total'
  echo "VMKV-END $mode"
  echo "VMKV-JSON-BEGIN $mode"; cat /tmp/kv-$mode/kvbench.json 2>/dev/null; echo "VMKV-JSON-END $mode"
done
fi
if [ -z "$FAILED" ]; then echo "VMTEST-RESULT: PASS"; else echo "VMTEST-RESULT: FAIL:$FAILED"; fi
EOF
fi
cat >> "$IRD/init" <<'EOF'
sync
poweroff -f
EOF
chmod +x "$IRD/init"
(cd "$IRD" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initramfs.gz"
log "initramfs $(du -h "$WORK/initramfs.gz" | cut -f1), modules: $(tr '\n' ' ' < "$IRD/modules.order")"

# 4. Two namespaces: 512-byte and 4096-byte blocks; for the bench, two more
# of one size and format for kvbench's two sides.
truncate -s 256M "$WORK/ns1.img"
truncate -s 128M "$WORK/ns2.img"
KVNS=()
if [ "$MODE" = bench ]; then
  for n in 3 4; do
    truncate -s 3G "$WORK/ns$n.img"
    KVNS+=(-drive file="$WORK/ns$n.img",if=none,id=ns$n,format=raw,discard=unmap
           -device nvme-ns,drive=ns$n,bus=nvme0,nsid=$n,logical_block_size=4096,physical_block_size=4096)
  done
fi

# 5. Boot and watch the console.
CONSOLE="$WORK/console.log"
log "booting QEMU (TCG, $CPUS vCPUs, timeout ${TIMEOUT}s)"
start=$(date +%s)
set +e
timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 \
  -machine q35,accel=tcg,kernel-irqchip=split -cpu max -smp "$CPUS" -m "$MEM" \
  -device intel-iommu,intremap=on \
  -kernel "/boot/vmlinuz-$KVER" -initrd "$WORK/initramfs.gz" \
  -append "console=ttyS0 intel_iommu=on panic=-1 loglevel=4" \
  -drive file="$WORK/ns1.img",if=none,id=ns1,format=raw,discard=unmap \
  -drive file="$WORK/ns2.img",if=none,id=ns2,format=raw,discard=unmap \
  -device nvme,id=nvme0,serial=blobstore-vm0 \
  -device nvme-ns,drive=ns1,bus=nvme0,nsid=1,logical_block_size=512,physical_block_size=512 \
  -device nvme-ns,drive=ns2,bus=nvme0,nsid=2,logical_block_size=4096,physical_block_size=4096 \
  "${KVNS[@]}" \
  -display none -monitor none -serial stdio -no-reboot </dev/null 2>&1 | tee "$CONSOLE"
qrc=${PIPESTATUS[0]}
set -e
elapsed=$(( $(date +%s) - start ))

# 6. Verdict.
echo
log "VM finished in ${elapsed}s (qemu exit $qrc)"
grep -a -E "^test .* \.\.\. |VMTEST-END|VMTEST-PERF" "$CONSOLE" | sed 's/\r$//' || true
if [ "$MODE" = bench ]; then
  grep -a "^VMBENCH-SHAPE" "$CONSOLE" | tr -d '\r' | head -1 || true
  # Medians per path, queue depth and operation.
  echo "| path | qd | op | IOPS | IOPS per guest CPU s | runs |"
  echo "| --- | ---: | --- | ---: | ---: | ---: |"
  grep -a "^VMBENCH " "$CONSOLE" | tr -d '\r' | awk '
    { k = $2 " " $3 " " $4; n[k]++; iops[k, n[k]] = $5; cpu[k, n[k]] = $6
      if (!(k in seen)) { seen[k] = 1; order[++m] = k } }
    function med(a, k, c,   i, j, t, v) {
      for (i = 1; i <= c; i++) v[i] = a[k, i] + 0
      for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
      return v[int((c + 1) / 2)]
    }
    END { for (i = 1; i <= m; i++) { k = order[i]; split(k, f, " ")
      printf "| %s | %s | %s | %d | %d | %d |\n", f[1], f[2], f[3], med(iops, k, n[k]), med(cpu, k, n[k]), n[k] } }'
  grep -a "^VMBENCH-TCP-SHAPE" "$CONSOLE" | tr -d '\r' | head -1 || true
  # kvbench's tables, and its JSON kept beside the console log.
  [ -n "$ONLY" ] || for mode in $KV_MODES; do
    sed -n "/^VMKV-BEGIN $mode/,/^VMKV-END $mode/p" "$CONSOLE" | tr -d '\r' | grep -av '^VMKV'
    sed -n "/^VMKV-JSON-BEGIN $mode/,/^VMKV-JSON-END $mode/p" "$CONSOLE" | tr -d '\r' |
      grep -av '^VMKV' > "$WORK/kvbench-$mode.json" || true
    log "kvbench JSON ($mode): $WORK/kvbench-$mode.json"
  done
fi
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
  log "FAIL: the VM did not finish within ${TIMEOUT}s"; exit 1
fi
result=$(grep -a "^VMTEST-RESULT:" "$CONSOLE" | tail -1 | tr -d '\r')
if [ "$result" = "VMTEST-RESULT: PASS" ]; then
  log "PASS"
  exit 0
fi
log "FAIL: ${result:-no result line on the console}"
exit 1
