"""GDAL's block cache is bounded while ingest and export read and write, and restored afterwards.

GDAL's default cache is 5 % of RAM and fills with every decoded block, so without the bound a process's memory
grew with the scene (the benchmark's peak at 268 MP was 17 % above 16.8 MP; with it, 4 %).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import rasterio
from rasterio._env import get_gdal_config, set_gdal_config

from segpipe.core.raster import GDAL_CACHE_BYTES
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.settings import RunSettings


def test_ingest_and_export_open_rasters_under_the_bounded_cache(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, set[int]] = {}
    original = rasterio.open

    def recording_open(*args: Any, **kwargs: Any) -> Any:
        frame = sys._getframe(1)  # every module on the stack: ingest opens through the scene source
        while frame is not None:
            seen.setdefault(frame.f_globals.get("__name__", ""), set()).add(int(get_gdal_config("GDAL_CACHEMAX")))
            frame = frame.f_back
        return original(*args, **kwargs)

    # GDAL's default is 5 % of the memory it sees, which on a small container can equal the bound: start the
    # process from a setting that differs from it, and put the original back afterwards.
    original_setting = get_gdal_config("GDAL_CACHEMAX")
    before = 3 * GDAL_CACHE_BYTES
    set_gdal_config("GDAL_CACHEMAX", before)
    try:
        monkeypatch.setattr(rasterio, "open", recording_open)
        scene = data_dir / "RGB.byte.tif"
        run_scene(RunSettings(input=str(scene), output=str(tmp_path / "mask.tif"), executor="local"))
        assert seen.get("segpipe.pipeline.ingest") == {GDAL_CACHE_BYTES}
        assert seen.get("segpipe.pipeline.sinks.cog") == {GDAL_CACHE_BYTES}
        assert int(get_gdal_config("GDAL_CACHEMAX")) == before, "the process-wide setting is restored"
    finally:
        set_gdal_config("GDAL_CACHEMAX", original_setting)
