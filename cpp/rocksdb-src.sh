#!/bin/sh
# Where the one RocksDB's sources are, and the headers of the compression
# libraries it is built with, as the crates of this workspace's lock file
# have them (from `cargo metadata`, so no version is written down twice).
#
#   cpp/rocksdb-src.sh CARGO src        librocksdb-sys's rocksdb/ directory
#   cpp/rocksdb-src.sh CARGO includes   -I flags for snappy.h, lz4.h, zstd.h
#                                       and zlib.h (snappy-stubs-public.h is
#                                       at the crate root)
#
# The tools (rocksdb-tools.mk) and the debug library (rocksdb-debug.mk)
# compile RocksDB sources with the library's defines (-DSNAPPY -DLZ4 -DZSTD
# -DZLIB in rocksdb-flags.txt), and RocksDB's util/compression.h then
# includes those headers.
set -e
cargo=$1
meta=$("$cargo" metadata --format-version 1)

# crate_dir NAME: the directory of the crate NAME (e.g. lz4-sys).
crate_dir() {
  d=$(printf '%s' "$meta" |
    grep -o "\"manifest_path\":\"[^\"]*/$1-[0-9][^\"/]*/Cargo.toml\"" |
    head -1 | sed 's/^"manifest_path":"//; s#/Cargo.toml"$##')
  if [ ! -d "$d" ]; then
    echo "rocksdb-src.sh: crate $1 not found in cargo metadata" >&2
    exit 1
  fi
  printf '%s' "$d"
}

sys=$(crate_dir librocksdb-sys)
case $2 in
src) echo "$sys/rocksdb" ;;
includes)
  lz4=$(crate_dir lz4-sys)
  zstd=$(crate_dir zstd-sys)
  z=$(crate_dir libz-sys)
  for h in "$sys/snappy/snappy.h" "$sys/snappy-stubs-public.h" "$lz4/liblz4/lib/lz4.h" \
    "$zstd/zstd/lib/zstd.h" "$z/src/zlib/zlib.h"; do
    [ -f "$h" ] || { echo "rocksdb-src.sh: $h missing" >&2; exit 1; }
  done
  echo "-I$sys/snappy -I$sys -I$lz4/liblz4/lib -I$zstd/zstd/lib -I$z/src/zlib"
  ;;
*)
  echo "usage: $0 CARGO src|includes" >&2
  exit 2
  ;;
esac
