#!/usr/bin/env python3
"""Mock LLM provider for the modelcache tests (python3 stdlib only).

Serves fixture bodies on provider-like paths, with per-route failure modes,
and a control API under /__mock/ (not counted):

  POST /__mock/route   body: route spec JSON   -> {"ok":true}
  POST /__mock/reset   default routes, zeroed counters and request log
  GET  /__mock/stats   counters, in-flight numbers and the request log

Route spec: path (required), auth, status, fixture | body, content_type,
headers, delay_ms, mode (normal|hang|reset|garbage|truncate|chunked|stamp),
times.  A route with "auth" matches when Authorization, x-api-key, api-key or
x-goog-api-key equals it exactly; such routes win over path-only routes.
"""

import argparse
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MODES = ("normal", "hang", "reset", "garbage", "truncate", "chunked", "stamp")
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
GARBAGE_BODY = b"this is not json {{{"
HANG_MAX_SECONDS = 300
CHUNK_SIZE = 1000
CONTROL_PREFIX = "/__mock/"


def _json_bytes(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


NO_ROUTE_BODY = _json_bytes(
    {"error": {"message": "no such route", "type": "invalid_request_error"}})
BAD_KEY_BODY = _json_bytes({"error": {
    "message": "Incorrect API key provided", "type": "invalid_request_error",
    "param": None, "code": "invalid_api_key"}})

DEFAULT_ROUTES = (
    {"path": "/v1/models", "fixture": "openai_models.json"},
    {"path": "/v1/models", "auth": "Bearer key-b",
     "fixture": "openai_models_profile_b.json"},
    {"path": "/v1/models", "auth": "Bearer bad-key", "status": 401,
     "body": BAD_KEY_BODY.decode()},
    {"path": "/anthropic/v1/models", "fixture": "anthropic_models_all.json"},
    {"path": "/api/tags", "fixture": "ollama_tags.json"},
    {"path": "/openrouter/api/v1/models", "fixture": "openrouter_models.json"},
    {"path": "/lmstudio/v1/models", "fixture": "lmstudio_v1_models.json"},
    {"path": "/gemini/v1beta/models", "fixture": "gemini_models_page1.json"},
    {"path": "/big", "fixture": "adv_large_12mb.json"},
)


class SpecError(ValueError):
    """A route spec sent to the control API is invalid."""


class Fixtures:
    """Fixture files, read once and kept in memory (the 12 MiB one included)."""

    def __init__(self, directory):
        self.directory = directory
        self._cache = {}
        self._lock = threading.Lock()

    def exists(self, name):
        return name is None or os.path.isfile(os.path.join(self.directory, name))

    def get(self, name):
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise SpecError("bad fixture name: %r" % (name,))
        with self._lock:
            if name not in self._cache:
                try:
                    with open(os.path.join(self.directory, name), "rb") as f:
                        self._cache[name] = f.read()
                except OSError as e:
                    raise SpecError("fixture %s: %s" % (name, e.strerror))
            return self._cache[name]


class Route:
    def __init__(self, spec, fixtures, default_delay_ms):
        if not isinstance(spec, dict):
            raise SpecError("route spec must be a JSON object")
        self.path = spec.get("path")
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise SpecError("route needs a path starting with /")
        self.auth = spec.get("auth")
        self.status = int(spec.get("status", 200))
        self.content_type = str(spec.get("content_type", "application/json"))
        self.headers = {str(k): str(v) for k, v in spec.get("headers", {}).items()}
        self.delay_ms = float(spec.get("delay_ms", default_delay_ms))
        self.mode = spec.get("mode", "normal")
        if self.mode not in MODES:
            raise SpecError("unknown mode %r" % (self.mode,))
        self.times = spec.get("times")
        if self.times is not None and (not isinstance(self.times, int) or self.times < 1):
            raise SpecError("times must be a positive integer")
        if "fixture" in spec:
            self.body = fixtures.get(spec["fixture"])
        else:
            self.body = str(spec.get("body", "")).encode()

    def key(self):
        return (self.path, self.auth)


class State:
    """Routes, counters and the request log, shared by all handler threads."""

    def __init__(self, fixtures, default_delay_ms):
        self.fixtures = fixtures
        self.default_delay_ms = default_delay_ms
        self.lock = threading.Lock()
        self.in_flight = 0
        self.reset()

    def reset(self):
        # a default route whose fixture is absent (the make-run demo ships
        # one list) is left out; routes sent to the control API stay strict
        routes = [self._route(spec) for spec in DEFAULT_ROUTES
                  if self.fixtures.exists(spec.get("fixture"))]
        with self.lock:
            self.routes = routes
            self.seq = 0
            self.by_path = {}
            self.by_auth = {}
            self.requests = []
            self.max_in_flight = self.in_flight

    def _route(self, spec):
        return Route(spec, self.fixtures, self.default_delay_ms)

    def add_route(self, spec):
        route = self._route(spec)
        with self.lock:
            if route.times is not None:
                self.routes.insert(0, route)
                return
            for i, old in enumerate(self.routes):
                if old.times is None and old.key() == route.key():
                    self.routes[i] = route
                    return
            self.routes.append(route)

    def begin(self, method, url, headers):
        """Count an arriving request and pick its route (None: no route)."""
        lowered = {}
        for name, value in headers.items():
            name = name.lower()
            lowered[name] = lowered[name] + ", " + value if name in lowered else value
        credentials = [lowered[h] for h in CREDENTIAL_HEADERS if h in lowered]
        auth = credentials[0] if credentials else ""
        with self.lock:
            self.seq += 1
            self.by_path[url.path] = self.by_path.get(url.path, 0) + 1
            self.by_auth[auth] = self.by_auth.get(auth, 0) + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            record = {"seq": self.seq, "method": method, "path": url.path,
                      "query": url.query, "auth": auth, "headers": lowered,
                      "t_start": time.time(), "t_end": None}
            self.requests.append(record)
            return record, self._take_route(url.path, credentials)

    def _take_route(self, path, credentials):
        for want_auth in (True, False):
            for route in self.routes:
                if route.path != path or (route.auth is not None) != want_auth:
                    continue
                if want_auth and route.auth not in credentials:
                    continue
                if route.times is not None:
                    route.times -= 1
                    if route.times == 0:
                        self.routes.remove(route)
                return route
        return None

    def end(self, record):
        with self.lock:
            record["t_end"] = time.time()
            self.in_flight -= 1

    def stats(self):
        with self.lock:
            return _json_bytes({
                "total": self.seq, "by_path": self.by_path, "by_auth": self.by_auth,
                "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "requests": self.requests})


def stamp(body, seq):
    """Insert "mock_seq":N as the first member of a JSON object text."""
    brace = body.find(b"{")
    if brace < 0:
        return body
    rest = body[brace + 1:]
    separator = b"" if rest.lstrip().startswith(b"}") else b","
    return body[:brace + 1] + b'"mock_seq":%d' % seq + separator + rest


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self):
        return "mock-provider/1"

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, TimeoutError):
            pass  # the client went away; that must never matter to the server

    def log_message(self, fmt, *args):
        pass

    def log_error(self, fmt, *args):
        sys.stderr.write("mock provider: %s\n" % (fmt % args))

    # Any method name (GET, HEAD, PURGE, ...) is served by _dispatch.
    def __getattr__(self, name):
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    @property
    def state(self):
        return self.server.state

    def _dispatch(self):
        url = urlsplit(self.path)
        body = self._read_body()
        if url.path.startswith(CONTROL_PREFIX):
            self._control(url.path[len(CONTROL_PREFIX):], body)
            return
        record, route = self.state.begin(self.command, url, self.headers)
        try:
            if route is None:
                self._send(404, NO_ROUTE_BODY)
            else:
                self._serve(route, record["seq"])
        finally:
            self.state.end(record)

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked_body(self):
        body = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            body += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailer fields
        return bytes(body)

    def _control(self, action, body):
        try:
            if action == "route" and self.command == "POST":
                self.state.add_route(json.loads(body or b"null"))
                reply = _json_bytes({"ok": True})
            elif action == "reset" and self.command == "POST":
                self.state.reset()
                reply = _json_bytes({"ok": True})
            elif action == "stats" and self.command == "GET":
                reply = self.state.stats()
            else:
                self._send(404, _json_bytes({"ok": False, "error": "no such control"}))
                return
        except (ValueError, TypeError, AttributeError) as e:  # bad JSON or spec
            self._send(400, _json_bytes({"ok": False, "error": str(e)}))
            return
        self._send(200, reply)

    def _serve(self, route, seq):
        if route.mode == "hang":
            self._hang()
            return
        if route.delay_ms > 0:
            time.sleep(route.delay_ms / 1000.0)
        if route.mode == "reset":
            self._reset()
        elif route.mode == "truncate":
            self._send_truncated(route)
        elif route.mode == "chunked":
            self._send_chunked(route)
        else:
            body = {"garbage": GARBAGE_BODY,
                    "stamp": stamp(route.body, seq)}.get(route.mode, route.body)
            self._send(route.status, body, route.content_type, route.headers)

    def _send_head(self, status, content_type, headers, length=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name, value)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(self, status, body, content_type="application/json", headers=None):
        self._send_head(status, content_type, headers or {}, len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_truncated(self, route):
        self._send_head(route.status, route.content_type, route.headers, len(route.body))
        self.close_connection = True
        if self.command != "HEAD":
            self.wfile.write(memoryview(route.body)[:len(route.body) // 2])

    def _send_chunked(self, route):
        self._send_head(route.status, route.content_type, route.headers)
        if self.command == "HEAD":
            return
        body = memoryview(route.body)
        for start in range(0, len(body), CHUNK_SIZE):
            chunk = body[start:start + CHUNK_SIZE]
            self.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _hang(self):
        """Answer nothing; return once the client closes (or after 300 s)."""
        self.close_connection = True
        deadline = time.monotonic() + HANG_MAX_SECONDS
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readable, _, _ = select.select([self.connection], [], [], min(left, 1.0))
            if readable and not self.connection.recv(65536):
                return

    def _reset(self):
        """Close with a TCP RST instead of a FIN."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   struct.pack("ii", 1, 0))
        # Close the descriptor now: the server's usual shutdown(SHUT_WR) would
        # send a FIN first.  rfile holds the last reference to the socket.
        self.connection.close()
        self.rfile.close()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address, state):
        self.state = state
        super().__init__(address, Handler)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def parse_args(argv):
    p = argparse.ArgumentParser(description="mock LLM provider for tests")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--fixtures", required=True)
    p.add_argument("--delay-ms", type=float, default=0)
    p.add_argument("--pidfile")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="exit when the process that started us is gone")
    args = p.parse_args(argv)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        p.error("--host must be a loopback IP address")
    if not os.path.isdir(args.fixtures):
        p.error("--fixtures %s is not a directory" % args.fixtures)
    return args


def watch_parent():
    """Stop the server when our parent dies, so a killed test leaves nothing behind."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_on_signal(signum, frame):
    raise SystemExit(0)


def main(argv):
    args = parse_args(argv)
    state = State(Fixtures(args.fixtures), args.delay_ms)
    server = Server((args.host, args.port), state)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    if args.exit_with_parent:
        threading.Thread(target=watch_parent, daemon=True).start()
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write("%d\n" % os.getpid())
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if args.pidfile:
            try:
                os.unlink(args.pidfile)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
