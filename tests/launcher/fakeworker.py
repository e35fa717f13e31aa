"""A stdlib stand-in for a worker, for launcher tests that need precise misbehaviour.

Accepts the launcher's sglang flags (and ignores any it does not know), optionally waits
before binding like a loading model (a while, or until a file exists), answers `/health`,
and can misbehave on request: exit at start (every worker, or the one on a given port),
report itself failed after `POST /_fail`, ignore SIGTERM, or leave a grandchild in its
process group.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAILURE = "Scheduler worker exited; restart the server."


class Handler(BaseHTTPRequestHandler):
    failed = False
    """Set by `POST /_fail`: from then on `/health` reports the worker failed (503 + error),
    as a real worker does after losing a GPU process; it never exits by itself."""

    def do_GET(self) -> None:
        if self.path == "/health" and Handler.failed:
            self._send(503, {"status": "unhealthy", "error": FAILURE})
            return
        if self.path in ("/health", "/liveness"):
            body = json.dumps({"status": "ok"}).encode()
        elif self.path == "/v1/models":
            body = json.dumps({"object": "list", "data": [{"id": "fake", "task_type": "T2I"}]})
            body = body.encode()
        else:
            body = json.dumps({"path": self.path, "port": self.server.server_port}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/_fail":
            Handler.failed = True
        self._send(200, {"created": 0, "data": [{"b64_json": ""}]})

    def _send(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.log_requests:  # type: ignore[attr-defined]
            print(f"fakeworker request: {format % args}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--load-s", type=float, default=0.0)
    parser.add_argument(
        "--wait-for-file",
        default=None,
        help="do not bind until this file exists (a model load the test ends when it wants)",
    )
    parser.add_argument("--exit-at-start", type=int, default=None)
    parser.add_argument(
        "--fail-on-port",
        type=int,
        default=None,
        help="exit with status 4 at start when --port is this one",
    )
    parser.add_argument(
        "--failed-at-start",
        action="store_true",
        help="report itself failed from the first /health on (a scheduler lost at warm-up)",
    )
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--log-requests", action="store_true")
    args, unknown = parser.parse_known_args()
    print(f"fakeworker starting, ignoring {unknown}", flush=True)
    if args.fail_on_port == args.port:
        args.exit_at_start = 4
    if args.exit_at_start is not None:
        print("fakeworker: cannot load the model (simulated)", flush=True)
        sys.exit(args.exit_at_start)
    Handler.failed = args.failed_at_start
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.grandchild:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        print(f"fakeworker grandchild pid {child.pid}", flush=True)
    time.sleep(args.load_s)
    while args.wait_for_file and not os.path.exists(args.wait_for_file):
        time.sleep(0.02)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.log_requests = args.log_requests  # type: ignore[attr-defined]
    print(f"fakeworker listening on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
