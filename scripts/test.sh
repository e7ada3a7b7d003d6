#!/usr/bin/env bash
# Every check switchboard must pass, in one command (CI runs exactly this):
#   formatting, clippy, unit and end-to-end tests (real HTTP, real SQLite, SIGKILL crash
#   test), and the compatibility suite that drives the official Brevo SDKs (Python and
#   Node; installed into compat/ on first use) against a freshly started server.
# Everything is built once, in release mode, and reused.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --release -- -D warnings

step "cargo test (unit, end-to-end, doctests)"
cargo test --workspace --release

step "compatibility suite: official Brevo SDKs against target/release/switchboard"
compat/run.sh target/release/switchboard
