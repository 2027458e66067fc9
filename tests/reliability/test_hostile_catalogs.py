"""Hostile STAC, beyond files: catalogs and APIs that are malformed, huge, self-referencing or page forever each give
one clear line (exit 2 on the command line) and nothing written; the item checks are property-tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segpipe.core.errors import InputError
from segpipe.pipeline import catalog
from segpipe.pipeline.catalog import check_items, scenes_of
from segpipe.pipeline.settings import StacSearch

GEOMETRY = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}


def item(name: str, base: str) -> dict[str, Any]:
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": name, "geometry": GEOMETRY, "bbox": [0, 0, 1, 1],
        "properties": {"datetime": "2026-11-30T00:00:00Z"}, "links": [],
        "assets": {"visual": {"href": f"{base}/{name}.tif", "roles": ["data"], "type": "image/tiff"}},
    }  # fmt: skip


class Hostile(BaseHTTPRequestHandler):
    """``/forever``: a STAC API whose search always has a next page; ``/cycle/catalog.json``: a catalog that is its
    own child; ``/huge.json``: an item collection of 2 MB."""

    def _json(self, data: Any) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        base = f"http://{self.headers['Host']}"
        path, _, query = self.path.partition("?")
        if path == "/forever":
            self._json({
                "type": "Catalog", "id": "forever", "description": "d", "stac_version": "1.0.0",
                "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
                "links": [{"rel": "search", "href": f"{base}/forever/search", "type": "application/geo+json",
                           "method": "GET"}, {"rel": "self", "href": f"{base}/forever"}],
            })  # fmt: skip
        elif path == "/forever/search":
            page = int(query.partition("page=")[2].split("&")[0] or 0)
            self._json({
                "type": "FeatureCollection", "features": [item(f"s{page}", base)],
                "links": [{"rel": "next", "href": f"{base}/forever/search?page={page + 1}", "method": "GET"}],
            })  # fmt: skip
        elif path == "/cycle/catalog.json":
            self._json({
                "type": "Catalog", "id": "cycle", "description": "d", "stac_version": "1.0.0",
                "links": [{"rel": "self", "href": f"{base}/cycle/catalog.json"},
                          {"rel": "root", "href": f"{base}/cycle/catalog.json"},
                          {"rel": "child", "href": f"{base}/cycle/catalog.json"}],
            })  # fmt: skip
        elif path == "/huge.json":
            self._json({"type": "FeatureCollection", "features": [item(f"i{k}", base) for k in range(5000)]})
        else:
            self.send_response(404)
            self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_an_api_that_pages_forever_stops_with_one_line(hostile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog, "MAX_STAC_ITEMS", 20)
    with pytest.raises(InputError, match=r"gives more than 20 items for this search .or pages forever.; narrow it"):
        scenes_of(f"stac-api+{hostile}/forever", search=StacSearch(f"{hostile}/forever"))


def test_a_catalog_that_is_its_own_child_is_a_cycle(hostile: str) -> None:
    with pytest.raises(InputError, match=r"links back to .* .a cycle."):
        scenes_of(f"{hostile}/cycle/catalog.json")


def test_a_huge_document_is_refused_unread(hostile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog, "MAX_STAC_BYTES", 2**20)
    with pytest.raises(InputError, match="is larger than 1 MiB"):
        scenes_of(f"{hostile}/huge.json")


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ("not a list", "without a 'features' list"),
        ([{"type": "Feature", "assets": {}}], "needs a string 'id'"),
        ([{"type": "Feature", "id": "a", "assets": ["x.tif"]}], "'assets' must map keys to objects"),
        ([{"type": "Feature", "id": "a", "assets": {"v": {"href": 5}}}], "'assets' must map keys to objects"),
        ([7], "item number 1 .* is malformed"),
    ],
)
def test_malformed_items_are_one_clear_error(features: Any, message: str, tmp_path: Path) -> None:
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.raises(InputError, match=message):
        scenes_of(str(path))


def test_the_cli_says_it_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "assets": {}}]}))
    done = subprocess.run(
        [sys.executable, "-m", "segpipe.cli", "dataset", str(path), str(tmp_path / "out"), "--executor", "local"],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"},  # a user's: the CLI's default
    )  # fmt: skip
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "item number 1" in err[0] and "string 'id'" in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(st.lists(json_values | st.fixed_dictionaries({"id": json_values, "assets": json_values}), max_size=4))
def test_check_items_accepts_only_what_it_can_read_and_raises_nothing_else(items: list[Any]) -> None:
    try:
        check_items(items, "test")
    except InputError:
        return
    for found in items:  # accepted: every item can be read as segpipe reads them
        assert isinstance(found["id"], str)
        assert all(isinstance(a["href"], str) for a in found["assets"].values())
