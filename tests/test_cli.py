"""The command line as users meet it: exit codes, one-line errors, refusal to overwrite, nothing left behind,
and one full run through Prefect (ephemeral) and a local Ray pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio

ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0"}


def segpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segpipe.cli", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and text in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_full_run_through_prefect_and_ray(data_dir: Path, tmp_path: Path) -> None:
    # 512 px tiles (the shipped model's default is 1024) so that several tiles go through the Ray actors
    result = segpipe("run", str(data_dir / "RGB.byte.tif"), "mask.tif", "--json", "--tile-size", "512", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["output"] == str(tmp_path / "mask.tif")
    assert summary["tiles"]["total"] == 4 and summary["workers"] >= 1
    with rasterio.open(tmp_path / "mask.tif") as out, rasterio.open(data_dir / "RGB.byte.tif") as src:
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.summary.json", "mask.tif"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.tif", "out.tif"], "input 'missing.tif' does not exist"),
        (["run", "{data}/RGB.byte.tif", "out.png"], "must end in .tif or .tiff"),
        (["run", "{data}/RGB.byte.tif", "nodir/out.tif"], "does not exist; create nodir first"),
        (["run", "{data}/RGB.byte.tif", "out.tif", "--blend", "max"], "argument --blend: invalid choice"),
        (["run", "{data}/RGB.byte.tif", "out.tif", "--tile-size", "abc"], "expected a whole number"),
        (
            ["run", "{data}/RGB.byte.tif", "out.tif", "--tile-size", "200"],
            "tile size 200 is not a multiple of 16",
        ),
        (["run", "{data}/RGB.byte.tif", "out.tif", "--halo", "528"], "smaller than twice the halo"),
        (["run", "{data}/RGB.byte.tif", "out.tif", "--model", "nosuch"], "nosuch"),
        (
            ["run", "{data}/sample_geotiff.tif", "out.tif"],
            "takes 3 band(s) (red, green, blue) but the scene",
        ),
        (["run", "{data}/README.md", "out.tif"], "is not a raster GDAL can read"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    args: list[str], message: str, data_dir: Path, tmp_path: Path
) -> None:
    result = segpipe(*[a.format(data=data_dir) for a in args], cwd=tmp_path)
    assert_one_line_error(result, 2, message)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out.tif").write_bytes(b"keep me")
    result = segpipe("run", str(data_dir / "RGB.byte.tif"), "out.tif", cwd=tmp_path)
    assert_one_line_error(result, 2, "already exists; pass --overwrite")
    assert (tmp_path / "out.tif").read_bytes() == b"keep me"


def test_internal_failure_exits_1_with_one_line(data_dir: Path, tmp_path: Path) -> None:
    # a zarr work store path that is a file: the work store cannot be created past validation
    (tmp_path / "work").mkdir()
    from segpipe.pipeline.store import store_url

    Path(store_url(tmp_path / "work", str(data_dir / "RGB.byte.tif"))).write_text("not a zarr store")
    result = segpipe(
        "run",
        str(data_dir / "RGB.byte.tif"),
        "out.tif",
        "--work-dir",
        "work",
        "--no-prefect",
        "--executor",
        "local",
        cwd=tmp_path,
    )
    assert result.returncode in (1, 2), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out.tif").exists()


def test_train_command_on_a_real_pair_writes_a_loadable_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    import shutil

    for name in ("a", "b"):
        (tmp_path / name / "images").mkdir(parents=True)
        (tmp_path / name / "masks").mkdir(parents=True)
        shutil.copy(data_dir / "dubai" / "image_part_005.jpg", tmp_path / name / "images")
        shutil.copy(data_dir / "dubai" / "image_part_005.png", tmp_path / name / "masks")
    result = segpipe(
        "train", "a", "--val", "b", "--out", "run", "--architecture", "unet", "--base-channels", "4",
        "--depth", "2", "--epochs", "1", "--steps", "2", "--batch-size", "2", "--tile-size", "64",
        "--threads", "1", "--dice-weight", "0.5", "--colour-jitter", "0.1", "--ema-decay", "0.9",
        "--scale-jitter", "0.25", "--saturation-jitter", "0.5", "--lovasz-weight", "0.5", "--downsample", "2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert 0.0 <= report["best_miou"] <= 1.0
    from segpipe.models.checkpoint import load_model

    meta = load_model(report["checkpoint"]).metadata
    assert meta.architecture == "unet"
    assert (meta.provenance["dice_weight"], meta.provenance["colour_jitter"]) == (0.5, 0.1)
    assert (meta.provenance["ema_decay"], meta.provenance["scale_jitter"]) == (0.9, 0.25)
    assert (meta.provenance["saturation_jitter"], meta.provenance["lovasz_weight"]) == (0.5, 0.5)
    assert meta.arguments["downsample"] == 2 and meta.size_multiple == 8
    bad = segpipe("train", "a", "--out", "run2", "--colour-jitter", "1.5", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "colour_jitter" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "run2").exists()
    bad = segpipe("train", "a", "--out", "run3", "--scale-jitter", "2", cwd=tmp_path)
    assert bad.returncode == 2 and "scale_jitter" in bad.stderr and not (tmp_path / "run3").exists()


def test_evaluate_command_reports_json_and_rejects_size_mismatch(data_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    profile = {"driver": "GTiff", "width": 4, "height": 2, "count": 1, "dtype": "uint8"}
    with rasterio.open(tmp_path / "p.tif", "w", **profile) as dst:
        dst.write(np.array([[[0, 1, 1, 2], [2, 2, 0, 1]]], dtype=np.uint8))
    with rasterio.open(tmp_path / "g.tif", "w", **profile) as dst:
        dst.write(np.array([[[0, 1, 2, 2], [2, 2, 0, 0]]], dtype=np.uint8))
    result = segpipe("evaluate", "p.tif", "g.tif", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["overall_accuracy"] == 6 / 8
    with rasterio.open(tmp_path / "small.tif", "w", **{**profile, "width": 3}) as dst:
        dst.write(np.zeros((1, 2, 3), dtype=np.uint8))
    result = segpipe("evaluate", "p.tif", "small.tif", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ")


@pytest.mark.parametrize(("given", "expected"), [(None, 120), ("7", 7)])
def test_cli_gives_prefect_server_time_to_start_on_a_busy_machine(given: str | None, expected: int) -> None:
    """Prefect's 20 s default for its ephemeral server was missed with two trainings on 2 cores; a user's value wins."""
    env = {k: v for k, v in ENV.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    if given is not None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = given
    code = (
        "from segpipe.cli import _quiet_environment; _quiet_environment(False); "
        "from prefect.settings import get_current_settings; "
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip().splitlines()[-1]) == expected


def test_run_dataset_and_serve_take_every_run_option_from_one_declaration() -> None:
    """Each run option is declared once (a RunOptions field); run, dataset and serve all accept it, and what a
    command parses becomes the same RunOptions."""
    from segpipe.cli import build_parser
    from segpipe.core.options import given, options_of
    from segpipe.pipeline.settings import RunOptions

    flags = {f.flag for f in options_of(RunOptions)}
    assert {"--model", "--tile-size", "--halo", "--blend", "--batch-size", "--workers", "--work-dir"} <= flags
    argv = ["--model", "m", "--tile-size", "64", "--halo", "16", "--blend", "cosine", "--batch-size", "3"]
    argv += ["--workers", "2", "--device", "cpu", "--work-dir", "w", "--ray-address", "auto", "--overwrite"]
    parsed = {}
    for command in (["run", "in.tif", "out.tif"], ["dataset", "in", "out"], ["serve", "in", "out"]):
        args = build_parser().parse_args([*command, *argv])
        parsed[command[0]] = RunOptions(**given(args, args.option_fields))
    expected = RunOptions(
        model="m",
        tile_size=64,
        halo=16,
        blend="cosine",
        batch_size=3,
        workers=2,
        device="cpu",
        work_dir="w",
        ray_address="auto",
        overwrite=True,
    )
    assert parsed == {"run": expected, "dataset": expected, "serve": expected}
    args = build_parser().parse_args(["dataset", "in", "out"])
    assert RunOptions(**given(args, args.option_fields)) == RunOptions(), "defaults come from RunOptions alone"


def test_a_run_loads_the_model_once_besides_its_segmenter(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI validates (loading the model) and the run reuses that plan: the model is loaded by the plan and by
    the one in-process segmenter, not a third time."""
    import segpipe.models.checkpoint as checkpoint
    import segpipe.pipeline.run  # noqa: F401  # every module of a run, imported before the counting starts
    from segpipe.cli import main

    calls = []
    original = checkpoint.load_model

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    for module in [m for name, m in sys.modules.items() if name.startswith("segpipe.")]:
        if getattr(module, "load_model", None) is original:  # every module that loads models by this name
            monkeypatch.setattr(module, "load_model", counting)
    code = main(["run", str(data_dir / "RGB.byte.tif"), str(tmp_path / "m.tif"), "--no-prefect", "--executor", "local"])
    assert code == 0 and len(calls) == 2, calls
