"""Bounded fuzzing (hypothesis, a few hundred examples each, seconds) of the input-validation entry points: they
accept an input or raise the project's own error for it, never anything else."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from segpipe.core.errors import ConfigError, InputError, ModelError
from segpipe.core.tiles import validate_tiling
from segpipe.models.metadata import ModelMetadata
from segpipe.pipeline.read import describe_scene
from segpipe.pipeline.scene import SceneInfo
from tests.reliability.helpers import rgb_scene

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="segpipe-fuzz-") as name:
        yield Path(name)


@pytest.fixture(scope="module")
def tiff_bytes(folder: Path) -> bytes:
    """A small real GeoTIFF: header, IFD and GeoTIFF keys up front, then two strips of pixels."""
    return rgb_scene(folder / "real.tif", 24, 16, nodata=0).read_bytes()


def _describe(folder: Path, data: bytes) -> None:
    path = folder / "fuzzed.tif"
    path.write_bytes(data)
    try:
        scene = describe_scene(str(path))
    except InputError:
        return
    assert isinstance(scene, SceneInfo) and scene.width >= 1 and scene.height >= 1 and scene.count >= 1
    json.dumps(scene.to_attrs())  # what the work store keeps must stay JSON


@given(data=st.binary(max_size=2048))
@example(data=b"II*\x00")
@example(data=b"MM\x00*\x00\x00\x00\x08")
@example(data=b"\x89PNG\r\n\x1a\n")
@FUZZ
def test_describe_scene_on_random_bytes(data: bytes, folder: Path) -> None:
    _describe(folder, data)


@given(
    edits=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.one_of(st.none(), st.integers(8, 4096)),
)
@FUZZ
def test_describe_scene_on_mutated_tiff_headers(
    edits: list[tuple[int, int]], cut: int | None, folder: Path, tiff_bytes: bytes
) -> None:
    data = bytearray(tiff_bytes)
    for offset, value in edits:
        data[offset % len(data)] = value
    _describe(folder, bytes(data[:cut] if cut else data))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)

VALID: dict[str, Any] = {
    "architecture": "unet",
    "arguments": {"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2},
    "classes": [{"name": "land", "colour": "#00FF00"}, {"name": "water", "colour": "#0000FF"}],
    "bands": ["red", "green", "blue"],
    "mean": [100, 100, 100],
    "std": [50, 50, 50],
    "tile_size": 64,
    "halo": 16,
    "size_multiple": 4,
}
FIELDS = [*VALID, "input_size", "provenance"]


def _metadata(data: Any) -> None:
    try:
        metadata = ModelMetadata.from_dict(data, source="fuzz.json")
    except ModelError:
        return
    assert ModelMetadata.from_dict(metadata.to_dict(), source="again.json") == metadata


@given(data=json_values)
@FUZZ
def test_model_metadata_from_random_json(data: Any) -> None:
    _metadata(data)


@given(changes=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3), drop=st.sets(st.sampled_from(FIELDS)))
@FUZZ
def test_model_metadata_from_mutated_sidecars(changes: dict[str, Any], drop: set[str]) -> None:
    data = {k: v for k, v in {**VALID, **changes}.items() if k not in drop}
    _metadata(data)


@given(
    tile=st.integers(-(2**40), 2**40) | st.integers(-4, 20000),
    halo=st.integers(-(2**40), 2**40) | st.integers(-4, 5000),
    multiple=st.integers(1, 64),
    fixed=st.none() | st.integers(-4, 40000),
)
@FUZZ
def test_validate_tiling_on_random_integers(tile: int, halo: int, multiple: int, fixed: int | None) -> None:
    try:
        validate_tiling(tile, halo, size_multiple=multiple, input_size=fixed)
    except ConfigError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert 1 <= tile <= 16384 and halo >= 0 and 2 * halo <= tile
    # a fixed-input network takes its input as it is: only a free input size needs the size multiple
    assert fixed is not None or (tile % multiple == 0 and halo % multiple == 0)
    assert fixed is None or tile + 2 * halo == fixed
    assert np.isfinite(tile + 2 * halo)
