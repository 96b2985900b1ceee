"""The labelling page: Flask on localhost, one page, a small JSON API.

GET  /              the page (keys: left arrow or 1 = left, right arrow or 2 = right,
                    down arrow or t = tie, s = skip)
GET  /api/pair      the pair being asked, progress, and whether the session is done
POST /api/answer    {"index": i, "choice": "left" | "right" | "tie" | "skip"}: recorded
                    (on disk) before the reply, which carries the next pair
GET  /api/agreement how often the reward source agrees with the answers so far

Requests are served by threads, so an idle or slow client cannot stall the page: a request's
body is read whole (at most MAX_BODY bytes, else 413; a client silent for READ_TIMEOUT_S
seconds is dropped) before the request takes the lock under which requests are handled one at
a time, so two tabs (or a double key press) cannot answer the same pair twice; the second
answer to a pair is ignored and gets the current pair back.
The page answers only to its own address: a request whose Host (or Origin) names another
site is refused (403), which closes the DNS-rebinding door through which a page elsewhere
could read the pairs and record answers. No static folder is served.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from rlhf.apps.label import CHOICES, Session

MAX_BODY = 64 * 1024  # an answer is a few dozen bytes
READ_TIMEOUT_S = 10.0  # a connection that sends nothing for this long is closed

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rlhf-label</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
 header { display: flex; justify-content: space-between; align-items: baseline; }
 #bar { height: .5rem; background: #eee; border-radius: .25rem; margin: .5rem 0 1.5rem; }
 #fill { height: 100%; width: 0; background: #3a7; border-radius: .25rem; }
 #prompt { font-size: 1.1rem; background: #f6f6f6; padding: .8rem 1rem; border-radius: .4rem; }
 .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin: 1rem 0; }
 .response { border: 2px solid #ccc; border-radius: .4rem; padding: 1rem; min-height: 6rem; white-space: pre-wrap; }
 .keys button { font-size: 1rem; margin-right: .5rem; padding: .5rem 1rem; }
 #hint { color: #b33; min-height: 1.4rem; }
 kbd { border: 1px solid #aaa; border-radius: .2rem; padding: 0 .3rem; font-size: .85rem; }
</style></head>
<body>
<header><h1>Which response is better?</h1><span id="progress"></span></header>
<div id="bar"><div id="fill"></div></div>
<main id="ask">
 <div id="prompt"></div>
 <div class="pair">
  <div><h3>Left <kbd>&larr;</kbd> <kbd>1</kbd></h3><div class="response" id="left"></div></div>
  <div><h3>Right <kbd>&rarr;</kbd> <kbd>2</kbd></h3><div class="response" id="right"></div></div>
 </div>
 <div class="keys">
  <button id="b-left">Left is better</button><button id="b-right">Right is better</button>
  <button id="b-tie">Tie <kbd>&darr;</kbd> <kbd>t</kbd></button><button id="b-skip">Skip <kbd>s</kbd></button>
 </div>
</main>
<p id="hint"></p>
<section id="done" hidden><h2>All pairs answered</h2><p id="summary"></p><p id="agreement"></p><pre id="next"></pre></section>
<script>
let current = null, busy = false;
const KEYS = {ArrowLeft: "left", "1": "left", ArrowRight: "right", "2": "right", ArrowDown: "tie", t: "tie", s: "skip"};
function show(state) {
  const p = state.progress;
  document.getElementById("progress").textContent = `${p.answered} / ${p.total} answered`;
  document.getElementById("fill").style.width = (100 * p.answered / p.total) + "%";
  if (state.done) {
    current = null;
    document.getElementById("ask").hidden = true;
    document.getElementById("done").hidden = false;
    document.getElementById("summary").textContent =
      `${p.preferred} preferences, ${p.ties} ties, ${p.skips} skipped, saved in ${state.out}`;
    document.getElementById("next").textContent = state.next_steps;
    fetch("/api/agreement").then(r => r.json()).then(a => document.getElementById("agreement").textContent = a.text);
    return;
  }
  current = state.pair;
  document.getElementById("prompt").textContent = current.prompt;
  document.getElementById("left").textContent = current.left;
  document.getElementById("right").textContent = current.right;
}
async function answer(choice) {
  if (!current || busy) return;
  busy = true;
  try {
    const r = await fetch("/api/answer", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify({index: current.index, choice})});
    const state = await r.json();
    document.getElementById("hint").textContent = r.ok ? "" : state.error;
    if (r.ok) show(state);
  } catch (e) {
    document.getElementById("hint").textContent = "the labelling server is not answering: is rlhf-label still running?";
  } finally { busy = false; }
}
document.addEventListener("keydown", e => {
  if (e.ctrlKey || e.metaKey || e.altKey || ["Shift", "Control", "Alt", "Meta", "Tab"].includes(e.key)) return;
  const choice = KEYS[e.key];
  if (choice) { e.preventDefault(); answer(choice); }
  else if (current) document.getElementById("hint").textContent =
    `unknown key "${e.key}": use \u2190 or 1 (left), \u2192 or 2 (right), \u2193 or t (tie), s (skip)`;
});
for (const c of ["left", "right", "tie", "skip"]) document.getElementById("b-" + c).onclick = () => answer(c);
fetch("/api/pair").then(r => r.json()).then(show);
</script></body></html>
"""


def make_app(session: Session, out: str, next_steps: str, agreement_line) -> Any:
    from flask import Flask, g, jsonify, request

    app = Flask("rlhf-label", static_folder=None)  # serves nothing from the current directory
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY  # a larger body: 413, never read
    app.config["done"] = threading.Event()
    app.config["hosts"] = {"localhost"}  # until serve() knows its port: only an in-process test client
    lock = threading.Lock()

    @app.before_request
    def own_address_only():
        host, origin = request.headers.get("Host", ""), request.headers.get("Origin")
        if host.lower() not in app.config["hosts"] or (origin is not None and not _same_site(origin, app.config["hosts"])):
            return jsonify({"error": f"this page answers only to {sorted(app.config['hosts'])[0]}, not to Host "
                                     f"{host!r}{f' from Origin {origin!r}' if origin else ''}"}), 403
        request.get_data(cache=True)  # the whole body first, outside the lock: a slow client holds only its thread
        lock.acquire()  # one request at a time: answers are counted once
        g.holds_lock = True

    @app.teardown_request
    def release(exc=None):
        if g.pop("holds_lock", False):
            lock.release()

    def state() -> dict:
        pair = session.current()
        if pair is None:
            app.config["done"].set()
        return {"done": pair is None, "progress": session.progress(), "out": out, "next_steps": next_steps,
                "pair": None if pair is None else vars(pair)}

    @app.get("/")
    def page():
        return PAGE

    @app.get("/api/pair")
    def get_pair():
        return jsonify(state())

    @app.post("/api/answer")
    def post_answer():
        try:  # (json's parser recurses: a deeply nested body is a bad request, not a server error)
            body = json.loads(request.get_data(cache=False) or b"null")
        except (ValueError, RecursionError):
            body = None
        index = body.get("index") if isinstance(body, dict) else None
        bad_index = not isinstance(index, int) or isinstance(index, bool)
        if not isinstance(body, dict) or body.get("choice") not in CHOICES or bad_index:
            return jsonify({"error": f"expected {{\"index\": <int>, \"choice\": one of {list(CHOICES)}}}, "
                                     f"got {repr(body)[:200]}"}), 400
        session.answer(body["index"], body["choice"])  # False: that pair was answered already; nothing written
        return jsonify(state())

    @app.get("/api/agreement")
    def get_agreement():
        a = session.agreement()
        return jsonify({**(a or {}), "text": agreement_line(a)})

    return app


def allowed_hosts(host: str, port: int) -> set[str]:
    """The Host headers that name this server: its address, and the loopback names when it
    listens on loopback; listening on every interface, this machine's names and addresses."""
    import socket

    names = {host}
    if host in ("127.0.0.1", "localhost", "::1"):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    elif host in ("0.0.0.0", "::", ""):
        names |= {"127.0.0.1", "localhost", "[::1]", socket.gethostname(), socket.getfqdn()}
        try:
            names |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    return {f"{n}:{port}".lower() for n in names}


def _same_site(origin: str, hosts: set[str]) -> bool:
    from urllib.parse import urlparse

    url = urlparse(origin)
    return url.scheme == "http" and url.netloc.lower() in hosts


def serve(app: Any, host: str, port: int, exit_when_done: bool, announce) -> None:
    """Serve until interrupted, or (exit_when_done) shortly after the last answer, leaving
    the page time to fetch the summary and the agreement."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Handler(WSGIRequestHandler):
        timeout = READ_TIMEOUT_S  # the socket's: a client silent this long is dropped, its thread freed

    server = make_server(host, port, app, threaded=True, request_handler=Handler)  # an idle connection holds one thread
    app.config["hosts"] = allowed_hosts(host, server.port)
    announce(f"http://{host}:{server.port}/")
    if exit_when_done:
        def stop_when_done():
            app.config["done"].wait()
            threading.Event().wait(3.0)
            server.shutdown()

        threading.Thread(target=stop_when_done, daemon=True).start()
    try:
        server.serve_forever()
    finally:
        server.server_close()
