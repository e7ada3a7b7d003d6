//! End-to-end tests: the real server over real HTTP, each test with its own database.

#[path = "../support/db.rs"]
mod db;
mod harness;

mod auth;
mod backup;
mod cluster;
mod commit_outcome;
mod connections;
mod cors;
mod errors;
#[cfg(target_os = "linux")]
mod flush_failure;
mod idempotency;
mod listing;
mod messages;
mod openapi;
mod process;
mod pushed;
mod ready;
#[cfg(target_os = "linux")]
mod storage_full;
mod streams;
mod tls;
mod visitor_group;
mod webhooks;
mod widget;
