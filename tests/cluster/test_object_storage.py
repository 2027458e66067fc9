"""Input, work store, model and outputs on object storage (a real S3-compatible server on 127.0.0.1): the local run's
bytes, one writer at a time, nothing half-written, and a server that stalls or refuses connections for a while."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from segpipe.core import objects
from segpipe.core.errors import ModelError, OutputError
from segpipe.core.locks import lease, lease_url
from segpipe.pipeline import store as ws
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.settings import RunSettings
from tests.cluster.conftest import Proxy, S3Server

OPTIONS = {"tile_size": 64, "halo": 16, "executor": "local"}


def upload_inputs(s3: S3Server, data_dir: Path, checkpoint: Path) -> dict[str, str]:
    for name in ("scenes", "work", "models", "out"):
        s3.bucket(name)
    objects.upload_file(data_dir / "RGB.byte.tif", "s3://scenes/in/RGB.byte.tif")
    objects.upload_file(checkpoint, "s3://models/m/rgb.safetensors")
    objects.upload_file(checkpoint.with_suffix(".json"), "s3://models/m/rgb.json")
    return {
        "input": "s3://scenes/in/RGB.byte.tif",
        "model": "s3://models/m/rgb.safetensors",
        "work_dir": "s3://work/night",
        "output": "s3://out/x/mask.tif",
        "probabilities": "s3://out/x/probabilities.tif",
    }


def local_run(data_dir: Path, checkpoint: Path, tmp_path: Path, **options: object) -> tuple[bytes, bytes]:
    out = tmp_path / "local"
    out.mkdir(exist_ok=True)
    run_scene(
        RunSettings(
            input=str(data_dir / "RGB.byte.tif"),
            output=str(out / "mask.tif"),
            probabilities=str(out / "probabilities.tif"),
            model=str(checkpoint),
            overwrite=True,
            **{**OPTIONS, **options},  # type: ignore[arg-type]
        )
    )
    return (out / "mask.tif").read_bytes(), (out / "probabilities.tif").read_bytes()


def test_everything_on_object_storage_gives_the_local_bytes(
    s3: S3Server, data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    urls = upload_inputs(s3, data_dir, rgb_checkpoint)
    summary = run_scene(RunSettings(**urls, **OPTIONS))  # type: ignore[arg-type]
    mask, probabilities = local_run(data_dir, rgb_checkpoint, tmp_path)
    assert objects.read_bytes(urls["output"]) == mask
    assert objects.read_bytes(urls["probabilities"]) == probabilities
    saved = json.loads(objects.read_bytes("s3://out/x/mask.summary.json"))
    assert saved["output"] == urls["output"] and saved["tiles"]["computed"] == summary["tiles"]["computed"] > 100
    store_url = summary["work_store"]
    assert store_url.startswith("s3://work/night/RGB.byte-") and objects.head(f"{store_url}/zarr.json")
    assert not objects.head(lease_url(store_url)), "the lease is gone with the run"

    again = run_scene(RunSettings(**{**urls, "overwrite": True}, **OPTIONS))  # type: ignore[arg-type]
    assert again["ingest_reused"] and again["tiles"]["reused"] == summary["tiles"]["computed"]
    assert again["tiles"]["computed"] == 0 and objects.read_bytes(urls["output"]) == mask


def test_a_second_writer_of_a_work_store_is_refused_and_an_expired_lease_is_taken_over(s3: S3Server) -> None:
    s3.bucket("work")
    target = "s3://work/night/scene-12345678.zarr"
    with lease(target, "work store"):
        assert objects.head(lease_url(target))
        with pytest.raises(OutputError) as refused, lease(target, "work store"):
            pass
        assert str(refused.value) == (
            f"work store {target} is in use by another segpipe run; wait for it to finish or choose another path"
        )
    assert not objects.head(lease_url(target))
    # a holder that died: its lease expired and was never removed
    objects.write_bytes(lease_url(target), json.dumps({"holder": "gone:1", "expires": time.time() - 1}))
    with lease(target, "work store"):
        assert json.loads(objects.read_bytes(lease_url(target)))["holder"] != "gone:1"


def test_bad_urls_are_one_clear_error_and_leave_nothing(
    s3: S3Server, data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    urls = upload_inputs(s3, data_dir, rgb_checkpoint)
    with pytest.raises(OutputError, match=r"cannot write output 's3://nobucket/mask.tif'"):
        run_scene(RunSettings(**{**urls, "output": "s3://nobucket/mask.tif", "probabilities": None}, **OPTIONS))  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"model s3://models/m/missing.safetensors: its metadata .* cannot be read"):
        run_scene(RunSettings(**{**urls, "model": "s3://models/m/missing.safetensors"}, **OPTIONS))  # type: ignore[arg-type]
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        objects.write_bytes(urls["output"], b"an earlier mask")
        run_scene(RunSettings(**urls, **OPTIONS))  # type: ignore[arg-type]
    assert objects.read_bytes(urls["output"]) == b"an earlier mask"


def test_a_failed_upload_leaves_no_output(
    s3: S3Server, data_dir: Path, rgb_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probabilities' upload fails after the mask's succeeded: neither is left, nor the summary."""
    urls = upload_inputs(s3, data_dir, rgb_checkpoint)
    upload = objects.upload_file

    def failing(local: str | Path, url: str) -> None:
        if "probabilities" in url:
            raise OutputError(f"could not write {url} (connection reset); check the URL")
        upload(local, url)

    monkeypatch.setattr(objects, "upload_file", failing)
    with pytest.raises(OutputError, match="connection reset"):
        run_scene(RunSettings(**urls, **OPTIONS))  # type: ignore[arg-type]
    listed = [o["path"] for o in objects_in("s3://out")]
    assert listed == [], listed


def objects_in(bucket: str) -> list[dict[str, object]]:
    import obstore

    return [o for page in obstore.list(objects.store_for(bucket)) for o in page]


def _wait_for_tiles(store_url: str, count: int, timeout: float = 300) -> None:
    """Wait for ``count`` finished tiles (generous: on a loaded 2-core machine the first tiles took over 120 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done = np.asarray(ws.WorkStore(store_url, mode="r").array(ws.DONE)[...])
            if int(done.sum()) >= count:
                return
        except Exception:  # the store is not there yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} tiles done after {timeout} s")


@pytest.mark.parametrize(
    "fault", [pytest.param("stalled for 15 s", marks=pytest.mark.slow), "refusing connections for 4 s"]
)
def test_storage_that_stalls_or_refuses_for_a_while_costs_time_not_the_run(
    fault: str,
    s3: S3Server,
    data_dir: Path,
    slow_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """The S3 server is frozen (SIGSTOP, then SIGCONT; moto keeps its objects in memory, so it is not restarted), or
    a proxy in front of it refuses connections, while inference writes tiles to the work store on it."""
    proxy = Proxy(s3.port)
    request.addfinalizer(proxy.stop)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    urls = upload_inputs(s3, data_dir, slow_checkpoint)
    settings = RunSettings(**urls, **{**OPTIONS, "batch_size": 4})  # type: ignore[arg-type]
    store_url = ws.store_url(urls["work_dir"], urls["input"])
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["summary"] = run_scene(settings)
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for_tiles(store_url, 8)
    started = time.monotonic()
    if fault.startswith("stalled"):
        os.kill(s3.process.pid, signal.SIGSTOP)
        time.sleep(15)
        os.kill(s3.process.pid, signal.SIGCONT)
    else:
        proxy.refuse()
        time.sleep(4)
        proxy.accept()
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert isinstance(summary, dict) and summary["tiles"]["computed"] > 8
    assert time.monotonic() - started < 300
    mask, probabilities = local_run(data_dir, slow_checkpoint, tmp_path, batch_size=4)
    assert objects.read_bytes(urls["output"]) == mask
    assert objects.read_bytes(urls["probabilities"]) == probabilities


@pytest.mark.slow
def test_a_data_set_under_a_bucket_prefix_is_segmented_into_another_and_skipped_the_next_night(
    s3: S3Server, data_dir: Path, rgb_checkpoint: Path
) -> None:
    from segpipe.flows.dataset import segment_dataset
    from segpipe.pipeline.settings import RunOptions

    for name in ("scenes", "out"):
        s3.bucket(name)
    objects.upload_file(data_dir / "RGB.byte.tif", "s3://scenes/night/a.tif")
    objects.upload_file(data_dir / "lausanne-1091-322_00.tif", "s3://scenes/night/deep/b.tif")
    objects.write_bytes("s3://scenes/night/readme.txt", b"not a scene")
    options = RunOptions(model=str(rgb_checkpoint), work_dir="s3://out/work", **OPTIONS)  # type: ignore[arg-type]
    first = segment_dataset("s3://scenes/night/", "s3://out/masks", options=options)
    assert first["done"] == ["a", "b"]
    assert objects.head("s3://out/masks/a.mask.tif") and objects.head("s3://out/masks/b.item.json")
    collection = json.loads(objects.read_bytes("s3://out/masks/collection.json"))
    assert sorted(link["href"] for link in collection["links"] if link["rel"] == "item") == [
        "./a.item.json",
        "./b.item.json",
    ]
    again = segment_dataset("s3://scenes/night/", "s3://out/masks", options=options)
    assert again["skipped"] == ["a", "b"] and again["done"] == []
    objects.upload_file(data_dir / "RGB.byte.tif", "s3://scenes/night/deep/b.tif")  # rewritten: a new ETag
    third = segment_dataset("s3://scenes/night/", "s3://out/masks", options=options)
    assert [(row["scene"], row["reason"]) for row in third["scenes"]] == [("a", "unchanged"), ("b", "changed scene")]
