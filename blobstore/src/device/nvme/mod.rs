//! `NvmeDevice`: a userspace NVMe driver over VFIO, polled, one I/O queue
//! pair per thread and controller, serving every namespace.
//!
//! Layout (all crate-private): `regs` (registers, enable/disable), `cmd`
//! (command and completion encoding, Identify data), `prp` and `sgl` (data
//! pointer planning), `queue` (a queue pair), `shadow` (shadow doorbells),
//! `dma` (IOVA-mapped memory), `vfio` (the VFIO glue), `controller` (bring-up,
//! admin commands, asynchronous events, reset), `namespace` (a namespace as
//! a device, and a thread's channel on it) and `io` (the per-thread queue
//! pair and its I/O path).
//!
//! What the driver does with each operation:
//! - Read and Write: with PRPs, split at the transfer limit (MDTS, at most
//!   2 MiB) and wherever the buffers cannot share one PRP list; with SGLs
//!   (when the controller takes them and PRPs cannot describe the op in one
//!   command), split at MDTS only (at most 32 MiB) and every 256 pieces;
//!   memory that is not from the DMA pool is bounced through one pool
//!   buffer (one copy).
//! - Flush: always sent (a no-op for controllers without a volatile cache).
//! - Unmap: Dataset Management with the deallocate attribute when ONCS says
//!   it is supported; otherwise [`Error::Unsupported`].
//! - Write Zeroes: the command when supported; otherwise emulated by writes
//!   from one zeroed pool buffer.
//!
//! The I/O path (SPDK's design): each queue pair has fixed trackers indexed
//! by command id, each with its own PRP list page. A read or write that fits
//! one command goes straight into the ring, its PRPs written into the
//! command and the tracker's page, with no allocation, hashing or lock. The
//! SQ doorbell is written once per batch (at the next reap, whatever was
//! submitted since), the CQ doorbell once per reap, and a reap takes at most
//! `REAP_MAX` completions. With shadow doorbells, a doorbell is a store to
//! the shadow page and an MMIO write only when the controller's EventIdx
//! asks for one.
//!
//! Waiting: the driver polls, but a thread whose only work is to wait for
//! its queue (a BlobFS writer thread behind a multi-MiB write, a RocksDB
//! thread in a sync) need not spin for it. With interrupts on
//! ([`ControllerOptions::interrupts`], the default over VFIO), each I/O
//! completion queue raises an MSI-X vector connected to an eventfd, and
//! the channel's `wait` sleeps on that eventfd once its completion queue
//! is empty; [`crate::exec::block_on`] calls it only after spinning, or at
//! once for a thread whose waits are long. Completions are still found by
//! polling: the interrupt only wakes the thread.
//!
//! Asynchronous event requests stay posted on the admin queue; each event
//! is counted, logged and cleared by reading its log page, and its request
//! posted again, without waiting (see [`NvmeController::async_events`]).
//!
//! Errors, as real controllers produce them:
//! - A completion for a command id that is not outstanding is counted
//!   ([`NvmeController::error_counters`]) and logged; it completes nothing.
//! - A status with DNR clear is retried (the same command, same id) up to
//!   `MAX_RETRIES` times.
//! - A command past its timeout is aborted without waiting for the Abort;
//!   its op is reported as timed out once the command finishes (aborted or
//!   not). If it has not finished one more timeout later, the controller is
//!   reset.
//! - A fatal status (CSTS.CFS) disables the controller (CC.EN = 0, then
//!   CSTS.RDY = 0) before any op is failed.
//!
//! Invariants:
//! - A queue pair belongs to one thread's channels on one controller (one
//!   owner per namespace); the admin queue is shared behind a mutex and only
//!   used for setup, queue creation, Abort, events and logs; the I/O path
//!   only ever try-locks it.
//! - An operation is reported once, and only when the controller no longer
//!   owns any of its commands (they completed, or the controller was
//!   disabled by a reset or after a fatal status): its memory is never
//!   released or reused while the controller may still reach it.
//! - After [`NvmeController::reset`], every command that was in flight is
//!   failed ([`Error::DeviceFailed`], or [`Error::Timeout`] for the one that
//!   timed out) and each thread's queue pair is created again on its next
//!   use.

pub(crate) mod cmd;
pub(crate) mod dma;
pub(crate) mod prp;
pub(crate) mod queue;
pub(crate) mod regs;
pub(crate) mod sgl;
pub(crate) mod shadow;
#[doc(hidden)]
pub mod soft;
pub mod tcp;
#[cfg(test)]
mod tests;
mod vfio;

mod controller;
mod io;
mod namespace;

pub use controller::{
    AsyncEventCounters, ControllerOptions, ErrorCounters, NvmeController, INTERRUPTS_ENV,
    SHADOW_DOORBELLS_ENV,
};
pub use namespace::NvmeDevice;

use std::time::Duration;

use super::{BlockDevice, ChannelBackend, DeviceId, DmaBuf, Geometry, IoKind, IoOp, Segment, Tag};
use crate::error::{Error, Result};

/// Entries of the admin queue pair.
const ADMIN_ENTRIES: u32 = 32;
/// Entries of each I/O queue pair (bounded by CAP.MQES).
const IO_ENTRIES: u32 = 256;
/// Default per-command timeout for I/O.
const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for admin commands.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin command ids never taken by commands nobody waits for (Aborts,
/// event requests), so queue creation and resets always find one.
const ADMIN_RESERVED_CIDS: usize = 4;
/// Most Asynchronous Event Requests kept outstanding (AERL + 1 if lower).
const MAX_AERS: usize = 4;

/// Controller states (`NvmeController::state`).
mod state {
    /// Enabled and serving I/O.
    pub const LIVE: u8 = 0;
    /// A reset is in progress: channels neither submit nor reap, nor release
    /// any memory of their commands.
    pub const RESETTING: u8 = 1;
    /// Failed and disabled (CSTS.RDY = 0 was seen): the controller no longer
    /// touches memory, so in-flight commands can be failed and their memory
    /// released. A reset brings it back.
    pub const FAILED: u8 = 2;
    /// Failed and it could not be shown disabled: memory of in-flight
    /// commands is never released (their operations are not reported).
    pub const WEDGED: u8 = 3;
}
