#!/usr/bin/env bash
# Every check switchboard must pass, in one command (CI runs exactly this):
#   formatting, clippy, unit and end-to-end tests (real HTTP, real SQLite, SIGKILL crash
#   test), and the compatibility suite that drives the official Brevo SDKs (Python and
#   Node; installed into compat/ on first use) against a freshly started server.
# With SWITCHBOARD_TEST_POSTGRES (the URL of a PostgreSQL database whose user may create
# databases, e.g. postgres://postgres@127.0.0.1:5432/test) the tests and the compatibility
# suite run a second time on PostgreSQL, each test on a database of its own.
# Everything is built once, in release mode, and reused.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --release -- -D warnings

step "cargo test (unit, end-to-end, doctests) on SQLite"
SWITCHBOARD_TEST_BACKEND=sqlite cargo test --workspace --release

step "compatibility suite: official Brevo SDKs against target/release/switchboard (SQLite)"
compat/run.sh target/release/switchboard

step "compatibility suite over HTTPS (--tls-cert; SQLite)"
compat/run.sh --tls target/release/switchboard

if [[ -z "${SWITCHBOARD_TEST_POSTGRES:-}" ]]; then
    step "PostgreSQL runs skipped: SWITCHBOARD_TEST_POSTGRES is not set"
    exit 0
fi
PG_SHOWN="$(sed -E 's#^([a-z]+://[^/:@]*:)[^/@]*@#\1***@#' <<<"$SWITCHBOARD_TEST_POSTGRES")"

step "cargo test (unit, end-to-end, doctests) on PostgreSQL ($PG_SHOWN)"
SWITCHBOARD_TEST_BACKEND=postgres cargo test --workspace --release

step "compatibility suite on PostgreSQL (a fresh database on $PG_SHOWN)"
cargo build --release --quiet -p switchboard-bench --bin switchboard-pgdb
PGDB=target/release/switchboard-pgdb
COMPAT_DB="$("$PGDB" create "$SWITCHBOARD_TEST_POSTGRES")"
drop_compat_db() {
    local rc=$?
    "$PGDB" drop "$SWITCHBOARD_TEST_POSTGRES" "$COMPAT_DB" || rc=1
    exit "$rc"
}
trap drop_compat_db EXIT
SWITCHBOARD_COMPAT_DB="$COMPAT_DB" compat/run.sh target/release/switchboard
