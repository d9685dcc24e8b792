//! RocksDB on BlobFS in one page: open a database on a file device through
//! the `rocksdb` crate this crate re-exports, write, flush, read back, and
//! look at the files RocksDB wrote as BlobFS sees them.
//!
//! ```sh
//! cargo run --release -p rocksdb-env --example hello_rocksdb [IMAGE]
//! ```
//!
//! IMAGE defaults to a file in the temporary directory (8 GiB, sparse),
//! formatted afresh each run (`mkfs=always`).

use rocksdb_env::rocksdb::{self, IteratorMode, Options};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let image = std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("hello_rocksdb.img")
            .display()
            .to_string()
    });
    let uri = format!("blobfs://file:{image}?size=8G;mkfs=always");

    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let db = rocksdb_env::open_db(&uri, "/hello/db", &opts)?;
    for i in 0..1000u32 {
        db.put(format!("key{i:04}"), format!("value {i}"))?;
    }
    db.flush()?; // an SST file in BlobFS
    assert_eq!(db.get(b"key0042")?.as_deref(), Some(&b"value 42"[..]));
    let n = db.iterator(IteratorMode::Start).count();
    println!(
        "{n} keys; key0042 = {:?}",
        String::from_utf8(db.get(b"key0042")?.unwrap_or_default())?
    );

    let fs = rocksdb_env::mount(&uri)?;
    for e in fs.read_dir("hello/db")? {
        let size = fs.stat(&format!("hello/db/{}", e.name))?.len;
        println!("  /hello/db/{} ({size} bytes)", e.name);
    }
    Ok(())
}
