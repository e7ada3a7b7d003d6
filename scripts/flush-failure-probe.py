#!/usr/bin/env python3
"""Durable POSTs on SQLite while the disk keeps failing to flush the WAL.

Starts `switchboard serve` on a new SQLite file with `tests/support/fault_fsync.c` (built
here with `cc`) preloaded, has CLIENTS threads POST agent messages (every other client with
an Idempotency-Key, so that both the single-statement path and transactions are taken) for
SECONDS, while every INTERVAL seconds the next flush of the WAL is made to fail with EIO
(the data stays in the page cache, as after a real EIO). Then one more POST meets a
failing flush and the server is killed with SIGKILL at once; SQLite recovers the file, and
the probe checks what was promised: every message answered
200 is stored, none answered 503 ("not applied") is, none is there twice; and a POST to a
server started again on the file succeeds. Answers of 500 ("outcome unknown") are counted
apart: either way is right for them. Prints the counts; exits 1 if a promise was broken.

    scripts/flush-failure-probe.py [--switchboard target/release/switchboard]
        [--seconds 8] [--clients 8] [--interval 0.05]

Linux only (LD_PRELOAD, /proc). Loopback only.
"""
import argparse
import collections
import json
import os
import re
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--switchboard", default="target/release/switchboard")
ap.add_argument("--seconds", type=float, default=8)
ap.add_argument("--clients", type=int, default=8)
ap.add_argument("--interval", type=float, default=0.05)
args = ap.parse_args()

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
work = tempfile.mkdtemp(prefix="sb-flush-probe-")
lib = os.path.join(work, "libfault_fsync.so")
subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O2", "-o", lib,
                os.path.join(root, "crates/server/tests/support/fault_fsync.c"), "-ldl"],
               check=True)
control = os.path.join(work, "faults")
db = os.path.join(work, "s.db")


def write_faults(n):
    with open(control, "w") as f:
        f.write(f"{n}\n")


def start(faulty):
    env = dict(os.environ, SWITCHBOARD_API_KEY="probe-key", RUST_LOG="error")
    if faulty:
        env.update(LD_PRELOAD=lib, FAULT_FSYNC_FILE=control)
    server = subprocess.Popen(
        [args.switchboard, "serve", "--listen", "127.0.0.1:0", "--db", db],
        stdout=subprocess.PIPE, stderr=open(os.path.join(work, "log"), "a"), text=True,
        env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = server.stdout.readline()
        if not line:
            raise SystemExit("the server exited before listening")
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return server, m.group(1)
    raise SystemExit("the server did not listen within 60 s")


def post(base, text, visitor, key=None):
    body = {"visitorId": visitor, "text": text, "agentEmail": "probe@example.com",
            "agentName": "Probe"}
    headers = {"api-key": "probe-key", "content-type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    req = urllib.request.Request(base + "/v3/conversations/messages", method="POST",
                                 data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return "error: " + type(e).__name__


write_faults(0)
server, base = start(faulty=True)
broken = True
try:
    post(base, "hello", "v0")
    results = {}
    lock = threading.Lock()
    stop = time.time() + args.seconds

    def client(n):
        i = 0
        while time.time() < stop:
            text = f"c{n}-{i}"
            i += 1
            status = post(base, text, f"v{n % 4}", key=text if n % 2 else None)
            with lock:
                results[text] = status

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for t in threads:
        t.start()
    armed = 0
    while time.time() < stop:
        time.sleep(args.interval)
        write_faults(1)
        armed += 1
    for t in threads:
        t.join()
    # A failed commit that another commit follows can no longer be recovered. The last
    # one is what a restart could bring back: one more POST whose flush fails, then the
    # server is killed at once.
    write_faults(1)
    armed += 1
    results["last"] = post(base, "last", "v0")
    server.send_signal(signal.SIGKILL)
    server.wait()
    with open(control) as f:
        left = int(f.read().strip() or 0)
    conn = sqlite3.connect(db)
    stored = [row[0] for row in conn.execute("SELECT text FROM messages")]
    conn.close()
    in_db = set(stored)
    answers = collections.Counter(results.values())
    ok = {t for t, s in results.items() if s == 200}
    refused = {t for t, s in results.items() if s == 503}
    unknown = {t for t, s in results.items() if s == 500}
    print(f"flush failures armed: {armed}, met: {armed - left}")
    print(f"answers: {dict(answers)} (the last POST, with a failing flush: {results['last']})")
    print(f"answered 500 (outcome unknown): {len(unknown)}, of them stored: "
          f"{len(unknown & in_db)}")
    checks = {
        "answered 200 but not stored": len(ok - in_db),
        "answered 503 but stored": len(refused & in_db),
        "answered neither 200, 500 nor 503": sum(
            n for s, n in answers.items() if s not in (200, 500, 503)),
        "stored twice": len(stored) - len(in_db),
    }
    for what, n in checks.items():
        print(f"{what}: {n}")
    server, base = start(faulty=False)
    after = post(base, "after", "v0")
    print(f"a POST after the restart: {after}")
    broken = any(checks.values()) or after != 200
finally:
    if server.poll() is None:
        server.terminate()
        server.wait()
    print(f"files and log: {work}")
raise SystemExit(1 if broken else 0)
