#!/usr/bin/env python3
"""Time of a stream replay from the start, on two builds taking turns.

A client that reconnects to `GET /v3/conversations/events` with `Last-Event-ID` is sent
what it missed, read back from the database page by page; after a restart every client does
this at once. This starts `switchboard serve` for each build on a database of its own,
writes MESSAGES agent messages to one visitor (each build the same), then in four rounds
(the builds taking turns going first) opens the account stream with `Last-Event-ID: 0`
REPS times one after the other, reads until all MESSAGES + 1 events (the messages and the
chat they started) have arrived and closes it, and prints the wall time per replay and
A's time over B's per round (above 100%: B is faster). One client, so it is latency, not
throughput; the machine's noise applies, hence the rounds.

    scripts/replay-bench.py --switchboard A --against B [--messages 300] [--reps 200]
"""
import argparse
import http.client
import json
import os
import socket
import subprocess
import tempfile
import time

KEY = "xkeysib-replay-bench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, directory):
    port = free_port()
    env = dict(os.environ, SWITCHBOARD_API_KEY=KEY, RUST_LOG="warn")
    db = os.path.join(directory, "switchboard.db")
    proc = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--db", db],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(1000):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.01)
    proc.kill()
    raise SystemExit(f"{binary} did not answer /health")


def seed(port, messages):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for i in range(messages):
        body = json.dumps(
            {
                "visitorId": "replay-visitor",
                "text": f"message {i}",
                "agentEmail": "ann@example.com",
                "agentName": "Ann",
            }
        )
        headers = {"api-key": KEY, "content-type": "application/json"}
        c.request("POST", "/v3/conversations/messages", body, headers)
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"POST answered {r.status}")


def replay(port, events):
    """Reads a replay from the start until `events` events have arrived; returns how many."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(
        "GET",
        "/v3/conversations/events",
        headers={"api-key": KEY, "last-event-id": "0"},
    )
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"events answered {r.status}")
    seen, buf = 0, b""
    while seen < events:
        chunk = r.fp.read1(65536)
        if not chunk:
            break
        buf += chunk
        seen = buf.count(b"\nevent: ") + buf.startswith(b"event: ")
    c.close()
    return seen


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--switchboard", required=True, help="build A")
    ap.add_argument("--against", required=True, help="build B")
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    builds = [args.switchboard, args.against]
    events = args.messages + 1
    servers = []
    times = {b: [] for b in builds}
    with tempfile.TemporaryDirectory() as a_dir, tempfile.TemporaryDirectory() as b_dir:
        try:
            for build, directory in zip(builds, [a_dir, b_dir]):
                proc, port = start(build, directory)
                servers.append((build, proc, port))
                seed(port, args.messages)
                got = replay(port, events)
                if got < events:
                    raise SystemExit(f"{build} replayed {got} events, not {events}")
            for rnd in range(4):
                for build, _, port in servers if rnd % 2 == 0 else servers[::-1]:
                    t = time.perf_counter()
                    for _ in range(args.reps):
                        replay(port, events)
                    times[build].append((time.perf_counter() - t) / args.reps * 1000)
        finally:
            for _, proc, _ in servers:
                proc.terminate()
                proc.wait()
    for name, build in zip("AB", builds):
        rounds = ", ".join(f"{x:.2f}" for x in times[build])
        print(f"{name} {build}: ms per replay of {events} events: {rounds}")
    ratios = [100 * a / b for a, b in zip(times[builds[0]], times[builds[1]])]
    print("time A/B per round:", ", ".join(f"{r:.0f}%" for r in ratios))


if __name__ == "__main__":
    main()
