//! `FileDevice`: io_uring with O_DIRECT (filled in by its own change).

use super::{BlockDevice, ChannelBackend, DeviceId, Geometry};
use crate::error::{Error, Result};

/// A regular file or block device driven through io_uring with O_DIRECT.
pub struct FileDevice {
    geometry: Geometry,
    id: DeviceId,
}

impl FileDevice {
    /// Not available yet.
    pub fn open(_path: &std::path::Path, _size: Option<u64>) -> Result<FileDevice> {
        Err(Error::Unsupported("file devices are not built yet".into()))
    }
}

impl BlockDevice for FileDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn id(&self) -> DeviceId {
        self.id
    }
    fn name(&self) -> String {
        "file".into()
    }
    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
        Err(Error::Unsupported("file devices are not built yet".into()))
    }
}
