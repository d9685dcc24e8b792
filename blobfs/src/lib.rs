//! BlobFS: a flat, crash-safe file system on the blobstore.
//!
//! Not built yet: this crate is the place the file system lands (one blob
//! per file, an in-memory name index, atomic rename). It exports nothing so
//! far, so nothing can mistake it for a working file system.
#![deny(missing_docs)]
