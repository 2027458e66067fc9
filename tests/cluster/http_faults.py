"""An HTTP reverse proxy on 127.0.0.1 that fails chosen S3 requests, as overloaded object storage does
(``python tests/cluster/http_faults.py LISTEN TARGET RULES.json COUNTS.json``): each rule ``{"method": "PUT",
"path": "regex", "status": 503, "times": 3, "delay": 0.0}`` answers the first ``times`` matching requests with
``status`` and an S3 error body (503 SlowDown, 500 InternalError), after ``delay`` seconds; every other request
is forwarded to TARGET. The counts of faults served are written to COUNTS.json after each one. A process of its
own, as tests/cluster/proxy.py, so that GDAL holding the GIL in the test cannot stall it."""

from __future__ import annotations

import http.client
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

CODES = {500: "InternalError", 503: "SlowDown"}
lock = threading.Lock()


class FaultProxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    rules: ClassVar[list[dict[str, Any]]] = []
    served: ClassVar[list[int]] = []
    target = 0
    counts_path = Path()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _fault(self) -> dict[str, Any] | None:
        with lock:
            for k, rule in enumerate(self.rules):
                matches = rule["method"] == self.command and re.search(rule["path"], self.path)
                if matches and self.served[k] < rule["times"]:
                    self.served[k] += 1
                    self.counts_path.write_text(json.dumps(self.served))
                    return rule
        return None

    def _handle(self) -> None:
        body = self._body()
        rule = self._fault()
        if rule is not None:
            time.sleep(rule.get("delay", 0.0))
            code = int(rule["status"])
            answer = f"<Error><Code>{CODES.get(code, 'InternalError')}</Code><Message>injected</Message></Error>"
            self.send_response(code)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer.encode())
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.target, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
        headers["Content-Length"] = str(len(body))
        upstream.request(self.command, self.path, body=body, headers=headers)
        reply = upstream.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for key, value in reply.getheaders():
            if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def log_message(self, *args: Any) -> None:
        pass


def main() -> None:
    listen, target, rules, counts = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    FaultProxy.rules[:] = json.loads(rules.read_text())
    FaultProxy.served[:] = [0] * len(FaultProxy.rules)
    FaultProxy.target, FaultProxy.counts_path = target, counts
    counts.write_text(json.dumps(FaultProxy.served))
    server = ThreadingHTTPServer(("127.0.0.1", listen), FaultProxy)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
