#!/usr/bin/env python3
"""A real browser on another origin calls switchboard: the REST API with an api-key, the
widget API with a visitor token, and the visitor WebSocket.

Starts `switchboard serve` on a temporary database and a page server on another port of
127.0.0.1 (so another origin), opens the page in headless Chromium, and collects what the
page's fetch calls could read. Then it does the same against a server started with
`--cors-origins https://elsewhere.example`, where the browser must refuse to let the page
read the answers: the check that the first run's success comes from CORS.

    apt-get install chromium          # once (Debian's package)
    cargo build --release -p switchboard-server
    scripts/browser-cors-check.py [--switchboard target/release/switchboard] [--chromium chromium]

Exit status 0 when every expectation holds. Everything runs on loopback and is stopped
by pid at the end.
"""

import argparse
import http.server
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading

KEY = "xkeysib-browser-check"

PAGE = """<!doctype html><meta charset="utf-8"><title>cors check</title><script>
const api = %(api)s, widget = %(widget)s, key = %(key)s, agent = %(agent)s;
async function attempt(name, f) {
  try { return [name, await f()]; } catch (e) { return [name, "refused: " + e.name]; }
}
async function read(r) { return {status: r.status, body: await r.json().catch(() => null),
  retryAfter: r.headers.get("retry-after")}; }
(async () => {
  const out = {};
  const steps = [
    ["post message", () => fetch(api + "/v3/conversations/messages", {method: "POST",
      headers: {"api-key": key, "content-type": "application/json", "idempotency-key": "k1"},
      body: JSON.stringify({visitorId: "browser-visitor", text: "hi <b>", agentId: agent})}).then(read)],
    ["no key", () => fetch(api + "/v3/conversations/messages/nope").then(read)],
    ["session", () => fetch(api + "/widget/v1/" + widget + "/session", {method: "POST",
      headers: {"content-type": "application/json"}, body: JSON.stringify({name: "Ada"})}).then(read)],
  ];
  for (const [name, f] of steps) { const [n, v] = await attempt(name, f); out[n] = v; }
  const token = out["session"] && out["session"].body && out["session"].body.token;
  if (token) {
    const auth = {"authorization": "Bearer " + token};
    out["visitor says"] = (await attempt("x", () => fetch(api + "/widget/v1/" + widget + "/messages",
      {method: "POST", headers: {...auth, "content-type": "application/json"},
       body: JSON.stringify({text: "hello from the browser"})}).then(read)))[1];
    out["history"] = (await attempt("x", () => fetch(api + "/widget/v1/" + widget + "/messages",
      {headers: auth}).then(read)))[1];
    out["websocket"] = await new Promise((done) => {
      const ws = new WebSocket(api.replace("http", "ws") + "/widget/v1/" + widget + "/ws?cursor=0&token=" + token);
      const seen = [];
      ws.onmessage = (m) => { const f = JSON.parse(m.data); seen.push(f.event);
        if (f.event === "ready") { ws.close(); done(seen); } };
      ws.onerror = () => done("refused");
      setTimeout(() => done("no ready within 10 s: " + seen), 10000);
    });
  }
  await fetch("/result", {method: "POST", body: JSON.stringify(out)});
})();
</script>"""


def start_server(binary, db, extra):
    env = dict(os.environ, SWITCHBOARD_API_KEY=KEY, RUST_LOG="warn")
    p = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--db", db] + extra,
                         stdout=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:
        if line.startswith("listening on "):
            return p, line.split()[-1]
    raise SystemExit("switchboard exited before listening")


def cli(binary, db, *args):
    out = subprocess.run([binary, "--db", db, *args, "--json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def run_page(chromium, api, widget, agent, workdir):
    results = queue.Queue()
    page = (PAGE % {"api": json.dumps(api), "widget": json.dumps(widget),
                    "key": json.dumps(KEY), "agent": json.dumps(agent)}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            self.send_response(204)
            self.end_headers()
            results.put(json.loads(body))

        def log_message(self, *a):
            pass

    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{pages.server_address[1]}"
    profile = tempfile.mkdtemp(dir=workdir)
    browser = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", origin + "/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return origin, results.get(timeout=60)
    finally:
        browser.kill()
        browser.wait()
        pages.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--switchboard", default="target/release/switchboard")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    a = ap.parse_args()
    failures = []

    def expect(what, ok):
        print(("ok    " if ok else "FAIL  ") + what)
        if not ok:
            failures.append(what)

    with tempfile.TemporaryDirectory() as work:
        for cors in ["*", "https://elsewhere.example"]:
            db = os.path.join(work, f"cors-{len(failures)}-{cors[:5]}.db".replace(":", ""))
            server, api = start_server(a.switchboard, db, ["--cors-origins", cors])
            try:
                agent = cli(a.switchboard, db, "agents", "add", "--name", "Julia")["id"]
                widget = cli(a.switchboard, db, "accounts", "widget")["widgetId"]
                origin, got = run_page(a.chromium, api, widget, agent, work)
            finally:
                server.kill()
                server.wait()
            print(f"--cors-origins {cors}: page at {origin}, switchboard at {api}")
            print("  " + json.dumps(got))
            if cors == "*":
                post = got.get("post message", {})
                expect("POST /v3/conversations/messages read by the page",
                       isinstance(post, dict) and post.get("status") == 200
                       and post["body"]["html"] == "hi &lt;b&gt;")
                nokey = got.get("no key", {})
                expect("a 401's Brevo error body read by the page",
                       isinstance(nokey, dict) and nokey.get("status") == 401
                       and nokey["body"]["code"] == "unauthorized")
                expect("widget session", isinstance(got.get("session"), dict)
                       and got["session"]["status"] == 200)
                says = got.get("visitor says", {})
                expect("visitor message with a Bearer token",
                       isinstance(says, dict) and says.get("status") == 200)
                history = got.get("history", {})
                expect("history read", isinstance(history, dict) and history.get("status") == 200
                       and len(history["body"]["messages"]) == 1)
                expect("WebSocket replay then ready", got.get("websocket") == ["messageCreated", "ready"])
            else:
                for step in ["post message", "no key", "session"]:
                    expect(f"{step}: refused by the browser for another origin",
                           got.get(step) == "refused: TypeError")
    if failures:
        print(f"{len(failures)} expectation(s) failed")
        sys.exit(1)
    print("all expectations held")


if __name__ == "__main__":
    main()
