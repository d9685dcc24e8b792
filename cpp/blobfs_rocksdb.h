// The C++ entry points Rust calls (through the cxx bridge in
// rocksdb-env/src/bridge.rs): registration of the `blobfs://` scheme and
// C API handles of its Envs. Everything else in cpp/ is reached through
// RocksDB's object library.
#pragma once

#include <cstdint>

#include "rocksdb/c.h"
#include "rust/cxx.h"

namespace blobfs_rocksdb {

struct Status;

// Adds the `blobfs://` FileSystem and Env factories to RocksDB's default
// object library. Idempotent and thread-safe; returns the number of
// factories registered (2).
std::int32_t register_blobfs();

// A C API Env handle (rocksdb_env_t) for the Env that RocksDB's options
// string `env=<options_value>` names: the same process-lived Env object, so
// Rust's rocksdb::Env::from_raw can hand it to BackupEngine and friends.
// The handle does not own the Env (rocksdb_env_destroy frees only the
// handle). Null, with `status` set, if RocksDB cannot make the Env.
rocksdb_env_t* new_env_handle(rust::Str options_value, Status& status);

}  // namespace blobfs_rocksdb

// Defined next to the static registrar. Tools that link the plugin from a
// static archive name it with `-Wl,-u,blobfs_rocksdb_plugin_anchor` so the
// linker keeps the registrar (whose static initializer registers the scheme
// before main).
extern "C" int blobfs_rocksdb_plugin_anchor;
