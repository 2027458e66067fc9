"""STAC in: a static catalog served over HTTP on 127.0.0.1 (its assets read by GDAL over HTTP), assets chosen by
eo:bands common names (one multi-band asset in another band order, or one asset per band stacked), and the items'
links kept in the outputs' STAC Items."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio

from segpipe.core.errors import ConfigError, InputError
from segpipe.flows.dataset import segment_dataset
from segpipe.pipeline.catalog import AssetChoice, scenes_of
from segpipe.pipeline.settings import RunOptions

RGB = ("red", "green", "blue")


@contextlib.contextmanager
def served(folder: Path) -> Iterator[str]:
    """A static file server with Range requests on 127.0.0.1 for ``folder`` (its own process: GDAL holds the GIL while
    it reads)."""
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("range_server.py")), str(port), str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        process.kill()
        process.wait()


def write_bands(source: Path, folder: Path, order: tuple[int, ...]) -> list[Path]:
    """One single-band GeoTIFF per band of ``source``, in ``order`` (1-based band numbers)."""
    paths = []
    with rasterio.open(source) as src:
        profile = {**src.profile, "count": 1}
        for k in order:
            path = folder / f"band{k}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(k), 1)
            paths.append(path)
    return paths


def build_catalog(data_dir: Path, root: Path) -> Path:
    """A static catalog: item ``rgb`` (one 3-band asset whose eo:bands say blue, green, red) and item ``split`` (three
    single-band assets, one per common name), with relative hrefs."""
    import pystac

    catalog = pystac.Catalog(id="night", description="two scenes")
    (root / "rgb").mkdir(parents=True)
    with rasterio.open(data_dir / "RGB.byte.tif") as src:
        data = src.read()[::-1]  # stored blue, green, red
        profile = src.profile
    with rasterio.open(root / "rgb" / "bgr.tif", "w", **profile) as dst:
        dst.write(data)
    bbox = [-78.0, 24.0, -77.0, 25.0]  # WGS84, as STAC wants (the scene is in the Bahamas, in UTM)
    geometry = {"type": "Polygon", "coordinates": [[[-78.0, 24.0], [-77.0, 24.0], [-77.0, 25.0], [-78.0, 24.0]]]}
    when = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    rgb = pystac.Item("rgb", geometry, bbox, when, {})
    rgb.add_asset(
        "visual",
        pystac.Asset(
            "./bgr.tif",
            media_type=pystac.MediaType.GEOTIFF,
            roles=["data"],
            extra_fields={"eo:bands": [{"name": n, "common_name": n} for n in ("blue", "green", "red")]},
        ),
    )
    (root / "split").mkdir()
    write_bands(data_dir / "RGB.byte.tif", root / "split", (1, 2, 3))
    split = pystac.Item("split", geometry, bbox, when, {})
    for k, name in enumerate(RGB, start=1):
        split.add_asset(
            f"B{k}",
            pystac.Asset(
                f"./band{k}.tif",
                media_type=pystac.MediaType.GEOTIFF,
                roles=["data"],
                extra_fields={"eo:bands": [{"name": f"B{k}", "common_name": name}]},
            ),
        )
    catalog.add_items([rgb, split])
    catalog.normalize_hrefs(str(root))
    for item in (rgb, split):  # asset files live in each item's folder
        for asset in item.assets.values():
            asset.href = asset.href.split("/")[-1]
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def test_a_static_catalog_over_http_gives_the_masks_of_its_files(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    build_catalog(data_dir, tmp_path / "stac")
    options = RunOptions(model=str(rgb_checkpoint), executor="local", tile_size=64, halo=16)
    with served(tmp_path / "stac") as url:
        refs = scenes_of(f"{url}/catalog.json", asset=AssetChoice(bands=RGB))
        assert [r.id for r in refs] == ["rgb", "split"]
        assert refs[0].href.startswith("<VRTDataset") and "<SourceBand>3</SourceBand>" in refs[0].href
        assert refs[1].href.startswith("<VRTDataset") and refs[1].href.count("<SimpleSource>") == 3
        report = segment_dataset(f"{url}/catalog.json", str(tmp_path / "out"), options=options)
        again = segment_dataset(f"{url}/catalog.json", str(tmp_path / "out"), options=options)
    assert report["done"] == ["rgb", "split"] and again["skipped"] == ["rgb", "split"]
    reference = tmp_path / "ref"
    segment_dataset(str(data_dir / "RGB.byte.tif"), str(reference), options=options)
    for name in ("rgb", "split"):  # both stackings give the scene's own pixels in red, green, blue order
        with (
            rasterio.open(tmp_path / "out" / f"{name}.mask.tif") as a,
            rasterio.open(reference / "RGB.byte.mask.tif") as b,
        ):
            assert np.array_equal(a.read(), b.read()) and (a.crs, a.transform) == (b.crs, b.transform)
    item = json.loads((tmp_path / "out" / "split.item.json").read_text())
    assert [link["href"] for link in item["links"] if link["rel"] == "derived_from"] == [f"{url}/split/split.json"]
    assert item["properties"]["datetime"].startswith("2026-11-30")


def test_an_asset_key_that_is_missing_is_one_clear_error(data_dir: Path, tmp_path: Path) -> None:
    catalog = build_catalog(data_dir, tmp_path / "stac")
    with pytest.raises(ConfigError, match=r"STAC item 'rgb' has no asset 'nir'; it has \['visual'\]"):
        scenes_of(str(catalog), asset=AssetChoice(key="nir"))


def test_a_stac_api_search_pages_through_its_items_and_narrows_by_date(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    """A STAC API (core + item search) on 127.0.0.1 over the same two items, read through pystac-client: pages of
    one item followed by ``next`` links; collections, a bounding box and a datetime interval narrow the
    search."""
    from segpipe.pipeline.settings import DatasetOptions, StacSearch

    build_catalog(data_dir, tmp_path / "stac")
    with served(tmp_path / "stac") as url:
        source = f"stac-api+{url}/api"
        november = DatasetOptions(collections=("night",), datetime="2026-11-01/2026-11-30T23:59:59Z")
        search = november.search(source)
        assert search == StacSearch(f"{url}/api", ("night",), None, "2026-11-01/2026-11-30T23:59:59Z")
        bahamas = StacSearch(search.url, search.collections, (-77.5, 24.5, -76.0, 26.0), search.datetime)
        assert [r.id for r in scenes_of(source, asset=AssetChoice(bands=RGB), search=bahamas)] == ["rgb", "split"]
        refs = scenes_of(source, asset=AssetChoice(bands=RGB), search=search)
        assert [r.id for r in refs] == ["rgb", "split"]
        assert refs[1].source == f"{url}/split/split.json" and refs[1].href.count("<SimpleSource>") == 3
        options = RunOptions(model=str(rgb_checkpoint), executor="local", tile_size=64, halo=16)
        report = segment_dataset(source, str(tmp_path / "out"), options=options, dataset=november)
        assert report["done"] == ["rgb", "split"]
        with pytest.raises(ConfigError, match="holds no scene"):
            scenes_of(source, search=StacSearch(f"{url}/api", ("night",), None, "2025-01-01/2025-12-31"))
        with pytest.raises(ConfigError, match="holds no scene"):
            scenes_of(source, search=StacSearch(f"{url}/api", ("elsewhere",)))
        with pytest.raises(ConfigError, match="holds no scene"):
            scenes_of(source, search=StacSearch(f"{url}/api", bbox=(5.0, 45.0, 6.0, 46.0)))


def _item_collection(hrefs: dict[str, str]) -> dict[str, object]:
    geometry = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}
    features = [
        {
            "type": "Feature", "stac_version": "1.0.0", "id": name, "geometry": geometry, "bbox": [0, 0, 1, 1],
            "properties": {"datetime": "2026-11-30T00:00:00Z"}, "links": [],
            "assets": {"visual": {"href": href, "roles": ["data"], "type": "image/tiff"}},
        }
        for name, href in hrefs.items()
    ]  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


@pytest.mark.parametrize(
    "href", ["/etc/passwd.tif", "file:///etc/shadow.tif", "/vsizip//etc/x.zip/a.tif", "<VRTDataset>/etc</VRTDataset>"]
)
def test_a_remote_catalog_naming_local_files_is_refused(href: str, data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "stac").mkdir()
    local = str(data_dir / "RGB.byte.tif")
    (tmp_path / "stac" / "items.json").write_text(json.dumps(_item_collection({"a": local, "b": href})))
    with served(tmp_path / "stac") as url:
        with pytest.raises(InputError, match=r"names a local file as its asset 'visual'.*--allow-local-assets"):
            scenes_of(f"{url}/items.json")
        trusted = scenes_of(f"{url}/items.json", allow_local_assets=True)  # as asked: no refusal
        assert trusted[0].id == "a" and trusted[0].href == local
    assert scenes_of(str(tmp_path / "stac" / "items.json"))[0].href == local  # a local catalog may name them


def test_the_remote_href_rule() -> None:
    from segpipe.pipeline.catalog import is_remote_href

    for href in ("https://x/a.tif", "s3://b/a.tif", "gs://b/a.tif", "/vsicurl/https://x/a.tif", "/vsis3/b/a.tif"):
        assert is_remote_href(href), href
    for href in ("/data/a.tif", "a.tif", "file:///a.tif", "/vsizip/a.zip/b.tif", "/vsimem/a", "<VRTDataset/>"):
        assert not is_remote_href(href), href
