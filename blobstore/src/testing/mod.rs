//! Test machinery, kept out of the product: compiled only with the cargo
//! feature `testing` (and in this crate's own unit tests). Without it the
//! device spec parser refuses `powerloss=on`, so a production build cannot
//! reach any of this.
//!
//! - [`FaultDevice`]: one fault-injection wrapper around any device, driven
//!   by [`Rule`]s: which operations ([`Kinds`]: read, write, flush, unmap,
//!   write-zeroes), when ([`When`]: the n-th once, or every one after the
//!   first n) and what happens ([`Effect`]: fail, stall, lose power). Made
//!   with [`FaultDevice::new`] it also records the in-memory crash image
//!   ([`CrashImage`]: the durable image and the writes no flush covered,
//!   torn and reordered by a seed).
//! - [`powerloss`]: the crash image of a file device kept on disk, for
//!   processes that really die: [`PowerLossDevice`] logs how to undo every
//!   write no completed flush made durable (its log's bytes are laid out
//!   in [`powerloss::log_format`]), [`recover`] plays the power cut on the
//!   image afterwards, and [`PowerCut`] makes the process SIGKILL itself at
//!   a chosen operation (spec options `powerloss=on`,
//!   `powerloss_cut_after=<n>`, `powerloss_cut_when=before|after`).
//!
//! Invariants (each submodule lists its own in full):
//! - Nothing here is reachable from a build without the feature: the spec
//!   parser's `powerloss` option errors there, naming the feature.
//! - An injected failure fails exactly one operation, which does nothing;
//!   once a device has lost power every operation fails and nothing more
//!   becomes durable.
//! - A write is durable only once a flush submitted after it completed has
//!   completed; everything else is what a power cut may undo, keep or tear.
//! - Deterministic: the same operations, rules and seeds give the same
//!   failures and the same crash images (random choices come from
//!   [`crate::util::SplitMix64`], in a fixed order).

mod fault;
mod image;
pub mod powerloss;
mod rules;

pub use fault::FaultDevice;
pub use image::{CrashImage, DEFAULT_TEAR_BYTES};
pub use powerloss::{log_path, recover, PowerCut, PowerLossDevice, RecoveryReport};
pub use rules::{Effect, Kinds, Rule, When};
