//! Test machinery, kept out of the product: compiled only with the cargo
//! feature `testing` (and in this crate's own unit tests). Without it the
//! device spec parser refuses `powerloss=on`, so a production build cannot
//! reach any of this.
//!
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
//! - A write is durable only once a flush submitted after it completed has
//!   completed; everything else is what a power cut may undo, keep or tear.
//! - Deterministic: the same operations and seeds give the same power cut
//!   (random choices come from [`crate::util::SplitMix64`], in a fixed
//!   order).

pub mod powerloss;

pub use powerloss::{log_path, recover, PowerCut, PowerLossDevice, RecoveryReport};
