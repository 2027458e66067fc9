"""Slides in data sets and on clusters: a folder of slides (and GeoTIFFs) is a data set; each slide gets a pyramidal
OME-TIFF mask at the pixel size asked for, QuPath polygons when asked, a STAC Item without geometry; a re-run skips
them, a changed ``--resolution`` recomputes them; a slide at a URL is one clear error; ``segpipe model init`` states a
model's resolution. Slides are small tiled TIFFs written with tifffile (``tests/pipeline/test_slides.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import tifffile

from segpipe.core.errors import ConfigError, InputError
from segpipe.flows.dataset import segment_dataset
from segpipe.pipeline.catalog import scenes_of
from segpipe.pipeline.names import mask_path
from segpipe.pipeline.reach import cluster_paths_problem
from segpipe.pipeline.read import describe_scene
from segpipe.pipeline.settings import DatasetOptions, RunOptions, RunSettings
from tests.pipeline.test_slides import HEIGHT, WIDTH, write_geotiff, write_slide

LOCAL = {"executor": "local", "device": "cpu", "tile_size": 128, "halo": 16}


def reasons(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {row["scene"]: (row["status"], row["reason"]) for row in report["scenes"]}


def physical_size(path: Path) -> tuple[float, float, tuple[int, ...]]:
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome, path
        found = dict(re.findall(r'PhysicalSize([XY])="([^"]+)"', tif.ome_metadata or ""))
        return float(found["X"]), float(found["Y"]), tuple(tif.series[0].shape)


def test_a_folder_of_slides_and_a_geotiff_is_one_data_set(rgb_checkpoint: Path, tmp_path: Path) -> None:
    from pystac.validation import validate_dict

    folder = tmp_path / "in"
    folder.mkdir()
    write_slide(folder / "fine.tiff", mpp=0.25)  # level 0 at 0.25 um, level 1 at 0.5 um
    write_slide(folder / "coarse.tif", mpp=0.5)  # level 0 at 0.5 um, level 1 at 1 um
    write_geotiff(folder / "geo.tif")
    out = tmp_path / "out"
    options = RunOptions(model=str(rgb_checkpoint), resolution="0.5um", **LOCAL)  # type: ignore[arg-type]
    dataset = DatasetOptions(vector_format="auto")

    first = segment_dataset(str(folder), str(out), options=options, dataset=dataset)
    assert reasons(first) == {name: ("done", "new") for name in ("coarse", "fine", "geo")}
    assert mask_path(str(out), "fine", slide=True) == str(out / "fine.mask.ome.tif")
    # each slide: a pyramidal OME-TIFF at 0.5 um per pixel (fine: its level 1; coarse: its level 0), QuPath polygons
    assert physical_size(out / "fine.mask.ome.tif") == (0.5, 0.5, (HEIGHT // 2, WIDTH // 2))
    assert physical_size(out / "coarse.mask.ome.tif") == (0.5, 0.5, (HEIGHT, WIDTH))
    qupath = json.loads((out / "fine.polygons.geojson").read_text())
    assert qupath["features"] and all(f["properties"]["objectType"] == "annotation" for f in qupath["features"])
    # the GeoTIFF as before: a COG mask, and GeoPackage polygons in its CRS
    assert (out / "geo.mask.tif").is_file() and (out / "geo.polygons.gpkg").is_file()
    assert not (out / "geo.mask.ome.tif").exists() and not (out / "geo.polygons.geojson").exists()
    summary = json.loads((out / "fine.mask.summary.json").read_text())
    assert summary["fit"]["slide"]["mpp"] == [0.5, 0.5] and summary["vector"]["format"] == "GeoJSON"

    # the slide's STAC Item: valid without a place on Earth (geometry null, no bbox), its pixel size recorded
    item = json.loads((out / "fine.item.json").read_text())
    assert item["geometry"] is None and "bbox" not in item
    assert not any("projection" in e for e in item["stac_extensions"])
    assert item["properties"]["segpipe:slide"]["mpp"] == [0.5, 0.5]
    assert item["assets"]["mask"]["href"] == "./fine.mask.ome.tif"
    assert item["assets"]["polygons"]["href"] == "./fine.polygons.geojson"
    assert item["assets"]["polygons"]["type"] == "application/geo+json"
    validate_dict({**item, "stac_extensions": []})  # the core schema, shipped with pystac (extensions' are online)
    geo = json.loads((out / "geo.item.json").read_text())
    assert geo["bbox"] and geo["assets"]["polygons"]["type"] == "application/geopackage+sqlite3"
    collection = json.loads((out / "collection.json").read_text())
    assert sorted(link["href"] for link in collection["links"] if link["rel"] == "item") == [
        "./coarse.item.json",
        "./fine.item.json",
        "./geo.item.json",
    ]

    again = segment_dataset(str(folder), str(out), options=options, dataset=dataset)
    assert reasons(again) == {name: ("skipped", "unchanged") for name in ("coarse", "fine", "geo")}

    # another pixel size: the slides' selection, hence their fingerprint, changes; the GeoTIFF ignores it
    coarser = RunOptions(model=str(rgb_checkpoint), resolution="1um", **LOCAL)  # type: ignore[arg-type]
    changed = segment_dataset(str(folder), str(out), options=coarser, dataset=dataset)
    assert reasons(changed) == {
        "coarse": ("done", "changed scene"),
        "fine": ("done", "changed scene"),
        "geo": ("skipped", "unchanged"),
    }
    assert physical_size(out / "coarse.mask.ome.tif") == (1.0, 1.0, (HEIGHT // 2, WIDTH // 2))

    # polygons asked for no more, then again with another simplification: the key says so
    plain = segment_dataset(str(folder), str(out), options=coarser, dataset=DatasetOptions())
    assert {r[1] for r in reasons(plain).values()} == {"changed settings (vector)"}
    simpler = RunOptions(model=str(rgb_checkpoint), resolution="1um", vector_simplify=2.0, **LOCAL)  # type: ignore[arg-type]
    shaped = segment_dataset(str(folder), str(out), options=simpler, dataset=DatasetOptions(vector_format="geojson"))
    assert {r[1] for r in reasons(shaped).values()} == {"changed settings (vector)"}
    (out / "geo.polygons.geojson").unlink()
    lost = segment_dataset(str(folder), str(out), options=simpler, dataset=DatasetOptions(vector_format="geojson"))
    assert reasons(lost)["geo"] == ("done", "incomplete (summary without its outputs)")
    assert reasons(lost)["fine"] == ("skipped", "unchanged")


def test_the_output_key_follows_resolution_and_tissue(rgb_checkpoint: Path, tmp_path: Path) -> None:
    from segpipe.models.checkpoint import load_model
    from segpipe.pipeline.plan import scene_output_key

    slide = write_slide(tmp_path / "s.tiff")
    loaded = load_model(str(rgb_checkpoint), device="cpu")
    file = describe_scene(str(slide))

    def key(**options: Any) -> str:
        return scene_output_key(RunOptions(model=str(rgb_checkpoint), **options), file, loaded).digest

    digests = {key(), key(resolution="0.5um"), key(resolution="1um"), key(tissue="none"), key(resolution="native")}
    assert len(digests) == 4, "native is level 0, as without a resolution: the same key"


def test_slide_files_are_listed_by_suffix_and_multi_file_slides_are_one_scene(tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    (folder / "case7").mkdir(parents=True)
    for name in ("a.svs", "b.ndpi", "c.mrxs", "d.scn", "e.bif", "f.ome.tif", "notes.txt", "case7/2.dcm", "case7/1.dcm"):
        (folder / name).write_bytes(b"")
    (folder / "v.vms").write_text("[Virtual Microscope Specimen]\nImageFile=v_0.jpg\nImageFile(1,0)=v_1.jpg\n")
    for name in ("v_0.jpg", "v_1.jpg", "photo.jpg"):
        (folder / name).write_bytes(b"")
    found = {ref.id: Path(ref.href).name for ref in scenes_of(str(folder), recursive=True)}
    assert found == {
        "a": "a.svs", "b": "b.ndpi", "c": "c.mrxs", "d": "d.scn", "e": "e.bif", "f": "f.ome.tif",
        "case7": "1.dcm", "v": "v.vms", "photo": "photo.jpg",
    }  # fmt: skip
    assert [ref.id for ref in scenes_of(str(folder / "*.svs"))] == ["a"]


def test_a_slide_at_a_url_is_one_clear_error_and_a_cluster_wants_it_on_shared_storage(tmp_path: Path) -> None:
    for url in ("s3://bucket/slides/x.svs", "https://host/x.ndpi?sig=1", "/vsis3/bucket/x.mrxs"):
        with pytest.raises(InputError, match="OpenSlide reads local files only") as found:
            describe_scene(url)
        assert "shared storage mounted at the same path on every node" in str(found.value)

    here = [{"NodeManagerAddress": "10.0.0.1"}]
    away = [*here, {"NodeManagerAddress": "10.0.0.7"}]
    slide = RunSettings(input="/shared/x.svs", output="/out/x.mask.ome.tif", work_dir="s3://b/work", model="default")
    assert cluster_paths_problem(slide, away, "10.0.0.1", slide=True) is None, "a slide on shared storage is a path"
    problem = cluster_paths_problem(slide, away, "10.0.0.1")
    assert problem is not None and "INPUT" in problem, "a GeoTIFF path is not reachable from the other machines"
    local_work = RunSettings(input="/shared/x.svs", output="/out/x.mask.ome.tif", work_dir="/w", model="default")
    problem = cluster_paths_problem(local_work, away, "10.0.0.1", slide=True)
    assert problem is not None and "--work-dir" in problem and "INPUT must" not in problem
    assert "whole-slide INPUT stays a path" in problem

    missing = tmp_path / "elsewhere.tiff"  # what a worker on a node without the shared mount meets
    from segpipe.pipeline.read import open_source

    with pytest.raises(InputError, match="OpenSlide reads local files only"):
        open_source(str(missing), source="slide")


def test_vector_options_of_a_data_set_need_a_vector_format() -> None:
    from segpipe.cli import build_parser

    with pytest.raises(ConfigError, match="give --vector-format"):
        DatasetOptions().check_with(RunOptions(vector_simplify=1.0))
    DatasetOptions(vector_format="gpkg").check_with(RunOptions(vector_simplify=1.0))
    with pytest.raises(ConfigError, match="--vector-format must be one of"):
        DatasetOptions(vector_format="shp")
    assert DatasetOptions(vector_format="auto").vector_suffix(slide=True) == ".geojson"
    assert DatasetOptions(vector_format="auto").vector_suffix(slide=False) == ".gpkg"
    assert DatasetOptions().vector_suffix(slide=True) is None
    args = build_parser().parse_args(["dataset", "in", "out", "--vector-format", "parquet", "--vector-min-area", "4"])
    assert args.vector_format == "parquet" and args.vector_min_area == 4.0


def test_model_init_states_the_resolution_a_model_was_trained_at(tmp_path: Path) -> None:
    import torch

    from segpipe.cli import main
    from segpipe.models.metadata import ModelMetadata

    path = tmp_path / "histo.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Conv2d(3, 2, 1).eval(), torch.zeros(1, 3, 16, 16)), str(path))
    common = ["model", "init", str(path), "--classes", "tumour,stroma", "--bands", "red,green,blue"]
    common += ["--mean", "128", "--std", "64", "--input-dtype", "uint8"]
    assert main([*common, "--resolution", "0.5um"]) == 0
    written = json.loads(path.with_name("histo.segpipe.json").read_text())
    assert written["resolution"] == {"value": 0.5, "unit": "um"}
    meta = ModelMetadata.from_dict(written, source="histo.segpipe.json")
    assert meta.resolution is not None and str(meta.resolution) == "0.5um"
    assert main([*common, "--resolution", "native", "--force"]) == 2
    assert main([*common, "--force"]) == 0 and "resolution" not in json.loads(
        path.with_name("histo.segpipe.json").read_text()
    )


def test_segpipe_train_writes_the_resolution_of_its_images_into_the_checkpoint(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from segpipe.models.checkpoint import load_model
    from segpipe.models.training import TrainConfig, train

    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / "tiles" / folder).mkdir(parents=True)
    for k in range(2):  # slide regions exported at 0.5 um per pixel, with their annotation masks
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"tiles/images/r{k}.png")
        Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8)).save(tmp_path / f"tiles/masks/r{k}.png")
    common: dict[str, Any] = {
        "train_dirs": (tmp_path / "tiles",),
        "arguments": {"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2},
        "architecture": "unet",
        "classes": (("stroma", "#00FF00"), ("tumour", "#FF0000")),
        "epochs": 1,
        "steps_per_epoch": 1,
        "batch_size": 2,
        "tile_size": 32,
        "device": "cpu",
        "progress": False,
    }
    with pytest.raises(ConfigError, match="got native"):
        TrainConfig(out_dir=tmp_path / "never", resolution="native", **common)
    result = train(TrainConfig(out_dir=tmp_path / "run", resolution="0.5um", **common))
    meta = load_model(result.checkpoint).metadata
    assert meta.resolution is not None and (meta.resolution.value, meta.resolution.unit) == (0.5, "um")
