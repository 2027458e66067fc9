"""Bad input through the command line: every case exits 2 with one exact line on stderr, no traceback, and leaves
nothing in the output directory; the odd-but-valid scenes (1x1, NaN/Inf, all nodata, no CRS, rotated, one huge
strip) succeed with the mask on the scene's grid.

The CLI runs in-process (``segpipe.cli.main``) with stderr captured at the file descriptor; the local executor
and no Prefect, since neither is what these tests are about.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
from rio_cogeo.cogeo import cog_validate

from segpipe.pipeline.read import describe_scene
from tests.reliability.conftest import Cli, assert_refused
from tests.reliability.helpers import HERE, raw_tiff, rgb_scene, write_raster

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

LOCAL = ("--executor", "local", "--no-prefect")
SUPPORTED = "uint8, int8, uint16, int16, uint32, int32, float32, float64"


@pytest.fixture
def inp(tmp_path: Path) -> Path:
    path = tmp_path / "in"
    path.mkdir()
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def scene(inp: Path) -> Path:
    return rgb_scene(inp / "scene.tif")


def _text(path: Path) -> Path:
    path.write_text("id,name\n1,not a raster\n")
    return path


def _corrupt_header(path: Path) -> Path:
    path.write_bytes(b"II*\x00" + (10**6).to_bytes(4, "little") + bytes(200))  # first IFD far past the end
    return path


def _complex(path: Path) -> Path:
    rng = np.random.default_rng(0)
    return write_raster(path, (rng.random((3, 16, 16)) + 1j).astype(np.complex64))


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


def _empty(path: Path) -> Path:
    path.touch()
    return path


def _giant_tiles(path: Path) -> Path:
    return raw_tiff(path, 30000, 30000, tile=16384)


INPUT_CASES: list[tuple[str, Callable[[Path], Path], Callable[[str], str | re.Pattern[str]]]] = [
    ("missing", lambda p: p, lambda p: f"input {p!r} does not exist; check the path"),
    (
        "directory",
        _directory,
        lambda p: f"input {p!r} is a directory; give a raster file (GeoTIFF, COG, JPEG, PNG, ...)",
    ),
    ("empty", _empty, lambda p: f"input {p!r} is an empty file (0 bytes); re-copy or re-download it"),
    (
        "not a raster",
        _text,
        lambda p: re.compile(
            re.escape(f"input {p!r} is not a raster GDAL can read (")
            + r".*not recognized as being in a supported file format.*"
            + re.escape("); give a GeoTIFF, COG, JPEG or PNG")
        ),
    ),
    (
        "corrupt TIFF header",
        _corrupt_header,
        lambda p: re.compile(
            re.escape(f"input {p!r} is not a raster GDAL can read (")
            + r".+"
            + re.escape("); give a GeoTIFF, COG, JPEG or PNG")
        ),
    ),
    (
        "complex dtype",
        _complex,
        lambda p: f"input {p!r} has data type complex64, which segpipe cannot segment; supported: {SUPPORTED}",
    ),
    (
        "giant tiles",
        _giant_tiles,
        lambda p: (
            f"input {p!r} is stored in blocks of 16384x16384 pixels (768 MiB each) and GDAL decodes a whole "
            "block for any read, more than the 256 MiB segpipe allows; re-tile it first: gdal_translate -co "
            "TILED=YES -co COMPRESS=DEFLATE INPUT TILED.tif"
        ),
    ),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in INPUT_CASES], ids=[c[0] for c in INPUT_CASES])
def test_bad_scene_is_refused(
    make: Callable[[Path], Path],
    message: Callable[[str], str | re.Pattern[str]],
    cli: Cli,
    inp: Path,
    out: Path,
    rgb_checkpoint: Path,
) -> None:
    path = make(inp / "scene.tif")
    result = cli("run", path, out / "m.tif", "--model", rgb_checkpoint, *LOCAL)
    assert_refused(result, message(str(path)), out)


def test_truncated_tiff_fails_in_ingest_with_one_line(
    cli: Cli, inp: Path, out: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    """The header survives, the pixels do not: the open (validation) succeeds and the read in ingest fails."""
    whole = rgb_scene(inp / "whole.tif", 256, 256, tiled=True, blockxsize=128, blockysize=128, compress="deflate")
    data = whole.read_bytes()
    path = inp / "truncated.tif"
    path.write_bytes(data[: len(data) // 2])
    describe_scene(str(path))  # validation cannot see it
    work = tmp_path / "work"
    result = cli("run", path, out / "m.tif", "--model", rgb_checkpoint, "--work-dir", work, *LOCAL)
    assert_refused(
        result,
        re.compile(
            re.escape(f"input {str(path)!r} could not be read at pixels x 0-256, y 0-256 (")
            + r".*(IReadBlock|TIFFRead|Read).*"
            + re.escape("); the file is truncated or corrupt")
        ),
        out,
    )
    assert "See previous exception" not in result.err, "GDAL's own reason, not rasterio's pointer to it"


def _one_band(inp: Path) -> Path:
    return write_raster(inp / "pan.tif", np.full((1, 32, 32), 100, dtype=np.uint8))


def test_band_count_not_what_the_model_takes(cli: Cli, inp: Path, out: Path, rgb_checkpoint: Path) -> None:
    path = _one_band(inp)
    result = cli("run", path, out / "m.tif", "--model", rgb_checkpoint, *LOCAL)
    assert_refused(
        result,
        f"the model takes 3 band(s) (red, green, blue) but the scene {str(path)!r} has only 1 (1=unnamed); "
        "choose a model trained on this imagery",
        out,
    )


def _copy_model(checkpoint: Path, folder: Path) -> tuple[Path, Path]:
    weights = shutil.copy(checkpoint, folder / "model.safetensors")
    sidecar = shutil.copy(checkpoint.with_suffix(".json"), folder / "model.json")
    return Path(weights), Path(sidecar)


def test_corrupted_model_file(cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    weights, _ = _copy_model(rgb_checkpoint, tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    result = cli("run", scene, out / "m.tif", "--model", weights, *LOCAL)
    assert_refused(
        result,
        re.compile(
            re.escape(f"model file {weights} is not a valid safetensors file (corrupted or truncated: ")
            + r".+"
            + re.escape("); re-download or re-save it")
        ),
        out,
    )


def test_model_metadata_missing_fields(cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    import json

    weights, sidecar = _copy_model(rgb_checkpoint, tmp_path)
    metadata = json.loads(sidecar.read_text())
    del metadata["halo"], metadata["classes"]
    sidecar.write_text(json.dumps(metadata))
    result = cli("run", scene, out / "m.tif", "--model", weights, *LOCAL)
    assert_refused(
        result, f"model metadata {sidecar}: missing field(s) ['classes', 'halo']; add them to the JSON sidecar", out
    )


def test_model_metadata_not_json(cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    weights, sidecar = _copy_model(rgb_checkpoint, tmp_path)
    sidecar.write_text('{"architecture": "unet",')
    result = cli("run", scene, out / "m.tif", "--model", weights, *LOCAL)
    assert_refused(
        result,
        re.compile(
            re.escape(f"model metadata {sidecar} is not valid JSON (") + r".+" + re.escape("); fix the JSON sidecar")
        ),
        out,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ("--tile-size", "64", "--halo", "48"),
            "tile size 64 is smaller than twice the halo (48): most compute would be spent on context; use "
            "--tile-size >= 96 or a smaller --halo",
        ),
        (("--tile-size", "32768"), "tile size 32768 is absurdly large (max 16384 pixels); use 256-2048"),
        (("--tile-size", "0"), "tile size must be a positive number of pixels, got 0"),
        (("--tile-size", "62"), "tile size 62 is not a multiple of 4, which the model requires; use 60"),
        (("--workers", "0"), "--workers must be >= 1, got 0"),
        (("--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    ],
    ids=["tile below twice the halo", "tile absurdly large", "tile 0", "tile not a multiple", "workers 0", "batch 0"],
)
def test_bad_settings(
    options: tuple[str, ...], message: str, cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path
) -> None:
    result = cli("run", scene, out / "m.tif", "--model", rgb_checkpoint, *options, *LOCAL)
    assert_refused(result, message, out)


def test_more_workers_than_cores_is_refused_before_ray_starts(
    cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path
) -> None:
    """Each CPU segmenter claims a core of the local Ray instance: one more than there are would wait forever."""
    cores = os.cpu_count() or 1
    result = cli("run", scene, out / "m.tif", "--model", rgb_checkpoint, "--workers", cores + 1, "--device", "cpu")
    assert_refused(
        result,
        f"--workers {cores + 1} is more than the {cores} CPU cores of this machine (a segmenter needs at least one); "
        f"use --workers {cores} or fewer",
        out,
    )


def test_unwritable_output_directory(cli: Cli, scene: Path, rgb_checkpoint: Path) -> None:
    """/proc refuses new files even to root (for whom chmod means nothing and os.access says yes)."""
    output = "/proc/segpipe-test-mask.tif"
    result = cli("run", scene, output, "--model", rgb_checkpoint, *LOCAL)
    unwritable = re.escape(f"cannot write output {output!r}: directory /proc is not writable")
    assert_refused(result, re.compile(unwritable + r"( \(.+\))?"))
    assert not Path(output).exists()


def test_output_directory_is_a_file(cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path) -> None:
    (out / "afile").write_text("x")
    output = out / "afile" / "m.tif"
    result = cli("run", scene, output, "--model", rgb_checkpoint, *LOCAL)
    assert_refused(
        result, f"the directory of output {str(output)!r}, {out / 'afile'}, is a file; give a path in a directory"
    )
    assert sorted(p.name for p in out.iterdir()) == ["afile"]


def test_output_directory_missing(cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path) -> None:
    output = out / "nodir" / "m.tif"
    result = cli("run", scene, output, "--model", rgb_checkpoint, *LOCAL)
    assert_refused(result, f"the directory of output {str(output)!r} does not exist; create {out / 'nodir'} first", out)


def test_output_is_the_input(cli: Cli, scene: Path, rgb_checkpoint: Path) -> None:
    before = scene.read_bytes()
    result = cli("run", scene, scene, "--overwrite", "--model", rgb_checkpoint, *LOCAL)
    assert_refused(result, "OUTPUT must not be the INPUT file; choose another output path")
    assert scene.read_bytes() == before


def test_probabilities_escaping_the_output_directory(
    cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    escape = f"{out}/../probs.tif"
    result = cli("run", scene, out / "m.tif", "--probabilities", escape, "--model", rgb_checkpoint, *LOCAL)
    assert_refused(
        result,
        f"--probabilities {escape!r} resolves to {tmp_path / 'probs.tif'}, outside the directory of OUTPUT ({out}); "
        "write it next to OUTPUT",
        out,
    )
    assert not (tmp_path / "probs.tif").exists()


def test_probabilities_through_a_symlink_out_of_the_output_directory(
    cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "link").symlink_to(elsewhere)
    probs = out / "link" / "p.tif"
    result = cli("run", scene, out / "m.tif", "--probabilities", probs, "--model", rgb_checkpoint, *LOCAL)
    assert_refused(
        result,
        f"--probabilities {str(probs)!r} resolves to {elsewhere / 'p.tif'}, outside the directory of OUTPUT "
        f"({out}); write it next to OUTPUT",
    )
    assert sorted(p.name for p in out.iterdir()) == ["link"] and list(elsewhere.iterdir()) == []


def test_summary_symlinked_out_of_the_output_directory(
    cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    target = tmp_path / "precious.json"
    target.write_text("{}")
    (out / "m.summary.json").symlink_to(target)
    result = cli("run", scene, out / "m.tif", "--model", rgb_checkpoint, *LOCAL)
    assert_refused(
        result,
        f"the summary {str(out / 'm.summary.json')!r} resolves to {target}, outside the directory of OUTPUT "
        f"({out}); write it next to OUTPUT",
    )
    assert target.read_text() == "{}" and not (out / "m.tif").exists()


def test_disk_full_during_export(
    cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(source: object, destination: object, **options: object) -> None:
        Path(str(destination)).write_bytes(b"half a COG")  # GDAL got some way before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rasterio.shutil, "copy", disk_full)
    result = cli("run", scene, out / "m.tif", "--model", rgb_checkpoint, *LOCAL)
    assert_refused(
        result,
        f"could not write {out / 'm.tif'}: [Errno 28] No space left on device; check free space and permissions",
        out,
    )


def test_disk_full_during_the_probabilities_export_removes_the_mask(
    cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mask is complete and renamed into place before the probabilities fail: it must go too (no OUTPUT)."""
    copy = rasterio.shutil.copy

    def second_copy_fails(source: object, destination: object, **options: object) -> None:
        if ".p.tif." in str(destination):
            raise OSError(errno.ENOSPC, "No space left on device")
        copy(source, destination, **options)

    monkeypatch.setattr(rasterio.shutil, "copy", second_copy_fails)
    result = cli("run", scene, out / "m.tif", "--probabilities", out / "p.tif", "--model", rgb_checkpoint, *LOCAL)
    assert_refused(
        result,
        f"could not write {out / 'p.tif'}: [Errno 28] No space left on device; check free space and permissions",
        out,
    )


def test_disk_full_for_real_gdal(
    cli: Cli, scene: Path, out: Path, rgb_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GDAL itself hits the limit (RLIMIT_FSIZE at 2 kB while it writes the COG: EFBIG, as ENOSPC would be)."""
    copy = rasterio.shutil.copy

    def limited_copy(source: object, destination: object, **options: object) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
        try:
            copy(source, destination, **options)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)

    monkeypatch.setattr(rasterio.shutil, "copy", limited_copy)
    result = cli("run", scene, out / "m.tif", "--model", rgb_checkpoint, *LOCAL)
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: could not write {out / 'm.tif'}: "), result.err
    assert errors[0].endswith("; check free space and permissions")
    assert "Traceback" not in result.err and "internal error" not in result.err
    # libtiff reports the failed write on stderr itself, outside rasterio's error handling: that is all else
    assert all(line == errors[0] or "File too large" in line for line in lines), result.err
    assert sorted(p.name for p in out.iterdir()) == []


def test_unreachable_url_retries_with_backoff_then_one_line(cli: Cli, out: Path, rgb_checkpoint: Path) -> None:
    url = "https://127.0.0.1:9/x.tif"  # the discard port on loopback: connection refused
    start = time.monotonic()
    result = cli("run", url, out / "m.tif", "--model", rgb_checkpoint, *LOCAL)
    seconds = time.monotonic() - start
    assert_refused(
        result,
        re.compile(
            re.escape(f"input {url!r} could not be opened after 3 attempts (")
            + r".*(onnect|refused).*"
            + re.escape("); check the URL, the network and credentials")
        ),
        out,
    )
    assert "does not exist in the file system" not in result.err, "the real reason, not GDAL's cached failure"
    assert 3.0 <= seconds < 10.0, f"3 attempts, 1 s + 2 s of backoff: took {seconds:.1f} s"


def test_transient_http_failures_are_retried_and_the_run_succeeds(
    cli: Cli, inp: Path, out: Path, rgb_checkpoint: Path
) -> None:
    """The first two requests get 503: the open is retried (GDAL must not answer from its cache of the failure), and
    the run over HTTP gives the mask of the same file read from disk."""
    scene = rgb_scene(inp / "remote.tif", 90, 70, tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    server = subprocess.Popen(
        [sys.executable, str(HERE / "_flaky_http.py"), str(scene), "2"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}/remote.tif"
        result = cli("run", url, out / "m.tif", "--model", rgb_checkpoint, *LOCAL)
        assert result.code == 0, result.err
    finally:
        server.kill()
        log = server.communicate()[0].split()
    assert log.count("503") == 2 and log.count("206") >= 1
    assert cli("run", scene, out / "local.tif", "--model", rgb_checkpoint, *LOCAL).code == 0
    assert np.array_equal(_mask(out / "m.tif")[0], _mask(out / "local.tif")[0])


# --- odd but valid scenes: exit 0, the mask on the scene's grid ------------------------------------------------


def _mask(path: Path) -> tuple[np.ndarray, rasterio.profiles.Profile]:
    with rasterio.open(path) as src:
        return src.read(1), src.profile


def test_one_pixel_scene(cli: Cli, inp: Path, out: Path, rgb_checkpoint: Path) -> None:
    scene = write_raster(inp / "one.tif", np.full((3, 1, 1), 120, dtype=np.uint8))
    summary = cli("run", scene, out / "m.tif", "--model", rgb_checkpoint, "--json", *LOCAL).summary
    assert summary["tiles"]["total"] == 1 and summary["tiles"]["computed"] == 1
    mask, profile = _mask(out / "m.tif")
    assert mask.shape == (1, 1) and mask[0, 0] in (0, 1, 2)
    assert profile["transform"] == Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4100000.0)
    assert cog_validate(str(out / "m.tif"), quiet=True)[0]


def test_float_nan_and_inf_become_nodata(cli: Cli, inp: Path, out: Path, rgb_checkpoint: Path) -> None:
    data = np.random.default_rng(1).uniform(0, 200, (3, 70, 90)).astype(np.float32)
    data[0, 5:15, 5:15] = np.nan
    data[1, 30:40, 50:60] = np.inf
    data[2, 60, 80] = -np.inf
    scene = write_raster(inp / "float.tif", data)
    result = cli("run", scene, out / "m.tif", "--model", rgb_checkpoint, "--json", *LOCAL)
    assert result.summary["class_histogram"]["nodata"] == 100 + 100 + 1
    mask, _ = _mask(out / "m.tif")
    bad = ~np.isfinite(data).all(axis=0)
    assert (mask[bad] == 255).all() and (mask[~bad] != 255).all()


def test_all_nodata_scene_computes_nothing(cli: Cli, inp: Path, out: Path, rgb_checkpoint: Path) -> None:
    scene = write_raster(inp / "empty.tif", np.zeros((3, 100, 130), dtype=np.uint8), nodata=0)
    summary = cli("run", scene, out / "m.tif", "--model", rgb_checkpoint, "--json", *LOCAL).summary
    assert summary["tiles"]["computed"] == 0 and summary["tiles"]["skipped_nodata"] == summary["tiles"]["total"] == 6
    mask, profile = _mask(out / "m.tif")
    assert mask.shape == (100, 130) and (mask == 255).all() and profile["nodata"] == 255


def test_no_crs_works_with_one_warning(cli: Cli, inp: Path, out: Path, rgb_checkpoint: Path) -> None:
    scene = rgb_scene(inp / "plain.tif", 50, 40, crs=None, transform=Affine.identity())
    result = cli("run", scene, out / "m.tif", "--model", rgb_checkpoint, "--json", *LOCAL)
    assert result.code == 0, result.err
    assert result.err.strip().splitlines() == [
        f"warning: {scene} has no georeferencing (no CRS, identity transform): the mask keeps pixel coordinates"
    ]
    assert result.summary["scene"]["georeferenced"] is False
    with rasterio.open(out / "m.tif") as mask:
        assert mask.crs is None and mask.transform.is_identity and mask.shape == (40, 50)


def test_rotated_transform_is_kept(cli: Cli, inp: Path, out: Path, rgb_checkpoint: Path) -> None:
    """Decision: a rotated (or sheared) geotransform is kept as it is; the mask carries the same transform."""
    rotated = Affine(8.0, 3.0, 500000.0, 2.0, -9.0, 4100000.0)
    scene = rgb_scene(inp / "rotated.tif", 90, 70, transform=rotated)
    assert cli("run", scene, out / "m.tif", "--model", rgb_checkpoint, *LOCAL).code == 0
    with rasterio.open(scene) as src, rasterio.open(out / "m.tif") as mask:
        assert mask.transform == src.transform == rotated
        assert mask.crs == src.crs and mask.shape == src.shape
    assert cog_validate(str(out / "m.tif"), quiet=True)[0]


def test_huge_single_strip_tiff_is_accepted_and_read_line_by_line(tmp_path: Path) -> None:
    """Decision: accept. GDAL serves one huge strip as one-line blocks (uncompressed, and DEFLATE above ~20 MB), so
    every read is a window and memory stays bounded; 30000 x 30000 x 3 (2.7 GB, a sparse file here) describes fine."""
    for deflate in (False, True):
        path = raw_tiff(tmp_path / f"strip-{deflate}.tif", 30000, 30000, deflate=deflate)
        scene = describe_scene(str(path))
        assert (scene.width, scene.height, scene.count) == (30000, 30000, 3)
        with rasterio.open(path) as src:
            assert src.block_shapes[0] == (1, 30000), "served line by line"
            window = src.read(window=((29000, 29256), (100, 356))) if not deflate else None
        assert window is None or (window.shape == (3, 256, 256) and not window.any())


def test_single_strip_tiff_gives_the_same_mask_as_a_tiled_copy(
    cli: Cli, inp: Path, out: Path, rgb_checkpoint: Path
) -> None:
    data = np.random.default_rng(2).integers(0, 220, (3, 300, 200), dtype=np.uint8)
    strip = write_raster(inp / "strip.tif", data, blockysize=300)
    tiled = write_raster(inp / "tiled.tif", data, tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    with rasterio.open(strip) as src:
        assert src.block_shapes[0][1] == 200, "strips, not tiles (GDAL reads the one strip a few lines at a time)"
    assert cli("run", strip, out / "a.tif", "--model", rgb_checkpoint, *LOCAL).code == 0
    assert cli("run", tiled, out / "b.tif", "--model", rgb_checkpoint, *LOCAL).code == 0
    assert np.array_equal(_mask(out / "a.tif")[0], _mask(out / "b.tif")[0])
