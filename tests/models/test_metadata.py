"""Checkpoint metadata: validation messages, JSON round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe.core.errors import ModelError, SegpipeError
from segpipe.models.metadata import ClassInfo, ModelMetadata, read_metadata, write_metadata
from tests.models.conftest import make_metadata

SOURCE = "/x/y.json"


def _valid() -> dict[str, Any]:
    return make_metadata().to_dict()


def test_round_trip(tmp_path: Path) -> None:
    metadata = make_metadata(input_size=32)
    assert ModelMetadata.from_dict(metadata.to_dict(), source=SOURCE) == metadata
    sidecar = write_metadata(metadata, tmp_path / "m.safetensors")
    assert sidecar == tmp_path / "m.json"
    assert read_metadata(sidecar) == metadata
    assert json.loads(sidecar.read_text())["classes"][1] == {"name": "class1", "colour": "#010101"}
    assert not [p for p in tmp_path.iterdir() if p.name != "m.json"]  # no temporary file left behind


def test_optional_fields_default() -> None:
    data = _valid()
    for name in ("size_multiple", "input_size", "provenance"):
        del data[name]
    data["tile_size"], data["halo"] = 30, 1
    metadata = ModelMetadata.from_dict(data, source=SOURCE)
    assert (metadata.size_multiple, metadata.input_size, dict(metadata.provenance)) == (1, None, {})


def test_colours_are_normalised() -> None:
    info = ClassInfo("water", "#e2a929")
    assert info.colour == "#E2A929" and info.rgb == (0xE2, 0xA9, 0x29)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tile_size": -3}, "'tile_size' must be a positive integer, got -3"),
        ({"tile_size": 24.0}, "'tile_size' must be a positive integer, got 24.0"),
        ({"halo": True}, "'halo' must be an integer >= 0, got True"),
        ({"size_multiple": 0}, "'size_multiple' must be a positive integer, got 0"),
        (
            {"mean": [1.0, 2.0]},
            "'mean' must have one value per band (3 bands: ['red', 'green', 'blue']), got 2",
        ),
        ({"std": [1.0, 0.0, 1.0]}, "'std[1]' must be greater than 0, got 0.0"),
        ({"mean": [1.0, "2", 3.0]}, "'mean[1]' must be a finite number, got '2'"),
        ({"bands": []}, "'bands' must be a non-empty list, got []"),
        ({"bands": "rgb"}, "'bands' must be a non-empty list, got 'rgb'"),
        ({"bands": ["r", "g", "r"]}, "'bands' must have unique names, got duplicates ['r']"),
        ({"classes": []}, "'classes' must be a non-empty list, got []"),
        ({"classes": [{"name": "a", "colour": "red"}]}, "'classes[0].colour' must be a colour '#RRGGBB'"),
        ({"classes": [{"name": "a", "color": "#000000"}]}, "exactly the keys 'name' and 'colour'"),
        ({"classes": [{"name": "", "colour": "#000000"}]}, "'classes[0].name' must be a non-empty string"),
        ({"architecture": ""}, "'architecture' must be a non-empty string"),
        ({"arguments": ["in_channels", 3]}, "'arguments' must be an object with string keys"),
        ({"provenance": {"loss": math.nan}}, "'provenance' must hold only JSON values"),
        ({"halo": 3}, "tile_size + 2 * halo (24 + 2 * 3 = 30) must be a multiple of 'size_multiple' (4)"),
        ({"input_size": 64}, "tile_size + 2 * halo (24 + 2 * 4 = 32) must equal 'input_size' (64)"),
    ],
)
def test_invalid_fields(change: dict[str, Any], message: str) -> None:
    data = {**_valid(), **change}
    with pytest.raises(ModelError) as error:
        ModelMetadata.from_dict(data, source=SOURCE)
    text = str(error.value)
    assert text.startswith(f"model metadata {SOURCE}: ")
    assert message in text
    assert text.endswith("; fix the JSON sidecar")
    assert isinstance(error.value, SegpipeError) and isinstance(error.value, ValueError)


def test_unknown_and_missing_fields() -> None:
    with pytest.raises(ModelError, match=r"unknown field\(s\) \['tilesize'\]; allowed fields: architecture"):
        ModelMetadata.from_dict({**_valid(), "tilesize": 3}, source=SOURCE)
    data = _valid()
    del data["bands"], data["halo"]
    with pytest.raises(ModelError, match=r"missing field\(s\) \['bands', 'halo'\]"):
        ModelMetadata.from_dict(data, source=SOURCE)
    with pytest.raises(ModelError, match="expected a JSON object, got list"):
        ModelMetadata.from_dict([], source=SOURCE)  # type: ignore[arg-type]


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ModelError, match="'tile_size' must be a positive integer, got 0; fix the values passed"):
        make_metadata(tile_size=0)
    with pytest.raises(ModelError, match="'colour' must be a colour '#RRGGBB'"):
        ClassInfo("a", "#12345")


def test_check_tile_geometry() -> None:
    metadata = make_metadata()
    metadata.check_tile_geometry(56, 4)
    with pytest.raises(ModelError, match=r"\(50 \+ 2 \* 4 = 58\) must be a multiple of 'size_multiple' \(4\)"):
        metadata.check_tile_geometry(50, 4)


def test_read_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is missing; every model needs segpipe metadata"):
        read_metadata(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match=f"model metadata {bad} is not valid JSON"):
        read_metadata(bad)


names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8).filter(
    lambda s: bool(s.strip())
)
numbers = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    bands=st.lists(names, min_size=1, max_size=4, unique=True),
    classes=st.lists(names, min_size=1, max_size=5, unique=True),
    colour=st.from_regex(r"#[0-9A-F]{6}", fullmatch=True),
    tile_size=st.integers(1, 4096),
    multiple=st.sampled_from([1, 2, 16]),
    data=st.data(),
)
def test_round_trip_property(
    bands: list[str], classes: list[str], colour: str, tile_size: int, multiple: int, data: st.DataObject
) -> None:
    halo = data.draw(st.integers(0, 256))
    tile_size += -(tile_size + 2 * halo) % multiple
    metadata = ModelMetadata(
        architecture="unet",
        arguments={"in_channels": len(bands), "num_classes": len(classes)},
        classes=tuple(ClassInfo(name, colour) for name in classes),
        bands=tuple(bands),
        mean=tuple(data.draw(numbers) for _ in bands),
        std=tuple(data.draw(st.floats(0.001, 1e4)) for _ in bands),
        tile_size=tile_size,
        halo=halo,
        size_multiple=multiple,
        provenance={"epochs": data.draw(st.integers(0, 10**6)), "note": data.draw(names)},
    )
    text = json.dumps(metadata.to_dict(), allow_nan=False)
    assert ModelMetadata.from_dict(json.loads(text), source="property") == metadata
