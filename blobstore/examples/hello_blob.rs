//! The blobstore in one page: make a store on a file device, write a blob
//! with an xattr, unload, load it again and read the blob back.
//!
//! ```sh
//! cargo run --release -p blobstore --example hello_blob [IMAGE]
//! ```
//!
//! IMAGE defaults to a file in the temporary directory, created (1 GiB,
//! sparse) and formatted afresh each run.

use blobstore::device::open_device;
use blobstore::{block_on, BlobOptions, Blobstore, BlobstoreOptions, DmaBuf, LoadOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let image = std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("hello_blob.img")
            .display()
            .to_string()
    });
    let _ = std::fs::remove_file(&image);
    let spec = format!("file:{image}?size=1G");

    // A new store: 1 MiB clusters by default, io unit = the device block.
    let bs = block_on(Blobstore::init(
        open_device(&spec)?,
        BlobstoreOptions::default(),
    ))?;
    let unit = bs.io_unit_size() as usize;
    let blob = block_on(bs.create_blob(BlobOptions {
        num_clusters: 2,
        ..Default::default()
    }))?;
    let blob = block_on(bs.open_blob(blob))?;
    // Device I/O goes through DMA-capable buffers, in whole io units.
    let mut data = vec![0u8; 4 * unit];
    data[..12].copy_from_slice(b"hello, blobs");
    block_on(blob.write(0, DmaBuf::from_slice(&data)?))?;
    blob.set_xattr("greeting", b"hi")?;
    block_on(blob.sync_metadata())?; // data and metadata durable
    let id = blob.id();
    println!("wrote blob {id:?}: {} clusters", blob.num_clusters());
    block_on(blob.close())?;
    block_on(bs.unload())?; // a clean unload: the next load needs no recovery

    let bs = block_on(Blobstore::load(open_device(&spec)?, LoadOptions::default()))?;
    let blob = block_on(bs.open_blob(id))?;
    let buf = block_on(blob.read(0, DmaBuf::new(4 * unit)?))?;
    assert_eq!(&buf[..], &data[..]);
    assert_eq!(blob.get_xattr("greeting").as_deref(), Some(&b"hi"[..]));
    println!(
        "read it back after a reload: {:?}, xattr greeting = {:?}",
        String::from_utf8_lossy(&buf[..12]),
        String::from_utf8_lossy(&blob.get_xattr("greeting").unwrap_or_default())
    );
    block_on(blob.close())?;
    block_on(bs.unload())?;
    Ok(())
}
