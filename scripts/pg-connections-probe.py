#!/usr/bin/env python3
"""Durable POSTs while PostgreSQL keeps ending switchboard's connections.

Starts `switchboard serve` on a new database of its own, has CLIENTS threads POST agent
messages (every other client with an Idempotency-Key, so that both the single-statement
path and transactions are taken) for SECONDS, while every 0.3 s all of the database's
switchboard connections are ended with pg_terminate_backend (what a restart or a failover
does to them). Then it checks what was promised: every message answered 200 is in the
database, none answered otherwise is, none is there twice; and one more POST after the run
succeeds. Prints the counts; exits 1 if a promise was broken. Drops its database.

    scripts/pg-connections-probe.py [--switchboard target/release/switchboard]
        [--postgres postgres://postgres@127.0.0.1:5432/test] [--seconds 8] [--clients 8]

Needs `psql` and a PostgreSQL user that may create databases. Loopback only.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

ap = argparse.ArgumentParser()
ap.add_argument("--switchboard", default="target/release/switchboard")
ap.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432/test")
ap.add_argument("--seconds", type=float, default=8)
ap.add_argument("--clients", type=int, default=8)
args = ap.parse_args()

admin = urllib.parse.urlparse(args.postgres)
name = "sb_probe_" + uuid.uuid4().hex[:12]
db_url = admin._replace(path="/" + name).geturl()


def psql(sql, url=args.postgres):
    out = subprocess.run(["psql", url, "-Atc", sql], capture_output=True, text=True, check=True)
    return out.stdout


psql(f'CREATE DATABASE "{name}"')
log = open(f"/tmp/{name}.log", "w")
server = subprocess.Popen(
    [args.switchboard, "serve", "--listen", "127.0.0.1:0", "--db", db_url],
    stdout=subprocess.PIPE, stderr=log, text=True,
    env=dict(os.environ, SWITCHBOARD_API_KEY="probe-key", RUST_LOG="warn"),
)
broken = False
try:
    base = None
    deadline = time.time() + 60
    while base is None and time.time() < deadline:
        line = server.stdout.readline()
        if not line:
            raise SystemExit("the server exited before listening")
        m = re.search(r"listening on (http://\S+)", line)
        base = m and m.group(1)

    def post(text, visitor, key=None):
        body = {"visitorId": visitor, "text": text, "agentEmail": "probe@example.com",
                "agentName": "Probe"}
        headers = {"api-key": "probe-key", "content-type": "application/json"}
        if key:
            headers["Idempotency-Key"] = key
        req = urllib.request.Request(base + "/v3/conversations/messages", method="POST",
                                     data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError as e:
            return "error: " + type(e).__name__

    post("hello", "v0")
    results = {}
    lock = threading.Lock()
    stop = time.time() + args.seconds

    def client(n):
        i = 0
        while time.time() < stop:
            text = f"c{n}-{i}"
            i += 1
            status = post(text, f"v{n % 4}", key=text if n % 2 else None)
            with lock:
                results[text] = status

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for t in threads:
        t.start()
    ended = 0
    while time.time() < stop:
        time.sleep(0.3)
        ended += int(psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND application_name = 'switchboard'").strip() or 0)
    for t in threads:
        t.join()
    stored = psql("SELECT text FROM messages", db_url).split()
    in_db = set(stored)
    ok = {t for t, s in results.items() if s == 200}
    refused = {t for t, s in results.items() if s != 200}
    after = post("after", "v0")
    print(f"connections ended: {ended}")
    print(f"answers: {dict(collections.Counter(results.values()))}")
    checks = {
        "answered 200 but not stored": len(ok - in_db),
        "not answered 200 but stored": len(refused & in_db),
        "stored twice": len(stored) - len(in_db),
    }
    for what, n in checks.items():
        print(f"{what}: {n}")
    print(f"a POST after the run: {after}")
    broken = any(checks.values()) or after != 200
finally:
    server.terminate()
    server.wait()
    psql(f'DROP DATABASE "{name}" WITH (FORCE)')
raise SystemExit(1 if broken else 0)
