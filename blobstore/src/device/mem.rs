//! `MemDevice`: a block device in RAM, for tests and the `memory` benchmark.
//!
//! Invariants:
//! - The contents are split in fixed chunks, each behind its own lock, so
//!   threads working on different regions never contend and overlapping
//!   concurrent writes are ordered per chunk instead of racing.
//! - Operations complete at submission; the completion is reported at the
//!   next poll of the channel, like any other device.
//! - Unmap and write-zeroes both leave zeroes.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::RwLock;

use super::{BlockDevice, ChannelBackend, DeviceId, Geometry, IoKind, IoOp, Tag};
use crate::error::{Error, Result};

const CHUNK_BYTES: usize = 1 << 20;

struct Store {
    chunks: Vec<RwLock<Box<[u8]>>>,
    size: usize,
}

impl Store {
    fn new(size: usize) -> Store {
        let n = size.div_ceil(CHUNK_BYTES);
        let chunks = (0..n)
            .map(|i| {
                let len = CHUNK_BYTES.min(size - i * CHUNK_BYTES);
                RwLock::new(vec![0u8; len].into_boxed_slice())
            })
            .collect();
        Store { chunks, size }
    }

    /// Calls `f(chunk, offset_in_chunk, offset_in_range, len)` for each
    /// chunk piece of `[off, off+len)`.
    fn for_pieces(&self, off: usize, len: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut done = 0;
        while done < len {
            let pos = off + done;
            let chunk = pos / CHUNK_BYTES;
            let in_chunk = pos % CHUNK_BYTES;
            let n = (CHUNK_BYTES - in_chunk).min(len - done);
            f(chunk, in_chunk, done, n);
            done += n;
        }
    }
}

/// A RAM-backed block device with 512- or 4096-byte blocks.
#[derive(Clone)]
pub struct MemDevice {
    store: Arc<Store>,
    geometry: Geometry,
    id: DeviceId,
}

impl MemDevice {
    /// A zeroed device of `size_bytes` (a multiple of `block_size`).
    pub fn new(size_bytes: u64, block_size: u32) -> Result<MemDevice> {
        if block_size != 512 && block_size != 4096 {
            return Err(Error::InvalidArgument(format!(
                "block size {block_size}: must be 512 or 4096"
            )));
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(block_size as u64) {
            return Err(Error::InvalidArgument(format!(
                "memory device size {size_bytes} is not a positive multiple of {block_size}"
            )));
        }
        let size = usize::try_from(size_bytes)
            .map_err(|_| Error::InvalidArgument(format!("size {size_bytes} too large")))?;
        Ok(MemDevice {
            store: Arc::new(Store::new(size)),
            geometry: Geometry {
                block_size,
                block_count: size_bytes / block_size as u64,
                max_transfer_bytes: 1 << 20,
                unmap_reads_zeroes: true,
            },
            id: DeviceId::fresh(),
        })
    }

    /// A device holding `image` (e.g. a [`MemDevice::snapshot`]), as after a restart.
    pub fn from_image(image: &[u8], block_size: u32) -> Result<MemDevice> {
        let dev = MemDevice::new(image.len() as u64, block_size)?;
        dev.store_bytes(0, image);
        Ok(dev)
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.store.size];
        self.load_bytes(0, &mut out);
        out
    }

    /// Copies bytes out of the device at a byte offset (test helper).
    pub fn load_bytes(&self, off: usize, dst: &mut [u8]) {
        self.store.for_pieces(off, dst.len(), |c, ic, at, n| {
            dst[at..at + n].copy_from_slice(&self.store.chunks[c].read()[ic..ic + n]);
        });
    }

    /// Copies bytes into the device at a byte offset (test helper, e.g. to
    /// corrupt metadata on purpose).
    pub fn store_bytes(&self, off: usize, src: &[u8]) {
        self.store.for_pieces(off, src.len(), |c, ic, at, n| {
            self.store.chunks[c].write()[ic..ic + n].copy_from_slice(&src[at..at + n]);
        });
    }
}

impl BlockDevice for MemDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn id(&self) -> DeviceId {
        self.id
    }
    fn name(&self) -> String {
        format!("mem:{}", self.geometry.size_bytes())
    }
    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
        Ok(Box::new(MemBackend {
            store: self.store.clone(),
            block_size: self.geometry.block_size as usize,
            done: VecDeque::new(),
        }))
    }
}

struct MemBackend {
    store: Arc<Store>,
    block_size: usize,
    done: VecDeque<Tag>,
}

impl ChannelBackend for MemBackend {
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        let off = op.lba as usize * self.block_size;
        let st = &self.store;
        match op.kind {
            IoKind::Read | IoKind::Write => {
                let mut pos = off;
                for seg in &op.segs {
                    st.for_pieces(pos, seg.len(), |c, ic, at, n| {
                        if op.kind == IoKind::Read {
                            let chunk = st.chunks[c].read();
                            // SAFETY: the segment belongs to this in-flight op.
                            unsafe { seg.write_at(at, &chunk[ic..ic + n]) }
                        } else {
                            let mut chunk = st.chunks[c].write();
                            // SAFETY: as above.
                            unsafe { seg.read_at(at, &mut chunk[ic..ic + n]) }
                        }
                    });
                    pos += seg.len();
                }
            }
            IoKind::Unmap | IoKind::WriteZeroes => {
                st.for_pieces(off, op.blocks as usize * self.block_size, |c, ic, _, n| {
                    st.chunks[c].write()[ic..ic + n].fill(0);
                });
            }
            IoKind::Flush => {}
        }
        self.done.push_back(tag);
        Ok(())
    }

    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let n = self.done.len();
        for tag in self.done.drain(..) {
            done(tag, Ok(()));
        }
        n
    }
}
