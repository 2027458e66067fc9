"""--config FILE: the run, data-set and schedule options from TOML, YAML or JSON, with the flags' names, defaults
and checks; a flag overrides the file; a night writes its resolved options, which --config reads back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segpipe.cli import build_parser, main
from segpipe.cli.run import _with_config
from segpipe.core.errors import ConfigError
from segpipe.core.options import from_values, read_options_file, split_options, values_of
from segpipe.pipeline.night import resolved_options
from segpipe.pipeline.settings import DatasetOptions, RunOptions, ScheduleOptions


def _resolved(argv: list[str]) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _with_config(args, (RunOptions,), [args.option_fields])
    classes = (RunOptions, DatasetOptions, ScheduleOptions)[: 3 if args.serve else 2]
    fields = [args.option_fields, args.dataset_fields, args.schedule_fields][: len(classes)]
    return _with_config(args, classes, fields)


def test_a_toml_file_gives_options_and_a_flag_overrides_it(tmp_path: Path) -> None:
    config = tmp_path / "night.toml"
    config.write_text('tile-size = 512\nhalo = 16\nblend = "cosine"\nco = ["COMPRESS=ZSTD"]\n[dataset]\nretries = 3\n')
    run, dataset = _resolved(["dataset", "in", "out", "--config", str(config), "--halo", "32"])
    assert run == {"tile_size": 512, "halo": 32, "blend": "cosine", "cog_options": ("COMPRESS=ZSTD",)}
    assert dataset == {"retries": 3}
    assert RunOptions(**run).halo == 32


def test_yaml_and_json_files_and_the_schedule_of_serve(tmp_path: Path) -> None:
    (tmp_path / "o.yaml").write_text(
        "run:\n  tile_size: 256\nschedule:\n  cron: '30 1 * * *'\n  timezone: Europe/Zurich\n"
    )
    run, _, schedule = _resolved(["serve", "in", "out", "--config", str(tmp_path / "o.yaml")])
    assert run == {"tile_size": 256}
    assert ScheduleOptions(**schedule) == ScheduleOptions(cron="30 1 * * *", timezone="Europe/Zurich")
    (tmp_path / "o.json").write_text(json.dumps({"model": "default", "nodata": 0}))
    assert _resolved(["run", "a.tif", "b.tif", "--config", str(tmp_path / "o.json")]) == [
        {"model": "default", "nodata": 0.0}
    ]


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("tilesize = 5\n", ".toml", "'tilesize' is not an option here; the options are: "),
        ("tile_size = 'big'\n", ".toml", "tile_size must be a whole number"),
        ("overwrite = 1\n", ".toml", "overwrite must be true or false"),
        ("tile_size = \n", ".toml", "is not valid TOML"),
        ("- a\n- b\n", ".yaml", "must hold a mapping"),
        ("x", ".ini", "must be a .toml, .yaml or .json file"),
    ],
)
def test_a_bad_file_is_one_line_and_exit_2(
    text: str, suffix: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / f"bad{suffix}"
    config.write_text(text)
    assert main(["run", "a.tif", str(tmp_path / "m.tif"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "m.tif").exists()


def test_values_are_checked_by_the_options_themselves(tmp_path: Path) -> None:
    (tmp_path / "o.toml").write_text('blend = "average"\n')
    with pytest.raises(ConfigError, match="--blend must be one of"):
        RunOptions(**_resolved(["run", "a.tif", "b.tif", "--config", str(tmp_path / "o.toml")])[0])
    (tmp_path / "s.toml").write_text('[schedule]\ntimezone = "Mars/Olympus"\n')
    with pytest.raises(ConfigError, match="is not a time zone"):
        ScheduleOptions(**_resolved(["serve", "i", "o", "--config", str(tmp_path / "s.toml")])[2])


@given(
    tile=st.none() | st.integers(16, 4096),
    halo=st.none() | st.integers(0, 256),
    blend=st.sampled_from(["crop", "cosine", "gaussian"]),
    retries=st.integers(0, 5),
    recursive=st.booleans(),
)
def test_a_nights_resolved_options_read_back_as_the_same_options(
    tile: int | None, halo: int | None, blend: str, retries: int, recursive: bool, tmp_path_factory: Any
) -> None:
    options = RunOptions(tile_size=tile, halo=halo, blend=blend, cog_options=("COMPRESS=ZSTD", "LEVEL=3"))
    dataset = DatasetOptions(retries=retries, recursive=recursive, notify="https://hooks.example/T0KEN")
    path = tmp_path_factory.mktemp("night") / "segpipe-options.json"
    path.write_text(json.dumps(resolved_options(options, dataset)))
    assert "T0KEN" not in path.read_text()  # a webhook URL is a secret: not written
    run, back = split_options(read_options_file(str(path)), (RunOptions, DatasetOptions), where="test")
    assert RunOptions(**run) == options
    assert values_of(DatasetOptions(**back)) == {**values_of(dataset), "notify": None}


def test_segpipe_run_with_a_config_file(data_dir: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {rgb_checkpoint}\ntile-size: 128\nhalo: 16\nexecutor: local\n")
    out = tmp_path / "m.tif"
    assert main(["run", str(data_dir / "RGB.byte.tif"), str(out), "--config", str(config), "--no-prefect",
                 "--tile-size", "256"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "m.summary.json").read_text())
    assert summary["tiles"]["total"] == 4 * 3  # 791 x 718 px in 256 px tiles: the flag won over the file's 128


def test_an_option_is_named_by_its_field_or_its_flag_everywhere(tmp_path: Path) -> None:
    """``segpipe dataset --probabilities`` is the field ``write_probabilities`` (a run's ``probabilities`` is a path):
    a config file, a deployment's parameters and the Python API take either name, and a night records the field."""
    config = tmp_path / "night.toml"
    config.write_text("[dataset]\nprobabilities = true\n")
    (_, from_file), (_, from_flag) = _resolved(["dataset", "in", "out", "--config", str(config)]), _resolved(
        ["dataset", "in", "out", "--probabilities"]
    )
    assert from_file == from_flag == {"write_probabilities": True}
    assert from_values(DatasetOptions, {"probabilities": True}) == DatasetOptions(write_probabilities=True)
    assert from_values(DatasetOptions, {"write_probabilities": True}) == DatasetOptions(write_probabilities=True)
    night = resolved_options(RunOptions(), DatasetOptions(write_probabilities=True))
    assert night["dataset"]["write_probabilities"] is True and "probabilities" not in night["dataset"]
    with pytest.raises(ConfigError, match="'probability' is not an option here"):
        split_options({"probability": True}, (DatasetOptions,), where="test")
