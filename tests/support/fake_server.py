"""A tiny real HTTP server standing in for a model server in timing tests (slow start, hang, crash).

    python fake_server.py --port P [--ready-after S] [--exit-after S --exit-code N]
                                   [--ignore-term]

GET /health answers 503 until --ready-after seconds have passed, then 200.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--exit-after", type=float, default=None)
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--ignore-term", action="store_true")
    args, _unknown = parser.parse_known_args()
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ready = time.monotonic() - started >= args.ready_after
            body = b'{"status":"ok"}' if ready else b'{"error":"loading"}'
            self.send_response(200 if ready else 503)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *items: object) -> None:
            sys.stdout.write("fake: " + format % items + "\n")
            sys.stdout.flush()

    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.exit_after is not None:
        def leave() -> None:
            time.sleep(args.exit_after)
            print(f"fake: exiting with {args.exit_code}", flush=True)
            import os

            os._exit(args.exit_code)

        threading.Thread(target=leave, daemon=True).start()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"fake: listening on {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
