"""A static file server on 127.0.0.1 that answers HTTP Range requests (GDAL's /vsicurl/ needs them; Python's
``http.server`` does not), for the STAC tests: ``python range_server.py PORT FOLDER``.

Under ``/api`` it is also a small STAC API (the core and item-search conformance classes) over the items of the
static catalog in FOLDER, all in collection ``night``: ``GET /api`` (landing page), ``GET /api/conformance``,
``GET|POST /api/search`` with ``collections``, ``bbox``, ``datetime`` (an instant or ``start/end``), ``limit``
(default 1, so that clients page) and paging by ``next`` links (a ``token``). Asset hrefs are absolute, as real APIs
give them."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

CONFORMS = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/item-search",
]


def _instant(text: str) -> dt.datetime | None:
    return None if text in ("", "..") else dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _wanted(item: dict, collections: list[str], bbox: list[float] | None, when: str | None) -> bool:
    if collections and item.get("collection") not in collections:
        return False
    if bbox:
        w, s, e, n = item["bbox"]
        if w > bbox[2] or e < bbox[0] or s > bbox[3] or n < bbox[1]:
            return False
    if when:
        at = _instant(item["properties"]["datetime"])
        start, _, end = when.partition("/")
        low, high = _instant(start), _instant(end) if end else _instant(start)
        if at is None or (low and at < low) or (high and at > high):
            return False
    return True


class RangeHandler(SimpleHTTPRequestHandler):
    def _items(self, base: str) -> list[dict]:
        items = []
        for root, _, files in os.walk(self.directory):
            for name in sorted(files):
                if not name.endswith(".json"):
                    continue
                path = os.path.join(root, name)
                with open(path) as f:
                    data = json.load(f)
                if data.get("type") != "Feature":
                    continue
                folder = os.path.relpath(root, self.directory)
                for asset in data["assets"].values():
                    asset["href"] = f"{base}/{folder}/{asset['href'].removeprefix('./')}"
                data["collection"] = "night"
                data["links"] = [{"rel": "self", "href": f"{base}/{folder}/{name}", "type": "application/geo+json"}]
                items.append(data)
        return sorted(items, key=lambda i: i["id"])

    def _json(self, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _api(self, params: dict) -> None:
        base = f"http://{self.headers['Host']}"
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        if path == "/api":
            self._json(
                {
                    "type": "Catalog",
                    "id": "test-api",
                    "stac_version": "1.0.0",
                    "description": "items of the catalog",
                    "conformsTo": CONFORMS,
                    "links": [
                        {"rel": "self", "href": f"{base}/api", "type": "application/json"},
                        {"rel": "root", "href": f"{base}/api", "type": "application/json"},
                        {
                            "rel": "search",
                            "href": f"{base}/api/search",
                            "type": "application/geo+json",
                            "method": "GET",
                        },
                        {
                            "rel": "search",
                            "href": f"{base}/api/search",
                            "type": "application/geo+json",
                            "method": "POST",
                        },
                    ],
                }
            )
        elif path == "/api/conformance":
            self._json({"conformsTo": CONFORMS})
        elif path == "/api/search":
            collections = params.get("collections") or []
            if isinstance(collections, str):
                collections = collections.split(",")
            bbox = params.get("bbox")
            if isinstance(bbox, str):
                bbox = [float(v) for v in bbox.split(",")]
            limit, token = int(params.get("limit") or 1), int(params.get("token") or 0)
            found = [i for i in self._items(base) if _wanted(i, collections, bbox, params.get("datetime"))]
            page = found[token : token + limit]
            links = []
            if token + limit < len(found):
                links.append(
                    {
                        "rel": "next",
                        "type": "application/geo+json",
                        "method": "POST",
                        "merge": True,
                        "href": f"{base}/api/search",
                        "body": {"token": str(token + limit)},
                    }
                )
            self._json(
                {
                    "type": "FeatureCollection",
                    "features": page,
                    "links": links,
                    "numberMatched": len(found),
                    "numberReturned": len(page),
                }
            )
        else:
            self.send_error(404)

    def do_GET(self) -> None:
        if self.path.startswith("/api"):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            return self._api({k: v[0] for k, v in query.items()})
        return super().do_GET()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        return self._api(json.loads(self.rfile.read(length) or b"{}"))

    def send_head(self):  # type: ignore[no-untyped-def]
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not wanted or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start = int(wanted.group(1))
        end = min(int(wanted.group(2)) if wanted.group(2) else size - 1, size - 1)
        if start >= size:
            self.send_error(416)
            return None
        handle = open(path, "rb")  # noqa: SIM115 - closed by copyfile's caller
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.range_left = end - start + 1
        return handle

    def copyfile(self, source, outputfile):  # type: ignore[no-untyped-def]
        left = getattr(self, "range_left", None)
        if left is None:
            return super().copyfile(source, outputfile)
        while left > 0:
            chunk = source.read(min(65536, left))
            if not chunk:
                break
            outputfile.write(chunk)
            left -= len(chunk)
        return None

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    port, folder = int(sys.argv[1]), sys.argv[2]
    ThreadingHTTPServer(("127.0.0.1", port), partial(RangeHandler, directory=folder)).serve_forever()
