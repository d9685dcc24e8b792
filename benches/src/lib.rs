//! Benchmarks of the storage stack.
#![deny(missing_docs)]
