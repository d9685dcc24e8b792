//! What a load runs against: a raw device through this thread's channel, or
//! a blob. Both take byte offsets; each converts them to its own unit.

use std::future::Future;
use std::sync::Arc;

use blobstore::{Blob, BlockDevice, DmaBuf, Error, IoChannel, Lba, Result};

/// The kind of one operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Read into the buffer.
    Read,
    /// Write the buffer.
    Write,
}

/// Something that takes reads and writes at byte offsets.
///
/// Futures it returns are driven on the calling thread (they are not
/// `Send`), the way every device channel is.
pub trait IoTarget {
    /// What the target is, for reports (e.g. `raw mem:1073741824`).
    fn label(&self) -> String;
    /// The unit every offset and length must be a multiple of.
    fn unit_bytes(&self) -> u64;
    /// Addressable bytes.
    fn size_bytes(&self) -> u64;
    /// A buffer the target can do I/O with directly.
    fn alloc_buf(&self, len_bytes: usize) -> Result<DmaBuf>;
    /// Starts one operation of `buf.len()` bytes at `offset_bytes` and gives
    /// the buffer back when it completes.
    fn io(
        &self,
        kind: OpKind,
        offset_bytes: u64,
        buf: DmaBuf,
    ) -> impl Future<Output = Result<DmaBuf>> + '_;
}

fn check_aligned(what: &str, offset_bytes: u64, unit: u64) -> Result<u64> {
    if !offset_bytes.is_multiple_of(unit) {
        return Err(Error::InvalidArgument(format!(
            "{what}: offset {offset_bytes} is not a multiple of the unit {unit}"
        )));
    }
    Ok(offset_bytes / unit)
}

/// A block device used directly, through the calling thread's channel.
pub struct RawTarget {
    dev: Arc<dyn BlockDevice>,
    chan: IoChannel,
}

impl RawTarget {
    /// The calling thread's channel to `dev`.
    pub fn new(dev: Arc<dyn BlockDevice>) -> Result<RawTarget> {
        let chan = blobstore::channel(&dev)?;
        Ok(RawTarget { dev, chan })
    }

    /// The channel, e.g. to flush.
    pub fn channel(&self) -> &IoChannel {
        &self.chan
    }
}

impl IoTarget for RawTarget {
    fn label(&self) -> String {
        format!("raw {}", self.dev.name())
    }
    fn unit_bytes(&self) -> u64 {
        self.chan.geometry().block_size as u64
    }
    fn size_bytes(&self) -> u64 {
        self.chan.geometry().size_bytes()
    }
    fn alloc_buf(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.dev.alloc_buf(len_bytes)
    }
    async fn io(&self, kind: OpKind, offset_bytes: u64, buf: DmaBuf) -> Result<DmaBuf> {
        let lba = check_aligned("raw device", offset_bytes, self.unit_bytes())?;
        match kind {
            OpKind::Read => self.chan.read(Lba(lba), buf).await,
            OpKind::Write => self.chan.write(Lba(lba), buf).await,
        }
    }
}

/// An open blob; offsets are from the blob's start.
pub struct BlobTarget {
    blob: Blob,
    dev: Arc<dyn BlockDevice>,
}

impl BlobTarget {
    /// Wraps an open blob of a store on `dev` (buffers come from `dev`).
    pub fn new(blob: Blob, dev: Arc<dyn BlockDevice>) -> BlobTarget {
        BlobTarget { blob, dev }
    }

    /// The blob.
    pub fn blob(&self) -> &Blob {
        &self.blob
    }

    /// Gives the blob back.
    pub fn into_blob(self) -> Blob {
        self.blob
    }
}

impl IoTarget for BlobTarget {
    fn label(&self) -> String {
        format!("blob {} on {}", self.blob.id(), self.dev.name())
    }
    fn unit_bytes(&self) -> u64 {
        self.blob.io_unit_size() as u64
    }
    fn size_bytes(&self) -> u64 {
        self.blob.size_bytes()
    }
    fn alloc_buf(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.dev.alloc_buf(len_bytes)
    }
    async fn io(&self, kind: OpKind, offset_bytes: u64, buf: DmaBuf) -> Result<DmaBuf> {
        let unit = check_aligned("blob", offset_bytes, self.unit_bytes())?;
        match kind {
            OpKind::Read => self.blob.read(unit, buf).await,
            OpKind::Write => self.blob.write(unit, buf).await,
        }
    }
}
