"""A loopback HTTP server for one file that answers 503 to its first FAILURES requests, then serves byte ranges.

``python _flaky_http.py FILE FAILURES`` prints its port, then one line per request (``METHOD STATUS``). It runs in
its own process: GDAL holds the GIL during parts of a /vsicurl/ open, so an in-process server could deadlock.
"""

from __future__ import annotations

import http.server
import re
import sys

DATA = open(sys.argv[1], "rb").read()  # noqa: SIM115 - read once at start
failures = [int(sys.argv[2])]


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, with_body: bool) -> None:
        if failures[0] > 0:
            failures[0] -= 1
            print(self.command, 503, flush=True)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            first = int(wanted.group(1))
            last = min(int(wanted.group(2) or len(DATA) - 1), len(DATA) - 1)
            body = DATA[first : last + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(DATA)}")
        else:
            body = DATA
            self.send_response(200)
        print(self.command, 206 if wanted else 200, flush=True)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._answer(False)

    def do_GET(self) -> None:
        self._answer(True)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_port, flush=True)
server.serve_forever()
