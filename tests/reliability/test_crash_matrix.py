"""The crash-point matrix (see :mod:`tests.reliability.crash_matrix`): ``segpipe run`` and ``segpipe dataset``
SIGKILLed before and inside every stage, and a data set also before and inside its STAC Item and Collection writes.
After each kill nothing half-written was ever visible in the output folder, no lock and no process of the run is
left, and the same command run again gives the files of a clean run.

A representative subset runs by default (inside inference, inside the polygons, before the summary, before the data
set's Collection: about a minute on 2 cores); every other case is ``slow`` (``-m slow``). ``benchmarks/crash_matrix.py``
runs them all and prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability.crash_matrix import DEFAULT_CASES, POINTS, CaseResult, Matrix, Point, cases, point


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, rgb_checkpoint: Path) -> Matrix:
    """One matrix for the module: each command's clean run is made once."""
    return Matrix(tmp_path_factory.mktemp("crash-matrix"), rgb_checkpoint)


def check(matrix: Matrix, at: Point, kind: str) -> CaseResult:
    result = matrix.case(at, kind)
    print(f"\n{kind} {at.name}: {json.dumps({k: v for k, v in result.to_dict().items() if k != 'command'})}")
    assert not result.problems(), json.dumps(result.to_dict(), indent=2)
    assert result.files_checked >= len(result.visible_after_kill)
    return result


SCENE_DONE = ["a.item.json", "a.mask.summary.json", "a.mask.tif", "a.polygons.gpkg", "a.probabilities.tif",
              "segpipe-options.json"]  # fmt: skip
#: What a user finds in the output folder after each default kill: (visible files, hidden ones).
LEFT_AT_THE_KILL = {
    ("infer:inside", "single"): ([], []),
    ("polygons:inside", "single"): (["m.prob.tif", "m.tif"], [".m.gpkg.segpipe-partial"]),
    ("summary:before", "single"): (["m.gpkg", "m.prob.tif", "m.tif"], []),
    ("collection:before", "dataset"): (SCENE_DONE, []),
}


@pytest.mark.parametrize(("name", "kind"), DEFAULT_CASES, ids=[f"{kind}-{name}" for name, kind in DEFAULT_CASES])
def test_killed_at_a_point_leaves_nothing_half_written_and_the_rerun_is_a_clean_run(
    matrix: Matrix, name: str, kind: str
) -> None:
    result = check(matrix, point(name), kind)
    assert (result.visible_after_kill, result.hidden_after_kill) == LEFT_AT_THE_KILL[(name, kind)]


REST = [(at, kind) for at, kind in cases() if (at.name, kind) not in DEFAULT_CASES]


@pytest.mark.slow
@pytest.mark.parametrize(("at", "kind"), REST, ids=[f"{kind}-{at.name}" for at, kind in REST])
def test_the_rest_of_the_matrix(matrix: Matrix, at: Point, kind: str) -> None:
    check(matrix, at, kind)


def test_the_matrix_names_every_point_of_the_harness() -> None:
    """Every point of the matrix is one the harness can kill at, and every stage of a run is in it."""
    from tests.reliability import _crash_at

    assert sorted(p.name for p in POINTS) == sorted(_crash_at.installers())
    stages = {at.stage for at, _ in cases()}
    assert stages == {"validate", "session", "ingest", "infer", "stitch", "export", "polygons", "summary", "item",
                      "collection"}  # fmt: skip
    assert all(kind in {"single", "dataset"} for _, kind in cases())
    assert all((point(name), kind) in cases() for name, kind in DEFAULT_CASES)
    assert sorted(LEFT_AT_THE_KILL) == sorted(DEFAULT_CASES)


def test_only_a_segpipe_mask_without_its_summary_is_taken_for_an_unfinished_run(tmp_path: Path) -> None:
    """What lets the re-run of a run killed after its first output replace that output without ``--overwrite``
    (the ``summary:before`` case): a mask segpipe wrote with no summary beside it. A finished run's mask, another
    raster and a file that is no raster still need ``--overwrite``."""
    import numpy as np
    import rasterio

    from segpipe.pipeline.plan import left_by_unfinished_run
    from tests.reliability.helpers import write_raster

    mask = write_raster(tmp_path / "m.tif", np.zeros((1, 8, 8), dtype=np.uint8))
    other = write_raster(tmp_path / "other.tif", np.zeros((1, 8, 8), dtype=np.uint8))
    with rasterio.open(mask, "r+") as dst:
        dst.update_tags(SOFTWARE="segpipe")
    (tmp_path / "text.tif").write_bytes(b"keep me")
    assert left_by_unfinished_run(str(mask))
    assert not left_by_unfinished_run(str(other))
    assert not left_by_unfinished_run(str(tmp_path / "text.tif"))
    assert not left_by_unfinished_run(str(tmp_path / "missing.tif"))
    (tmp_path / "m.summary.json").write_text("{}\n")
    assert not left_by_unfinished_run(str(mask)), "a finished run's mask"


def test_the_watcher_sees_a_half_written_file_and_the_comparison_a_different_one(tmp_path: Path) -> None:
    """The checks themselves: a truncated COG, JSON or GeoPackage is seen as half-written (hidden files are not
    looked at); two output folders that differ only in times and resume counters compare equal, any other change
    is found."""
    import os

    import numpy as np

    from tests.reliability.crash_matrix import Watcher, differences
    from tests.reliability.helpers import write_raster

    folder = tmp_path / "out"
    folder.mkdir()
    tif = write_raster(tmp_path / "whole.tif", np.arange(3 * 64 * 64, dtype=np.uint16).reshape(3, 64, 64) % 251)
    (folder / "m.tif").write_bytes(tif.read_bytes()[: tif.stat().st_size // 2])
    (folder / "m.summary.json").write_text('{"input": "x", "tiles": {')
    (folder / "m.gpkg").write_bytes(b"SQLite format 3\x00" + bytes(100))
    (folder / ".m.tif.segpipe-partial").write_bytes(b"hidden: not looked at")
    watcher = Watcher(os.getpid(), folder)
    watcher.poll(processes=False)
    assert sorted(h.split(" ", 1)[0] for h in watcher.half_written) == ["m.gpkg", "m.summary.json", "m.tif"]

    runs = {}
    for name, seconds, reused in (("clean", 1.0, 0), ("rerun", 9.0, 5)):
        out = tmp_path / name / "out"
        out.mkdir(parents=True)
        summary = {"output": str(out / "m.tif"), "seconds": {"total": seconds}, "tiles": {"reused": reused, "total": 9},
                   "class_histogram": {"a": 3}}  # fmt: skip
        (out / "m.summary.json").write_text(json.dumps(summary))
        (out / "m.gpkg").write_bytes(b"GPKG 2026-12-0%dT10:00:00.123Z rows" % int(seconds))
        (out / "m.tif").write_bytes(tif.read_bytes())
        runs[name] = out
    assert differences(runs["clean"], tmp_path / "clean", runs["rerun"], tmp_path / "rerun") == []
    flipped = bytearray(tif.read_bytes())
    flipped[-10] ^= 1
    (runs["rerun"] / "m.tif").write_bytes(bytes(flipped))
    (runs["rerun"] / ".m.gpkg.segpipe-partial").write_bytes(b"left behind")
    found = differences(runs["clean"], tmp_path / "clean", runs["rerun"], tmp_path / "rerun")
    assert found[0].startswith("files [") and found[1:] == ["m.tif differs"]


def test_the_benchmark_prints_one_row_per_point_with_both_commands() -> None:
    """``benchmarks/crash_matrix.py``'s table (its runs are the cases above): a row per point, n/a where a point is
    not the command's, and a problem spelled out."""
    from benchmarks.crash_matrix import table
    from tests.reliability.crash_matrix import CaseResult

    good = CaseResult("summary:before", "single", [], killed=True, rerun_exit_code=0, identical=True, processes_seen=1,
                      reaped_seconds=0.1)  # fmt: skip
    bad = CaseResult("collection:before", "dataset", [], killed=True, rerun_exit_code=0, differences=["x differs"])
    text = table({("summary:before", "single"): good, ("collection:before", "dataset"): bad}).splitlines()
    assert len(text) == 4 and text[0].count("|") == 11
    assert text[2].startswith("| before summary | every output in place, no summary | yes | yes | none | none (1 ")
    assert text[2].endswith("| n/a | n/a | n/a | n/a |")
    assert "| **NO**: x differs |" in text[3]
