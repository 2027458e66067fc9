"""--co NAME=VALUE: COG creation options as rio takes them, checked before work starts, applied to the mask and
probabilities, pixels unchanged, and part of the output key only when given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import given
from hypothesis import strategies as st

from segpipe.cli import main
from segpipe.core.cog import CODECS, parse_cog_options
from segpipe.core.errors import ConfigError


def test_names_and_values_are_normalised() -> None:
    assert parse_cog_options(["compress=zstd", "Level=9", "PREDICTOR=2", "blocksize=256"]) == {
        "COMPRESS": "ZSTD",
        "LEVEL": "9",
        "PREDICTOR": "YES",
        "BLOCKSIZE": "256",
    }
    assert parse_cog_options([]) == {}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["COMPRESS"], "NAME=VALUE"),
        (["COMPRESS=JPEG"], "lossy"),
        (["COMPRESS=BROTLI"], "must be one of"),
        (["COMPRESS=LZW", "LEVEL=3"], "does not apply"),
        (["COMPRESS=ZSTD", "LEVEL=23"], "1-22"),
        (["BLOCKSIZE=100"], "multiple of 16"),
        (["OVERVIEWS=NONE"], "not a COG creation option"),
        (["LEVEL=3", "level=4"], "twice"),
    ],
)
def test_bad_options_are_one_clear_error(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_cog_options(items)


@given(st.sampled_from(sorted(c for c, levels in CODECS.items() if levels)), st.integers(-5, 30))
def test_a_level_is_taken_exactly_when_in_the_codecs_range(codec: str, level: int) -> None:
    low, high = CODECS[codec]  # type: ignore[misc]
    if low <= level <= high:
        assert parse_cog_options([f"COMPRESS={codec}", f"LEVEL={level}"])["LEVEL"] == str(level)
    else:
        with pytest.raises(ConfigError):
            parse_cog_options([f"COMPRESS={codec}", f"LEVEL={level}"])


def test_co_changes_the_files_storage_not_their_pixels(data_dir: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    common = [str(data_dir / "RGB.byte.tif"), "--model", str(rgb_checkpoint), "--executor", "local", "--no-prefect"]
    assert main(["run", *common[:1], str(tmp_path / "a.tif"), *common[1:]]) == 0
    assert main([
        "run", *common[:1], str(tmp_path / "b.tif"), *common[1:], "--probabilities", str(tmp_path / "b.p.tif"),
        "--co", "COMPRESS=ZSTD", "--co", "LEVEL=9", "--co", "BLOCKSIZE=256",
    ]) == 0  # fmt: skip
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        assert a.compression.name == "deflate" and b.compression.name == "zstd"
        assert b.block_shapes[0] == (256, 256) and a.block_shapes[0] == (512, 512)
        assert np.array_equal(a.read(1), b.read(1))
    with rasterio.open(tmp_path / "b.p.tif") as p:
        assert p.compression.name == "zstd"
    assert main(["run", *common[:1], str(tmp_path / "c.tif"), *common[1:], "--co", "COMPRESS=WEBP"]) == 2
    assert not (tmp_path / "c.tif").exists()


def test_co_is_in_the_output_key_only_when_given(data_dir: Path, rgb_checkpoint: Path) -> None:
    from segpipe.models.checkpoint import load_model
    from segpipe.pipeline.plan import scene_output_key
    from segpipe.pipeline.read import describe_scene
    from segpipe.pipeline.settings import RunOptions

    loaded = load_model(str(rgb_checkpoint), device="cpu")
    file = describe_scene(str(data_dir / "RGB.byte.tif"))
    plain = scene_output_key(RunOptions(model=str(rgb_checkpoint)), file, loaded)
    zstd = scene_output_key(RunOptions(model=str(rgb_checkpoint), cog_options=("COMPRESS=ZSTD",)), file, loaded)
    assert plain.settings["cog"] == {} and zstd.settings["cog"] == {"COMPRESS": "ZSTD"}
    assert plain.digest != zstd.digest
