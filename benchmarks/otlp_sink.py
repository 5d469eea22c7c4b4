"""An OTLP/HTTP receiver that accepts every trace export and keeps only a count: the
other end of a benchmark run with tracing on (``benchmarks/peers.md``, "Tracing on").

    python benchmarks/otlp_sink.py [--port 4318]

Answers ``POST /v1/traces`` with 200 and an empty ``ExportTraceServiceResponse``
(protobuf of zero bytes), without decoding the body, so the cost measured is the
project's (making, batching and sending spans), not a collector's. Prints the number of
requests and bytes received on Ctrl-C.
"""

from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

received = {"requests": 0, "bytes": 0}


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        received["requests"] += 1
        received["bytes"] += length
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4318)
    port = parser.parse_args().port
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)
    print(f"OTLP sink on http://127.0.0.1:{port}/v1/traces", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"received {received['requests']} exports, {received['bytes']} bytes")


if __name__ == "__main__":
    main()
