//! BlobFS in one page: format a file system on a file device, write and
//! sync a file, rename it atomically, unmount, mount again and read it.
//!
//! ```sh
//! cargo run --release -p blobfs --example hello_blobfs [IMAGE]
//! ```
//!
//! IMAGE defaults to a file in the temporary directory, created (1 GiB,
//! sparse) and formatted afresh each run. The `blobfs` tool reads the same
//! image: `blobfs ls IMAGE docs`, `blobfs cat IMAGE docs/hello.txt`.

use blobfs::{BlobFs, MkfsOptions, MountOptions, OpenOptions};
use blobstore::device::open_device;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let image = std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("hello_blobfs.img")
            .display()
            .to_string()
    });
    let _ = std::fs::remove_file(&image);
    let spec = format!("file:{image}?size=1G");

    let fs = BlobFs::mkfs(
        open_device(&spec)?,
        MkfsOptions::default(),
        MountOptions::default(),
    )?;
    fs.create_dir("docs")?;
    let f = fs.create("docs/hello.txt.tmp")?;
    f.append(b"hello, ")?;
    f.append(b"BlobFS\n")?;
    f.sync()?; // data and length are durable now
    f.close()?;
    fs.rename("docs/hello.txt.tmp", "docs/hello.txt")?; // atomic
    fs.unmount()?; // refuses while files are open

    let fs = BlobFs::mount(open_device(&spec)?, MountOptions::default())?;
    for e in fs.read_dir("docs")? {
        println!("docs/{}{}", e.name, if e.is_dir { "/" } else { "" });
    }
    let f = fs.open("docs/hello.txt", OpenOptions::read())?;
    let text = f.read_all()?;
    assert_eq!(text, b"hello, BlobFS\n");
    print!("{}", String::from_utf8_lossy(&text));
    f.close()?;
    println!("space: {:?}", fs.space());
    fs.unmount()?;
    Ok(())
}
