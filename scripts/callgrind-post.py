#!/usr/bin/env python3
"""Instructions per durable POST, thread by thread, counted by callgrind.

Timing on the shared 2-core machine moves by +-20% between rounds, so a change worth a few
percent cannot be seen in requests/s. Instruction counts can: callgrind counts them the
same way every time. This runs `switchboard serve` under `valgrind --tool=callgrind` twice
per build, sends BASE and then POSTS durable POSTs (the benchmark's body) over CONNECTIONS
keep-alive connections, and prints the difference divided by POSTS - BASE: the
instructions one more POST costs, without start-up and shutdown. User space only (system
calls are not counted), and callgrind runs one thread at a time, so group commits are not
the sizes of a real run; compare builds, not absolute figures. SHA-256 runs in software
under valgrind (no SHA extensions), which inflates the workers' count by about 3,500.

    scripts/callgrind-post.py [--switchboard A] [--against B] [--posts 8000] [--base 2000]

With --batch N it counts the store alone at a group-commit size of N instead: A and B are
then builds of the `writer_batches` example (target/release/examples/writer_batches),
which submits N agent messages at once, POSTS / N times (BASE / N for the base), so that
every commit holds N messages as in a real run at 64 connections; the figures are per
message, and only the writer's count is comparable to a server's.
"""
import argparse
import asyncio
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile

BODY = (b'{"visitorId":"kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg","text":"Hello! How can I help you?",'
        b'"agentEmail":"liz@getwear.com","agentName":"Liz","receivedFrom":"bench"}')
KEY = "xkeysib-callgrind"

# The function that identifies each kind of thread in its callgrind output.
KINDS = [("writer", "writer_loop"), ("checkpointer", "checkpoint_loop"),
         ("tokio workers", "multi_thread::worker::run")]


async def post_many(host, port, count):
    """Sends `count` POSTs one after the other on one connection; every answer must be 200."""
    reader, writer = await asyncio.open_connection(host, port)
    request = (f"POST /v3/conversations/messages HTTP/1.1\r\nhost: {host}:{port}\r\n"
               f"api-key: {KEY}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(BODY)}\r\n\r\n").encode() + BODY
    for _ in range(count):
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {head[:200]!r}")
        length = re.search(rb"content-length: (\d+)", head, re.I)
        await reader.readexactly(int(length.group(1)))
    writer.close()


def by_kind(out):
    """Instructions of the callgrind files `out`.*-* (one per thread), by thread kind."""
    kinds = {}
    for path in glob.glob(out + ".*-*"):
        text = open(path).read()
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        kind = next((k for k, f in KINDS if f in text), "other")
        kinds[kind] = kinds.get(kind, 0) + (int(total.group(1)) if total else 0)
    return kinds


def count(binary, posts, connections, workdir):
    """Runs the server under callgrind for `posts` POSTs; instructions by thread kind."""
    out = os.path.join(workdir, f"cg-{posts}")
    env = dict(os.environ, SWITCHBOARD_API_KEY=KEY, RUST_LOG="warn")
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--separate-threads=yes",
         f"--callgrind-out-file={out}.%p", binary, "serve", "--listen", "127.0.0.1:0",
         "--db", os.path.join(workdir, f"db-{posts}.sqlite")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        addr = None
        for line in server.stdout:
            line = line.decode()
            if line.startswith("listening on http://"):
                addr = line.strip()[len("listening on http://"):]
                break
        if addr is None:
            raise RuntimeError(f"{binary} exited before listening")
        host, port = addr.rsplit(":", 1)

        async def drive():
            # The first message creates the agent, the visitor and the conversation.
            await post_many(host, int(port), 1)
            per = posts // connections
            await asyncio.gather(*(post_many(host, int(port), per) for _ in range(connections)))

        asyncio.run(drive())
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=300)
    return by_kind(out)


def count_batches(binary, messages, batch, workdir):
    """Runs the writer_batches example under callgrind; instructions by thread kind."""
    out = os.path.join(workdir, f"cg-{messages}")
    subprocess.run(
        ["valgrind", "--tool=callgrind", "--separate-threads=yes",
         f"--callgrind-out-file={out}.%p", binary, str(batch), str(messages // batch)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
        env=dict(os.environ, RUST_LOG="warn"))
    return by_kind(out)


def per_post(binary, args):
    unit = args.batch or args.connections
    with tempfile.TemporaryDirectory() as workdir:
        if args.batch:
            base = count_batches(binary, args.base, args.batch, workdir)
            full = count_batches(binary, args.posts, args.batch, workdir)
        else:
            base = count(binary, args.base, args.connections, workdir)
            full = count(binary, args.posts, args.connections, workdir)
    extra = args.posts // unit * unit - args.base // unit * unit
    return {k: (full.get(k, 0) - base.get(k, 0)) / extra for k in set(base) | set(full)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--switchboard", default="target/release/switchboard")
    p.add_argument("--against", help="a second build, counted the same way")
    p.add_argument("--posts", type=int, default=8000)
    p.add_argument("--base", type=int, default=2000)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--batch", type=int,
                   help="count the writer_batches example at this group-commit size")
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is required")
    builds = [("A", args.switchboard)] + ([("B", args.against)] if args.against else [])
    results = {label: per_post(binary, args) for label, binary in builds}
    order = [k for k, _ in KINDS] + ["other"]
    if args.batch:
        print(f"instructions per message ({args.posts} - {args.base} messages, "
              f"group commits of {args.batch})")
    else:
        print(f"instructions per POST ({args.posts} - {args.base} POSTs, "
              f"{args.connections} connections)")
    print("thread".ljust(16) + "".join(label.rjust(12) for label, _ in builds)
          + ("B/A".rjust(9) if args.against else ""))
    rows = order + ["all"]
    for kind in rows:
        values = [sum(r.values()) if kind == "all" else r.get(kind, 0) for r in results.values()]
        line = kind.ljust(16) + "".join(f"{v:12,.0f}" for v in values)
        if args.against and values[0]:
            line += f"{100 * values[1] / values[0]:8.1f}%"
        print(line)


if __name__ == "__main__":
    main()
