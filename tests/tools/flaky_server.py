"""A real HTTP service on 127.0.0.1 that a test switches between healthy, failing, hanging.

It is the one stand-in the tool tests use: a dependency that really answers 200, really
answers 503, or really never answers (until it is switched back), over real sockets,
so timeouts, retries and circuit breakers are exercised as they are in production.
Every request is recorded with its path, ``Authorization`` header and the mode it met.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

HEALTHY = "healthy"
FAILING = "failing"
HANGING = "hanging"


@dataclass(frozen=True)
class Request:
    path: str
    authorization: str
    mode: str
    host: str = ""


class FlakyServer:
    def __init__(self) -> None:
        self.mode = HEALTHY
        self.requests: list[Request] = []
        # Set: hanging requests may finish. Cleared while the server hangs.
        self._release = threading.Event()
        self._release.set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                server._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def set_mode(self, mode: str) -> None:
        assert mode in (HEALTHY, FAILING, HANGING)
        self.mode = mode
        if mode == HANGING:
            self._release.clear()
        else:
            self._release.set()

    def requests_in(self, mode: str) -> list[Request]:
        return [r for r in list(self.requests) if r.mode == mode]

    def start(self) -> FlakyServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        mode = self.mode
        self.requests.append(
            Request(
                request.path,
                request.headers.get("Authorization", ""),
                mode,
                request.headers.get("Host", ""),
            )
        )
        parts = urlsplit(request.path)
        query = parse_qs(parts.query)
        if parts.path == "/redirect" and mode == HEALTHY:
            # GET /redirect?to=URL: a 302 to URL (the outbound policy checks every hop).
            request.send_response(302)
            request.send_header("Location", query["to"][0])
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        if parts.path == "/big" and mode == HEALTHY:
            # GET /big?bytes=N: a body of N bytes (the outbound policy limits the size).
            size = int(query["bytes"][0])
            request.send_response(200)
            request.send_header("Content-Type", "text/plain")
            request.send_header("Content-Length", str(size))
            request.end_headers()
            with contextlib.suppress(OSError):
                request.wfile.write(b"x" * size)
            return
        if parts.path.startswith("/fail"):
            mode = FAILING  # a path that always fails, whatever the mode (a 503)
        if mode == HANGING:
            # Never answer while hanging; the client gives up at its own timeout.
            self._release.wait(timeout=120)
            mode = FAILING
        status = 200 if mode == HEALTHY else 503
        body = json.dumps({"ok": status == 200, "path": request.path}).encode()
        try:
            request.send_response(status)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)
        except OSError:
            pass  # the client timed out and left
