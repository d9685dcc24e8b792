//! Per-core reactors (filled in by its own change).
