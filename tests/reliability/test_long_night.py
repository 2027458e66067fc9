"""A long night in one warm session: 80 small real scenes (256 px windows of tests/data rasters) through one
``segpipe dataset`` run, its whole process tree watched from outside (benchmarks/bench_long_night.py, whose
300-scene run is in docs/benchmarks.md). After the warm-up (allocator arenas, GDAL's and torch's caches: memory
grows for the first 40-60 scenes, by about 40 MiB, then stops), memory and descriptors stay flat."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_long_night import cut_scenes, slopes, watch_night

#: Where the slopes start: past the warm-up.
FROM_SCENE = 40
#: Most RSS growth per scene allowed from :data:`FROM_SCENE` on (MiB): a leak of one scene's pixels, results or
#: GDAL handles (256 x 256 x 3 bytes in, as much again in masks and probabilities, a dataset handle's block cache)
#: grows 0.5-2 MiB per scene; the 300-scene benchmark's slope from scene 20 is 0.045 MiB (docs/benchmarks.md).
MAX_RSS_MIB_PER_SCENE = 0.3
#: Descriptors: none may accumulate (a handle per scene would be a slope of 1).
MAX_FDS_PER_SCENE = 0.05


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eighty_scenes_in_one_session_keep_memory_and_descriptors_flat(rgb_checkpoint: Path, tmp_path: Path) -> None:
    cut_scenes(tmp_path / "scenes", 80)
    options = ["--model", str(rgb_checkpoint), "--executor", "local", "--tile-size", "128", "--halo", "16"]
    night = watch_night(tmp_path / "scenes", tmp_path / "out", options, timeout=800)
    assert night["returncode"] == 0, night["output_tail"]
    assert (tmp_path / "out" / "collection.json").is_file()
    assert len(list((tmp_path / "out").glob("*.item.json"))) == 80
    trend = slopes(night["samples"], FROM_SCENE)
    assert trend["rss_mib_per_scene"] < MAX_RSS_MIB_PER_SCENE, night["samples"]
    assert trend["fds_per_scene"] < MAX_FDS_PER_SCENE, night["samples"]
