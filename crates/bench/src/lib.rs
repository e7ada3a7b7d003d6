//! Shared pieces of the benchmark binaries (numbers, never assertions), and throwaway
//! PostgreSQL databases for the test suites ([`pgdb`]).

pub mod child;
pub mod pgdb;
