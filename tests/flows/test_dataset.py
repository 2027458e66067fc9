"""The dataset flow through Prefect's ephemeral API: every scene segmented, re-runs skip what is done, one bad
scene does not stop the others."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from segpipe.core.errors import ConfigError, SegpipeError
from segpipe.flows.dataset import mask_path, scenes_in, segment_dataset
from segpipe.pipeline.settings import RunOptions


def test_dataset_flow_segments_new_scenes_and_skips_done_ones(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    scenes = tmp_path / "in"
    scenes.mkdir()
    shutil.copy(data_dir / "RGB.byte.tif", scenes / "a.tif")
    shutil.copy(data_dir / "lausanne-1091-322_00.tif", scenes / "b.tif")
    (scenes / "broken.tif").write_bytes(b"II*\x00 this is not a tiff")
    out = tmp_path / "out"
    with pytest.raises(SegpipeError, match=r"1 of 3 scenes failed: broken.tif: input .* is not a raster"):
        segment_dataset(str(scenes), str(out), options=RunOptions(model=str(rgb_checkpoint), executor="local"))
    assert mask_path(str(out), scenes / "a.tif").exists()
    assert mask_path(str(out), scenes / "b.tif").exists()
    (scenes / "broken.tif").unlink()
    result = segment_dataset(str(scenes), str(out), options=RunOptions(model=str(rgb_checkpoint), executor="local"))
    assert result == {"done": [], "skipped": [str(scenes / "a.tif"), str(scenes / "b.tif")], "failed": {}}


def test_missing_input_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist or is not a folder"):
        scenes_in(str(tmp_path / "nope"))
