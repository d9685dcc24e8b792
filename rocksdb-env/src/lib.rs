//! The Rust side of the RocksDB FileSystem plugin: the `cxx` bridge that
//! lets the C++ `rocksdb::FileSystem` in `cpp/` call BlobFS.
//!
//! Not built yet: it exports nothing so far.
#![deny(missing_docs)]
