//! Compiles the C++ FileSystem (`../cpp`) and the cxx bridge against the
//! RocksDB headers of the `librocksdb-sys` build that the `rocksdb` crate
//! links, with the same defines (`../cpp/rocksdb-flags.txt`, shared with the
//! Makefile's tool build), so there is exactly one RocksDB.
//!
//! With `ROCKSDB_ENV_DEBUG_ROCKSDB=1` (only `make crashtest-rocksdb-debug`
//! sets it, in its own target directory, with `ROCKSDB_LIB_DIR` pointing
//! librocksdb-sys at a debug librocksdb.a) the C++ is compiled without
//! `NDEBUG`, as that library is: RocksDB classes change layout under it.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let cpp = manifest.join("../cpp");
    // librocksdb-sys's `links = "rocksdb"` hands us its manifest dir.
    let sys = PathBuf::from(
        std::env::var("DEP_ROCKSDB_CARGO_MANIFEST_DIR")
            .expect("librocksdb-sys must be a direct dependency (DEP_ROCKSDB_*)"),
    );
    let rocksdb = sys.join("rocksdb");
    let flags = std::fs::read_to_string(cpp.join("rocksdb-flags.txt")).unwrap();
    let debug_rocksdb = std::env::var("ROCKSDB_ENV_DEBUG_ROCKSDB").is_ok_and(|v| v == "1");

    let mut build = cxx_build::bridge("src/bridge.rs");
    build
        .file(cpp.join("blobfs_fs.cc"))
        .include(&cpp)
        .include(rocksdb.join("include"))
        .include(&rocksdb)
        .flag_if_supported("-Wno-unused-parameter");
    for line in flags.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(header) = line.strip_prefix("-include ") {
            build.flag("-include").flag(header);
        } else if let Some(def) = line.strip_prefix("-D") {
            if debug_rocksdb && def.split('=').next() == Some("NDEBUG") {
                continue;
            }
            match def.split_once('=') {
                Some((k, v)) => build.define(k, v),
                None => build.define(def, None),
            };
        } else {
            build.flag(line);
        }
    }
    build.compile("blobfs_rocksdb_cpp");

    println!("cargo:rerun-if-changed=src/bridge.rs");
    println!("cargo:rerun-if-changed=../cpp/blobfs_fs.cc");
    println!("cargo:rerun-if-changed=../cpp/blobfs_files.h");
    println!("cargo:rerun-if-changed=../cpp/blobfs_rocksdb.h");
    println!("cargo:rerun-if-changed=../cpp/rocksdb-flags.txt");
    println!("cargo:rerun-if-env-changed=ROCKSDB_ENV_DEBUG_ROCKSDB");
}
