#!/usr/bin/env bash
# Compatibility suite runner: drives the official Brevo SDKs (brevo-python 1.2.0 and
# @getbrevo/brevo 6.0.3) against a freshly started switchboard.
#
# usage: compat/run.sh [--tls] PATH_TO_SWITCHBOARD_BINARY
#        SWITCHBOARD_COMPAT_DB=postgres://.../fresh_db compat/run.sh PATH   (another database)
#
# --tls: the server serves HTTPS (--tls-cert/--tls-key) with a self-signed certificate for
#        127.0.0.1 made here with openssl, and the SDKs, urllib and the WebSocket clients
#        trust that certificate (SWITCHBOARD_CA_CERT, NODE_EXTRA_CA_CERTS).
#
# - installs the SDKs on first use (compat/python/.venv, compat/node/node_modules)
# - creates a fresh database in a temp dir (or uses SWITCHBOARD_COMPAT_DB, which must be
#   empty: a PostgreSQL URL, a file path or sqlite://PATH) and sets up fixtures with the CLI
#   (including the default account's widget id + identity key, `accounts widget --json`)
# - starts `switchboard serve --listen 127.0.0.1:0`, reads the address it prints,
#   polls GET /health a bounded number of times
# - runs both suites, stops the server (by pid) and removes the temp dir
# - exits non-zero if any suite (or the server) failed
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

TLS=""
if [[ "${1:-}" == "--tls" ]]; then
    TLS=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--tls] PATH_TO_SWITCHBOARD_BINARY" >&2
    exit 2
fi
BIN="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
if [[ ! -x "$BIN" ]]; then
    echo "error: $1 is not an executable file" >&2
    exit 2
fi

log() { printf '[compat] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- SDK installs
PY="$HERE/python/.venv/bin/python"
if [[ ! -x "$PY" ]]; then
    log "creating venv at compat/python/.venv"
    python3 -m venv "$HERE/python/.venv"
fi
log "pip install -r compat/python/requirements.txt"
"$PY" -m pip install --quiet --disable-pip-version-check -r "$HERE/python/requirements.txt"

if [[ ! -d "$HERE/node/node_modules" ]]; then
    log "npm ci in compat/node"
    (cd "$HERE/node" && npm ci --no-audit --no-fund --loglevel=error)
fi

# ---------------------------------------------------------------- temp dir, cleanup
TMP="$(mktemp -d "${TMPDIR:-/tmp}/switchboard-compat.XXXXXX")"
SERVER_PID=""
DRAIN_PID=""

cleanup() {
    local rc=$?
    set +e
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        # bounded wait for a graceful stop, then force
        for _ in $(seq 1 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            log "server $SERVER_PID did not stop on SIGTERM within 5s; sending SIGKILL"
            kill -KILL "$SERVER_PID" 2>/dev/null
        fi
        wait "$SERVER_PID" 2>/dev/null
    fi
    if [[ -n "$DRAIN_PID" ]]; then
        kill "$DRAIN_PID" 2>/dev/null
        wait "$DRAIN_PID" 2>/dev/null
    fi
    exec 3<&- 2>/dev/null
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Only our own settings reach the server and the CLI (a stray SWITCHBOARD_PARTNER_KEY,
# SWITCHBOARD_ACCOUNT or SWITCHBOARD_DB in the caller's environment would change the results).
DB="${SWITCHBOARD_COMPAT_DB:-$TMP/switchboard.db}"
while IFS= read -r var; do unset "$var"; done < <(compgen -e | grep '^SWITCHBOARD_' || true)
# The database as logs may show it (a URL's password hidden).
DB_SHOWN="$(sed -E 's#^([a-z]+://[^/:@]*:)[^/@]*@#\1***@#' <<<"$DB")"
API_KEY="xkeysib-compat-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export SWITCHBOARD_API_KEY="$API_KEY"

json_field() { # json_field FIELD  (reads one JSON object on stdin)
    "$PY" -c 'import json,sys; v=json.load(sys.stdin)[sys.argv[1]]; print(v if isinstance(v,str) else json.dumps(v))' "$1"
}

# ---------------------------------------------------------------- fixtures (CLI, before serve)
AGENT_NAME="Compat Alice"
AGENT_EMAIL="alice@compat.example"
AGENT_USERPIC="https://cdn.compat.example/alice.png"
AGENT2_NAME="Compat Bob"
AGENT2_EMAIL="bob@compat.example"

log "fixtures: groups add, agents add (db $DB_SHOWN)"
GROUP_JSON="$("$BIN" --db "$DB" --json groups add "Compat Support")"
GROUP_ID="$(json_field id <<<"$GROUP_JSON")"
AGENT_JSON="$("$BIN" --db "$DB" --json agents add --name "$AGENT_NAME" --email "$AGENT_EMAIL" \
    --userpic "$AGENT_USERPIC" --group "$GROUP_ID")"
AGENT_ID="$(json_field id <<<"$AGENT_JSON")"
AGENT2_JSON="$("$BIN" --db "$DB" --json agents add --name "$AGENT2_NAME" --email "$AGENT2_EMAIL")"
AGENT2_ID="$(json_field id <<<"$AGENT2_JSON")"
log "group $GROUP_ID, agent $AGENT_ID (in group, with userpic), agent $AGENT2_ID"
# A second account for the tenant-isolation checks.
OTHER_API_KEY=""
if OTHER_JSON="$("$BIN" --db "$DB" --json accounts create "Compat Other" 2>"$TMP/accounts.err")"; then
    OTHER_API_KEY="$(json_field apiKey <<<"$OTHER_JSON" 2>/dev/null || true)"
fi
if [[ -z "$OTHER_API_KEY" ]]; then
    log "could not create a second account for the isolation checks:"
    cat "$TMP/accounts.err" >&2
    exit 1
fi
# The default account's widget id and identity key, for the visitor API / WebSocket checks.
if ! WIDGET_JSON="$("$BIN" --db "$DB" accounts widget --json 2>"$TMP/widget.err")"; then
    log "switchboard accounts widget --json failed:"
    cat "$TMP/widget.err" >&2
    exit 1
fi
WIDGET_ID="$(json_field widgetId <<<"$WIDGET_JSON")"
IDENTITY_KEY="$(json_field identityKey <<<"$WIDGET_JSON")"
if [[ -z "$WIDGET_ID" || -z "$IDENTITY_KEY" ]]; then
    log "accounts widget --json gave an empty widgetId or identityKey"
    exit 1
fi
log "widget $WIDGET_ID"

# ---------------------------------------------------------------- start the server
SCHEME=http
SERVE_TLS=()
CURL_TLS=()
if [[ -n "$TLS" ]]; then
    SCHEME=https
    log "TLS: a self-signed certificate for 127.0.0.1"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=127.0.0.1" -addext "subjectAltName=IP:127.0.0.1" \
        -keyout "$TMP/tls.key" -out "$TMP/tls.crt" 2>"$TMP/openssl.err" || {
        cat "$TMP/openssl.err" >&2
        exit 1
    }
    SERVE_TLS=(--tls-cert "$TMP/tls.crt" --tls-key "$TMP/tls.key")
    CURL_TLS=(--cacert "$TMP/tls.crt")
    export SWITCHBOARD_CA_CERT="$TMP/tls.crt" NODE_EXTRA_CA_CERTS="$TMP/tls.crt"
fi
FIFO="$TMP/server.stdout"
mkfifo "$FIFO"
"$BIN" serve --listen 127.0.0.1:0 --db "$DB" "${SERVE_TLS[@]}" >"$FIFO" 2>"$TMP/server.stderr" &
SERVER_PID=$!
exec 3<"$FIFO"

# Read the address the server prints. Each read blocks until a line arrives or the
# server closes stdout (exit); the overall wait is bounded by a 60 s deadline.
ADDR=""
: >"$TMP/server.log"
deadline=$((SECONDS + 60))
while ((SECONDS < deadline)); do
    if ! IFS= read -r -t $((deadline - SECONDS)) line <&3; then
        break
    fi
    printf '%s\n' "$line" >>"$TMP/server.log"
    if [[ "$line" =~ ^listening\ on\ $SCHEME://(127\.0\.0\.1:[0-9]+)$ ]]; then
        ADDR="${BASH_REMATCH[1]}"
        break
    fi
done
if [[ -z "$ADDR" ]]; then
    log "server did not print 'listening on $SCHEME://127.0.0.1:PORT'"
    log "stdout:"; cat "$TMP/server.log" >&2
    log "stderr:"; tail -n 50 "$TMP/server.stderr" >&2
    exit 1
fi
# keep draining stdout so the server never blocks on a full pipe
cat <&3 >>"$TMP/server.log" &
DRAIN_PID=$!
log "server pid $SERVER_PID listening on $ADDR"

ready=""
for _ in $(seq 1 50); do
    if curl -fsS --max-time 2 "${CURL_TLS[@]}" -o /dev/null "$SCHEME://$ADDR/health"; then
        ready=1
        break
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
if [[ -z "$ready" ]]; then
    log "GET /health never answered 200"
    tail -n 50 "$TMP/server.stderr" >&2
    exit 1
fi

# ---------------------------------------------------------------- run the suites
export SWITCHBOARD_ROOT="$SCHEME://$ADDR"
export SWITCHBOARD_URL="$SWITCHBOARD_ROOT/v3"
export SWITCHBOARD_AGENT_ID="$AGENT_ID" SWITCHBOARD_AGENT_NAME="$AGENT_NAME"
export SWITCHBOARD_AGENT_EMAIL="$AGENT_EMAIL" SWITCHBOARD_AGENT_USERPIC="$AGENT_USERPIC"
export SWITCHBOARD_AGENT2_ID="$AGENT2_ID" SWITCHBOARD_AGENT2_NAME="$AGENT2_NAME"
export SWITCHBOARD_GROUP_ID="$GROUP_ID"
export SWITCHBOARD_OTHER_API_KEY="$OTHER_API_KEY"
export SWITCHBOARD_WIDGET_ID="$WIDGET_ID" SWITCHBOARD_IDENTITY_KEY="$IDENTITY_KEY"

status=0
log "python suite (brevo-python)"
if ! (cd "$HERE/python" && "$PY" test_brevo_python.py); then
    status=1
    log "python suite FAILED"
fi
log "node suite (@getbrevo/brevo)"
if ! (cd "$HERE/node" && node test.mjs); then
    status=1
    log "node suite FAILED"
fi

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "server exited during the suites"
    status=1
fi
if grep -q "panicked" "$TMP/server.stderr" "$TMP/server.log" 2>/dev/null; then
    log "server log contains a panic:"
    grep -h -A3 "panicked" "$TMP/server.stderr" "$TMP/server.log" >&2 || true
    status=1
fi
if ((status != 0)); then
    log "server stderr (tail):"
    tail -n 30 "$TMP/server.stderr" >&2 || true
    log "FAILED"
else
    log "all suites passed"
fi
exit "$status"
