"""A fault-injecting HTTP proxy on 127.0.0.1, in front of the tests' moto S3 server.

Each request to an object (``/bucket/key...``; bucket-level requests such as listings pass
untouched) is numbered; ``plan(method, path, number)`` says which fault, if any, it gets:

- ``"503"``: 503 SlowDown, as S3 answers under load;
- ``"500"``: 500 InternalError;
- ``"drop"``: the connection is closed without an answer;
- ``"truncate"``: the real answer's headers (full Content-Length), half its body, then close;
- ``"stall"``: nothing for ``stall_s`` seconds (longer than the client's read timeout), then close;
- ``"stall_body"``: the real headers and half the body, then ``stall_s`` seconds of nothing.

A fault that needs a body (truncate, stall_body) on an answer without one falls back to a
drop. The proxy only ever talks to loopback; ``budget`` bounds the faults it injects, and
``stop()`` ends it. ``injected`` counts the faults by kind, ``requests`` every request,
``log`` holds the last 10,000 object requests as (method, path, fault).

``delay_s`` holds every request (listings too) that long before relaying it, as a distant
store's round trip; ``listings`` counts the listing requests (``list-type=2``) and
``most_listings_at_once`` the most of them in the proxy at one time.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

KINDS = ("503", "500", "drop", "truncate", "stall", "stall_body")
_ERRORS = {"503": (503, "SlowDown", "Please reduce your request rate."),
           "500": (500, "InternalError", "We encountered an internal error. Please try again.")}
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}


def every(k: int, kinds=KINDS, methods=("GET", "PUT", "HEAD", "POST"),
          per_path: int | None = None) -> Callable[[str, str, int], str | None]:
    """A plan: every ``k``-th object request (of ``methods``) gets the next of ``kinds`` in turn;
    with ``per_path``, no object gets more than that many faults (a transient fault: it must
    clear within the client's retries, whatever order concurrent requests arrive in)."""
    state = {"n": 0}
    hits: Counter = Counter()
    lock = threading.Lock()

    def plan(method: str, path: str, number: int) -> str | None:
        if method not in methods or number % k:
            return None
        key = path.split("?", 1)[0]
        with lock:
            if per_path is not None and hits[key] >= per_path:
                return None
            hits[key] += 1
            state["n"] += 1
            return kinds[(state["n"] - 1) % len(kinds)]
    return plan


class FaultProxy:
    def __init__(self, upstream: str, plan: Callable[[str, str, int], str | None] | None = None,
                 stall_s: float = 3.0, budget: int = 10_000, delay_s: float = 0.0):
        up = urlsplit(upstream)
        assert up.hostname == "127.0.0.1", "the proxy forwards to loopback only"
        self.upstream = (up.hostname, up.port)
        self.plan = plan or (lambda method, path, number: None)
        self.stall_s, self.budget, self.delay_s = stall_s, budget, delay_s
        self.listings = self.most_listings_at_once = self._listing_now = 0
        self.injected: Counter = Counter()
        self.requests = 0
        self.log: deque = deque(maxlen=10_000)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _listing(self, path: str, change: int) -> None:
        if "list-type=2" in path:
            with self._lock:
                self._listing_now += change
                self.listings += max(0, change)
                self.most_listings_at_once = max(self.most_listings_at_once, self._listing_now)

    def _fault_for(self, method: str, path: str) -> str | None:
        bucket_and_key = path.split("?", 1)[0].lstrip("/").split("/", 1)
        if len(bucket_and_key) < 2 or not bucket_and_key[1]:
            return None
        with self._lock:
            self.requests += 1
            number = self.requests
            fault = self.plan(method, path, number) if sum(self.injected.values()) < self.budget else None
            if fault:
                self.injected[fault] += 1
            self.log.append((method, path, fault))
        return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _relay(self):
                proxy._listing(self.path, 1)
                try:
                    time.sleep(proxy.delay_s)
                    self._answer()
                finally:
                    proxy._listing(self.path, -1)

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._fault_for(self.command, self.path)
                if fault in _ERRORS:
                    status, code, message = _ERRORS[fault]
                    xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                           f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                if fault in ("drop", "stall"):
                    if fault == "stall":
                        time.sleep(proxy.stall_s)
                    self._hang_up()
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault in ("truncate", "stall_body") and (len(data) < 2 or self.command == "HEAD"):
                    self._hang_up()
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():  # a HEAD answer keeps the object's Content-Length
                    if k.lower() not in _HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault in ("truncate", "stall_body"):
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    if fault == "stall_body":
                        time.sleep(proxy.stall_s)
                    self._hang_up()
                    return
                self.wfile.write(data)

            def _hang_up(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        return Handler


def use_test_credentials() -> None:
    """This process's AWS settings become moto's dummy ones, and no endpoint or profile of the
    user's environment is left to be picked up (the experiments that run a store on loopback)."""
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)


@contextlib.contextmanager
def moto_on_loopback():
    """moto's S3 server on 127.0.0.1 (a free port) while in the block; yields its URL."""
    from moto.server import ThreadedMotoServer

    from rayssl.dist import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
