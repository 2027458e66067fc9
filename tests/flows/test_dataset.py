"""The dataset flow through Prefect: sources, incremental decisions by content with their reasons, STAC out, a failing
or busy scene that does not stop the others, a webhook when one fails, concurrency, and a night resumed."""

from __future__ import annotations

import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from segpipe.core.errors import ConfigError, SegpipeError
from segpipe.core.locks import exclusive_lock
from segpipe.flows.dataset import segment_dataset
from segpipe.pipeline.catalog import scenes_of
from segpipe.pipeline.names import mask_path
from segpipe.pipeline.settings import DatasetOptions, RunOptions

LOCAL = {"executor": "local", "tile_size": 64, "halo": 16}


def scenes(data_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(data_dir / "RGB.byte.tif", folder / "a.tif")
    shutil.copy(data_dir / "lausanne-1091-322_00.tif", folder / "b.tif")
    return folder


def reasons(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {row["scene"]: (row["status"], row["reason"]) for row in report["scenes"]}


def test_a_night_segments_what_is_new_or_changed_and_says_why(
    data_dir: Path, rgb_checkpoint: Path, make_checkpoint: Any, tmp_path: Path
) -> None:
    folder = scenes(data_dir, tmp_path / "in")
    out, work = tmp_path / "out", tmp_path / "missing" / "work"  # --work-dir is created when missing
    options = RunOptions(model=str(rgb_checkpoint), work_dir=str(work), **LOCAL)  # type: ignore[arg-type]
    first = segment_dataset(str(folder), str(out), options=options)
    assert reasons(first) == {"a": ("done", "new"), "b": ("done", "new")}
    assert mask_path(str(out), "a") == str(out / "a.mask.tif") and (out / "b.mask.tif").is_file()
    masks = {name: (out / f"{name}.mask.tif").read_bytes() for name in "ab"}

    again = segment_dataset(str(folder), str(out), options=options)
    assert reasons(again) == {"a": ("skipped", "unchanged"), "b": ("skipped", "unchanged")}

    os.utime(folder / "a.tif")  # touched: a new modification time
    touched = segment_dataset(str(folder), str(out), options=options)
    assert reasons(touched) == {"a": ("done", "changed scene"), "b": ("skipped", "unchanged")}
    assert (out / "a.mask.tif").read_bytes() == masks["a"], "same pixels, same bytes"

    other = make_checkpoint("other", bands=("red", "green", "blue"), mean=(90.0,) * 3, std=(40.0,) * 3, seed=1)
    changed = segment_dataset(str(folder), str(out), options=RunOptions(model=str(other), **LOCAL))  # type: ignore[arg-type]
    assert reasons(changed) == {"a": ("done", "changed model"), "b": ("done", "changed model")}

    wider = segment_dataset(str(folder), str(out), options=RunOptions(model=str(other), **{**LOCAL, "halo": 32}))  # type: ignore[arg-type]
    assert reasons(wider) == {"a": ("done", "changed settings (halo)"), "b": ("done", "changed settings (halo)")}

    (out / "b.mask.summary.json").unlink()
    incomplete = segment_dataset(str(folder), str(out), options=RunOptions(model=str(other), **{**LOCAL, "halo": 32}))  # type: ignore[arg-type]
    assert reasons(incomplete)["b"] == ("done", "incomplete (outputs without a summary)")

    (out / "a.item.json").unlink()  # killed between the summary and the STAC Item
    itemless = segment_dataset(str(folder), str(out), options=RunOptions(model=str(other), **{**LOCAL, "halo": 32}))  # type: ignore[arg-type]
    assert reasons(itemless) == {
        "a": ("done", "incomplete (summary without its outputs)"),
        "b": ("skipped", "unchanged"),
    }
    assert (out / "a.item.json").is_file()


def test_each_output_has_a_stac_item_and_the_folder_a_collection(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    import pystac
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.file import FileExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import RasterExtension

    folder = scenes(data_dir, tmp_path / "in")
    out = tmp_path / "out"
    dataset = DatasetOptions(write_probabilities=True)
    segment_dataset(str(folder), str(out), options=RunOptions(model=str(rgb_checkpoint), **LOCAL), dataset=dataset)  # type: ignore[arg-type]
    item = pystac.Item.from_file(str(out / "a.item.json"))
    assert item.id == "a" and item.collection_id == "out"
    assert ProjectionExtension.has_extension(item) and ProjectionExtension.ext(item).code == "EPSG:32618"
    assert ProjectionExtension.ext(item).shape == [718, 791]
    west, _, east, _ = item.bbox
    import rasterio
    from rasterio.warp import transform_bounds

    with rasterio.open(folder / "a.tif") as src:
        expected = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    assert [round(v, 3) for v in item.bbox] == [round(v, 3) for v in expected], (item.bbox, expected)
    mask = item.assets["mask"]
    assert RasterExtension.ext(mask).bands[0].nodata == 255  # type: ignore[index]
    classes = ClassificationExtension.ext(mask).classes
    assert [c.description for c in classes] == ["class0", "class1", "class2"] and classes[0].color_hint == "E6194B"
    import hashlib

    digest = hashlib.sha256((out / "a.mask.tif").read_bytes()).hexdigest()
    assert FileExtension.ext(mask).checksum == "1220" + digest
    assert mask.href == "./a.mask.tif" and item.assets["probabilities"].href == "./a.probabilities.tif"
    derived = [link.href for link in item.links if link.rel == "derived_from"]
    assert derived == [str(folder / "a.tif")]
    assert item.properties["processing:software"]["segpipe"] and item.properties["segpipe:key"]
    summary = json.loads((out / "a.mask.summary.json").read_text())
    assert item.properties["segpipe:key"] == summary["key"]["digest"]

    collection = pystac.Collection.from_file(str(out / "collection.json"))
    assert sorted(link.href.rsplit("/", 1)[-1] for link in collection.links if link.rel == "item") == [
        "a.item.json",
        "b.item.json",
    ]
    bbox = collection.extent.spatial.bboxes[0]
    assert bbox[0] <= west and bbox[2] >= east, "the extent covers every item"


class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_bad_or_busy_scene_does_not_stop_the_others_and_the_webhook_hears_of_it(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    folder = scenes(data_dir, tmp_path / "in")
    (folder / "broken.tif").write_bytes(b"II*\x00 this is not a tiff")
    out = tmp_path / "out"
    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hook.received.clear()
    options = RunOptions(model=str(rgb_checkpoint), **LOCAL)  # type: ignore[arg-type]
    dataset = DatasetOptions(notify=f"http://127.0.0.1:{server.server_address[1]}/hook", retries=0)
    try:
        with exclusive_lock(str(out / "b.mask.tif"), "output"), pytest.raises(SegpipeError) as failed:
            segment_dataset(str(folder), str(out), options=options, dataset=dataset)  # another night writes b
    finally:
        server.shutdown()
    message = str(failed.value)
    assert message.startswith("2 of 3 scenes failed: ") and "broken: input" in message and "is not a raster" in message
    assert "b: output" in message and "is in use by another segpipe run" in message
    assert (out / "a.mask.tif").is_file() and not (out / "b.mask.tif").exists()
    (report,) = Hook.received
    assert report["done"] == ["a"] and sorted(report["failed"]) == ["b", "broken"]

    (folder / "broken.tif").unlink()
    resumed = segment_dataset(str(folder), str(out), options=options)
    assert reasons(resumed) == {"a": ("skipped", "unchanged"), "b": ("done", "new")}


def test_scenes_at_once_give_the_same_bytes(data_dir: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    folder = scenes(data_dir, tmp_path / "in")
    options = RunOptions(model=str(rgb_checkpoint), **LOCAL)  # type: ignore[arg-type]
    one = segment_dataset(str(folder), str(tmp_path / "one"), options=options)
    two = segment_dataset(str(folder), str(tmp_path / "two"), options=options, dataset=DatasetOptions(scenes_at_once=2))
    assert one["done"] == two["done"] == ["a", "b"]
    for name in "ab":
        one_mask, two_mask = (tmp_path / run / f"{name}.mask.tif" for run in ("one", "two"))
        assert one_mask.read_bytes() == two_mask.read_bytes()


def test_sources_folder_recursive_glob_and_list_file(data_dir: Path, tmp_path: Path) -> None:
    folder = scenes(data_dir, tmp_path / "in")
    (folder / "deeper").mkdir()
    shutil.copy(data_dir / "RGB.byte.tif", folder / "deeper" / "c.tif")
    (folder / "notes.txt").write_text("not a scene")
    assert [r.id for r in scenes_of(str(folder))] == ["a", "b"]
    assert [r.id for r in scenes_of(str(folder), recursive=True)] == ["a", "b", "c"]
    assert [r.id for r in scenes_of(str(folder / "**" / "*.tif"))] == ["a", "b", "c"]
    listing = tmp_path / "night.txt"
    listing.write_text(f"# tonight\n{folder / 'b.tif'}\nin/deeper/c.tif\n\n")
    refs = scenes_of(str(listing))
    assert [(r.id, r.href) for r in refs] == [("b", str(folder / "b.tif")), ("c", str(tmp_path / "in/deeper/c.tif"))]
    with pytest.raises(ConfigError, match="is not a folder, a glob, a list file"):
        scenes_of(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="holds no scene"):
        scenes_of(str(folder / "deeper" / "*.jp2"))


def test_a_night_killed_midway_is_finished_by_the_next_one(
    data_dir: Path, slow_checkpoint: Path, tmp_path: Path
) -> None:
    """Killed (SIGKILL) while the second scene is half done: the next night skips the first by its key and resumes
    the second tile by tile from the work store."""
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    from segpipe.pipeline import store as ws

    folder = scenes(data_dir, tmp_path / "in")
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--model", str(slow_checkpoint), "--work-dir", str(work), "--executor", "local", "--tile-size", "64",
            "--halo", "16", "--batch-size", "2"]  # fmt: skip
    night = subprocess.Popen(
        [sys.executable, "-m", "segpipe.cli", "dataset", str(folder), str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def tiles_of_b() -> int:
        stores = list((work / "b").glob("*.zarr"))
        try:
            return int(np.asarray(ws.WorkStore(str(stores[0]), mode="r").array(ws.DONE)[...]).sum()) if stores else 0
        except Exception:  # not created yet
            return 0

    deadline = time.monotonic() + 300
    while not ((out / "a.mask.summary.json").exists() and tiles_of_b() >= 6):
        assert night.poll() is None and time.monotonic() < deadline, "the night ended before it could be killed"
        time.sleep(0.1)
    night.send_signal(signal.SIGKILL)
    night.wait()
    done_before = tiles_of_b()
    assert not (out / "b.mask.tif").exists()

    options = RunOptions(
        model=str(slow_checkpoint), work_dir=str(work), executor="local", tile_size=64, halo=16, batch_size=2
    )
    report = segment_dataset(str(folder), str(out), options=options)
    assert reasons(report) == {"a": ("skipped", "unchanged"), "b": ("done", "new")}
    summary = json.loads((out / "b.mask.summary.json").read_text())
    assert summary["tiles"]["reused"] >= done_before - 2 > 0, (summary["tiles"], done_before)  # batches of 2
