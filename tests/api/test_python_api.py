"""The Python API's plumbing: a data set through segpipe.segment_dataset with options by name, and the errors a
notebook user sees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import segpipe


def test_segment_dataset_takes_run_and_dataset_options_by_name(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(data_dir / "RGB.byte.tif", folder / "sub" / "a.tif")
    options = {"recursive": True, "model": str(rgb_checkpoint), "executor": "local", "tile_size": 64, "halo": 16}
    report = segpipe.segment_dataset(str(folder), str(tmp_path / "out"), **options)
    assert [row["status"] for row in report["scenes"]] == ["done"]
    assert list((tmp_path / "out").glob("*.mask.tif"))
    again = segpipe.segment_dataset(str(folder), str(tmp_path / "out"), **options)
    assert [row["reason"] for row in again["scenes"]] == ["unchanged"]


def test_bad_options_raise_the_clis_errors(tmp_path: Path) -> None:
    with pytest.raises(segpipe.ConfigError, match="--blend must be one of"):
        segpipe.segment("tests/data/RGB.byte.tif", tmp_path / "m.tif", blend="average")
    with pytest.raises(segpipe.InputError):
        segpipe.segment(tmp_path / "missing.tif", tmp_path / "m.tif", executor="local")
    assert not (tmp_path / "m.tif").exists()
    with pytest.raises(segpipe.ConfigError, match="executor must be"):
        segpipe.Session(executor="gpu")
