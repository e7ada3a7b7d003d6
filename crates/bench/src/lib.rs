//! Shared pieces of the benchmark binaries (numbers, never assertions).

pub mod child;
