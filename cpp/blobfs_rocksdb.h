// The one C++ entry point Rust calls (through the cxx bridge in
// rocksdb-env/src/bridge.rs): registration of the `blobfs://` scheme.
// Everything else in cpp/ is reached through RocksDB's object library.
#pragma once

#include <cstdint>

namespace blobfs_rocksdb {

// Adds the `blobfs://` FileSystem and Env factories to RocksDB's default
// object library. Idempotent and thread-safe; returns the number of
// factories registered (2).
std::int32_t register_blobfs();

}  // namespace blobfs_rocksdb

// Defined next to the static registrar. Tools that link the plugin from a
// static archive name it with `-Wl,-u,blobfs_rocksdb_plugin_anchor` so the
// linker keeps the registrar (whose static initializer registers the scheme
// before main).
extern "C" int blobfs_rocksdb_plugin_anchor;
