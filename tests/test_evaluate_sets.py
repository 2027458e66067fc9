"""``segpipe evaluate`` over data sets: folders paired by name, list files of pairs, pooled versus per-image metrics,
``--unknown ignore`` for colour-coded masks with a border, ``--model`` colour tables, and the CLI's JSON and
one-line errors. Small rasters are written here; the one real pair is tests/data/dubai."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from segpipe.cli import main
from segpipe.core.colours import ColourTable
from segpipe.core.errors import ConfigError, InputError
from segpipe.core.metrics import DatasetEvaluation, confusion_matrix
from segpipe.pipeline.evaluate import evaluate, evaluate_pairs, model_classes
from segpipe.pipeline.pairs import Pair, find_pairs, pair_folders, pair_key, read_pair_list

ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0"}

DUBAI = Path(__file__).resolve().parent / "data" / "dubai" / "image_part_005.png"
TABLE = ColourTable.from_hex(["#3C1098", "#8429F6", "#6EC1E4"])


def write(path: Path, data: np.ndarray, *, colormap: dict[int, tuple[int, int, int, int]] | None = None) -> Path:
    """A GeoTIFF (or PNG, by suffix) of (H, W) class ids or (3, H, W) colours."""
    bands = data if data.ndim == 3 else data[None]
    driver = "PNG" if path.suffix == ".png" else "GTiff"
    with rasterio.open(
        path, "w", driver=driver, width=bands.shape[2], height=bands.shape[1], count=bands.shape[0], dtype="uint8"
    ) as dst:
        dst.write(bands.astype(np.uint8))
        if colormap is not None:
            dst.write_colormap(1, colormap)
    return path


@pytest.fixture(autouse=True)
def _quiet_georef() -> Iterator[None]:
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *texts: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in texts:
        assert text in lines[0], lines[0]


# Two pairs on which the pooled mIoU and the mean of per-image mIoUs differ (rows: ground truth, columns: prediction):
#   pair 1, 2x2 px, all class 0 and predicted 0: confusion [[4, 0], [0, 0]]; only class 0 counts: mIoU 1.
#   pair 2, 1x2 px, truth [0, 1], prediction [1, 1]: confusion [[0, 1], [0, 1]]; IoU_0 = 0/1, IoU_1 = 1/2: mIoU 0.25.
#   pooled [[4, 1], [0, 1]]: IoU_0 = 4/5, IoU_1 = 1/2: mIoU 0.65; mean of per-image mIoUs (1 + 0.25) / 2 = 0.625.
GT1, PRED1 = np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8)
GT2, PRED2 = np.array([[0, 1]], np.uint8), np.array([[1, 1]], np.uint8)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """preds/ (as segpipe run leaves it, plus a .mask name) and truths/ holding the two pairs above."""
    preds, truths = tmp_path / "preds", tmp_path / "truths"
    preds.mkdir()
    truths.mkdir()
    write(preds / "one.mask.tif", PRED1)
    write(preds / "two.tif", PRED2)
    (preds / "two.summary.json").write_text("{}")
    write(preds / ".two.tif.partial.tif", PRED2)  # a hidden temporary file is passed over
    write(truths / "one.png", GT1)
    write(truths / "two.tif", GT2)
    return preds, truths


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("x.tif", "x"),
        ("x.mask.tif", "x"),
        ("x.MASK.TIFF", "x"),
        ("x.png", "x"),
        ("image_part_001.png", "image_part_001"),
        ("x.y.tif", "x.y"),
        ("X.tif", "X"),
        ("x.mask.mask.tif", "x.mask"),
        (".mask.tif", None),
        ("x.summary.json", None),
        (".x.tif", None),
        ("x", None),
        (".tif", None),
    ],
)
def test_pair_key(name: str, key: str | None) -> None:
    assert pair_key(name) == key


def test_folders_pair_by_name(folders: tuple[Path, Path]) -> None:
    preds, truths = folders
    pairs = pair_folders(preds, truths)
    assert pairs == (
        Pair(str(preds / "one.mask.tif"), str(truths / "one.png")),
        Pair(str(preds / "two.tif"), str(truths / "two.tif")),
    )
    assert find_pairs(preds, truths) == (pairs, True)


def test_unmatched_files_are_one_error_unless_allowed(
    folders: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    preds, truths = folders
    write(preds / "three.tif", PRED1)
    write(truths / "four.png", GT1)
    write(truths / "five.png", GT1)
    with pytest.raises(InputError) as info:
        pair_folders(preds, truths)
    message = str(info.value)
    assert "\n" not in message
    assert f"1 prediction(s) in {preds} without ground truth: three.tif" in message
    assert f"2 ground truth(s) in {truths} without prediction: five.png, four.png" in message
    assert "--allow-missing to score only the 2 complete pair(s)" in message
    with caplog.at_level(logging.WARNING):
        pairs = pair_folders(preds, truths, allow_missing=True)
    assert [Path(p.prediction).name for p in pairs] == ["one.mask.tif", "two.tif"]
    assert "three.tif" in caplog.text and "four.png" in caplog.text
    # no common name at all is an error even with allow_missing
    other = preds.parent / "other"
    other.mkdir()
    write(other / "zzz.tif", GT1)
    with pytest.raises(InputError, match="no pair to evaluate"):
        pair_folders(preds, other, allow_missing=True)


def test_folder_errors(folders: tuple[Path, Path], tmp_path: Path) -> None:
    preds, truths = folders
    write(preds / "one.tif", PRED1)  # one.tif and one.mask.tif both pair as "one"
    with pytest.raises(InputError, match=r"one.mask.tif and one.tif both pair as 'one'"):
        pair_folders(preds, truths)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no raster"):
        pair_folders(empty, truths)
    with pytest.raises(ConfigError, match=r"is a folder but .* is not"):
        find_pairs(truths, truths / "one.png")
    with pytest.raises(ConfigError, match="does not exist"):
        find_pairs(truths, tmp_path / "nothing")
    with pytest.raises(ConfigError, match="give the ground-truth folder too"):
        find_pairs(truths)


def test_list_file(folders: tuple[Path, Path], tmp_path: Path) -> None:
    preds, truths = folders
    spaced = tmp_path / "with space"
    spaced.mkdir()
    write(spaced / "p 3.tif", PRED1)
    listing = tmp_path / "pairs.txt"
    listing.write_text(
        "# prediction  ground truth\n"
        "\n"
        "preds/one.mask.tif truths/one.png   # relative to this file\n"
        f"{preds / 'two.tif'}\t{truths / 'two.tif'}\n"
        '"with space/p 3.tif" truths/one.png\n'
        "/vsicurl/https://example.com/p.tif s3://bucket/g.tif\n"
    )
    pairs, dataset = find_pairs(listing, "-")
    assert dataset and find_pairs(listing) == (pairs, True)
    assert pairs == (
        Pair(str(tmp_path / "preds/one.mask.tif"), str(tmp_path / "truths/one.png")),
        Pair(str(preds / "two.tif"), str(truths / "two.tif")),
        Pair(str(spaced / "p 3.tif"), str(tmp_path / "truths/one.png")),
        Pair("/vsicurl/https://example.com/p.tif", "s3://bucket/g.tif"),
    )


def test_list_file_errors(folders: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    listing = tmp_path / "pairs.txt"
    listing.write_text("preds/one.mask.tif truths/one.png\npreds/gone.tif truths/two.tif\n")
    with pytest.raises(InputError, match=r"1 listed file\(s\) in .* do not exist: .*gone.tif \(line 2\)"):
        read_pair_list(listing)
    with caplog.at_level(logging.WARNING):
        assert len(read_pair_list(listing, allow_missing=True)) == 1
    assert "gone.tif" in caplog.text
    listing.write_text("# nothing\n\npreds/one.mask.tif truths/one.png extra\n")
    with pytest.raises(ConfigError, match=r"line 3: expected 'PRED GT'.*got 3 field"):
        read_pair_list(listing)
    listing.write_text('"preds/one.mask.tif truths/one.png\n')
    with pytest.raises(ConfigError, match="line 1: No closing quotation"):
        read_pair_list(listing)
    listing.write_text("# only comments\n")
    with pytest.raises(ConfigError, match="lists no pair"):
        read_pair_list(listing)
    with pytest.raises(ConfigError, match="is a raster, not a list file"):
        find_pairs(folders[0] / "two.tif")
    binary = tmp_path / "pairs.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match="not a text list of pairs"):
        read_pair_list(binary)
    with pytest.raises(InputError, match=r"list file .* does not exist"):
        read_pair_list(tmp_path / "missing.txt")


def test_pooled_is_the_sum_and_differs_from_the_mean_of_images(folders: tuple[Path, Path]) -> None:
    report = evaluate_pairs(pair_folders(*folders), class_names=("a", "b"))
    one, two = report.images
    np.testing.assert_array_equal(one.confusion, [[4, 0], [0, 0]])
    np.testing.assert_array_equal(two.confusion, [[0, 1], [0, 1]])
    np.testing.assert_array_equal(report.pooled.confusion, one.confusion + two.confusion)
    assert (one.miou, two.miou) == (pytest.approx(1.0), pytest.approx(0.25))
    assert report.pooled.miou == pytest.approx((4 / 5 + 1 / 2) / 2)  # 0.65
    assert report.mean_image_miou == pytest.approx((1.0 + 0.25) / 2)  # 0.625
    assert report.pooled.overall_accuracy == pytest.approx(5 / 6)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["pairs"] == 2 and "summed over all pairs" in data["pooling"]
    assert data["pooled"]["confusion"] == [[4, 1], [0, 1]]
    assert data["pooled"]["miou"] == pytest.approx(0.65) and data["mean_image_miou"] == pytest.approx(0.625)
    row = data["images"][1]
    assert row["iou"] == {"a": 0.0, "b": 0.5} and row["scored_pixels"] == 2
    assert row["overall_accuracy"] == 0.5 and row["confusion"] == [[0, 1], [0, 1]]
    assert data["images"][0]["iou"] == {"a": 1.0, "b": None}  # class b is in neither mask of pair 1
    text = report.to_markdown()
    assert "not the mean of per-image IoUs" in text
    assert "Mean of per-image mIoU: 0.6250" in text and "pooled mIoU 0.6500" in text
    assert "| a | 4 | 1 |" in text  # the pooled confusion matrix


def test_pooled_equals_one_raster_of_all_pairs(tmp_path: Path) -> None:
    """Random pairs of different sizes, classes inferred per pair (padded to the largest): the pooled matrix is the
    matrix of all pixels together, and every pair is read block by block."""
    rng = np.random.default_rng(7)
    pairs, truths, preds = [], [], []
    for i, (h, w, k) in enumerate([(5, 7, 3), (9, 4, 5), (3, 3, 2)]):
        gt, pred = rng.integers(0, k, (h, w), dtype=np.uint8), rng.integers(0, k, (h, w), dtype=np.uint8)
        pairs.append((write(tmp_path / f"p{i}.tif", pred), write(tmp_path / f"g{i}.tif", gt)))
        truths.append(gt.ravel())
        preds.append(pred.ravel())
    report = evaluate_pairs(pairs, block_size=2)
    assert [r.num_classes for r in report.images] == [5, 5, 5]
    whole = confusion_matrix(np.concatenate(truths), np.concatenate(preds), 5)
    np.testing.assert_array_equal(report.pooled.confusion, whole)
    np.testing.assert_array_equal(sum(r.confusion for r in report.images), whole)
    assert report.images[2].miou == pytest.approx(evaluate(*pairs[2]).miou)  # padding changes no metric
    with pytest.raises(ConfigError, match="at least one"):
        DatasetEvaluation.from_results([])


def bordered(classes: np.ndarray, table: ColourTable) -> np.ndarray:
    """(3, H+2, W+2) colours of ``classes`` with a 1 px black border (a colour not in the table)."""
    rgb = np.zeros((3, classes.shape[0] + 2, classes.shape[1] + 2), np.uint8)
    rgb[:, 1:-1, 1:-1] = np.array(table.colours, np.uint8)[classes].transpose(2, 0, 1)
    return rgb


def test_unknown_ignore_leaves_a_black_border_out(tmp_path: Path) -> None:
    truth = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    pred = np.zeros((4, 5), np.uint8)
    pred[1:-1, 1:-1] = np.array([[0, 1, 1], [2, 2, 0]], np.uint8)
    p = write(tmp_path / "p.tif", pred)
    g = write(tmp_path / "g.tif", bordered(truth, TABLE))
    with pytest.raises(InputError) as info:
        evaluate(p, g, colour_table=TABLE)
    assert "#000000 (14 px)" in str(info.value) and "pass --unknown ignore" in str(info.value)
    assert "unknown='ignore' to give" not in str(info.value)
    result = evaluate(p, g, colour_table=TABLE, unknown="ignore", block_size=2)
    assert (result.unknown_pixels, result.ignored_pixels, result.scored_pixels) == (14, 0, 6)
    np.testing.assert_array_equal(result.confusion, confusion_matrix(truth, pred[1:-1, 1:-1], 3))
    assert "14 pixels of ground-truth colours not in the colour table" in result.to_markdown()
    # the same with a paletted ground truth whose palette holds black
    palette = {0: (0, 0, 0, 255), **{i + 1: (*c, 255) for i, c in enumerate(TABLE.colours)}}
    index = np.zeros((4, 5), np.uint8)
    index[1:-1, 1:-1] = truth + 1
    paletted = write(tmp_path / "pal.tif", index, colormap=palette)
    with pytest.raises(
        InputError, match=r"block of 3x3 px at column 0, row 0\): .* #000000 \(5 px\).*--unknown ignore"
    ):
        evaluate(p, paletted, colour_table=TABLE, block_size=3)
    result = evaluate(p, paletted, colour_table=TABLE, unknown="ignore", block_size=3)
    assert (result.unknown_pixels, result.scored_pixels) == (14, 6)
    np.testing.assert_array_equal(result.confusion, confusion_matrix(truth, pred[1:-1, 1:-1], 3))


def test_cli_unknown_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = np.array([[0, 1], [2, 1]], np.uint8)
    write(tmp_path / "p.tif", np.pad(truth, 1))
    write(tmp_path / "g.png", bordered(truth, TABLE))
    colours = ",".join(TABLE.hex_colours)
    code, _, err = run_cli(capsys, str(tmp_path / "p.tif"), str(tmp_path / "g.png"), "--colours", colours)
    assert_one_line_error(code, err, "#000000 (12 px)", "pass --unknown ignore")
    args = (str(tmp_path / "p.tif"), str(tmp_path / "g.png"), "--colours", colours, "--unknown", "ignore", "--json")
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    data = json.loads(out)
    assert data["overall_accuracy"] == 1.0 and data["unknown_pixels"] == 12 and data["scored_pixels"] == 4


def dubai_class_ids(table: ColourTable) -> np.ndarray:
    """The class ids of tests/data/dubai's paletted mask, mapped colour by colour (independently of evaluate)."""
    with rasterio.open(DUBAI) as src:
        index, palette = src.read(1), src.colormap(1)
    lut = np.full(256, 255, np.uint8)
    for value, rgba in palette.items():
        if tuple(rgba[:3]) in table.colours:
            lut[value] = table.colours.index(tuple(rgba[:3]))
    ids = lut[index]
    assert (ids != 255).all()
    return ids


def test_model_colours_decode_the_real_dubai_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names, table = model_classes("default")
    assert names == ("building", "land", "road", "vegetation", "water", "unlabeled")
    assert table.hex_colours[0] == "#3C1098"
    ids = dubai_class_ids(table)
    preds, truths = tmp_path / "preds", tmp_path / "truths"
    preds.mkdir()
    truths.mkdir()
    write(preds / "image_part_005.tif", ids)  # a perfect prediction
    wrong = ids.copy()
    wrong[:, :255] = 1  # left half "land"
    write(preds / "copy.mask.tif", wrong)
    shutil.copy(DUBAI, truths / "image_part_005.png")
    shutil.copy(DUBAI, truths / "copy.png")
    code, out, err = run_cli(capsys, str(preds), str(truths), "--model", "default", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [Path(r["prediction"]).name for r in data["images"]] == ["copy.mask.tif", "image_part_005.tif"]
    perfect = data["images"][1]
    assert perfect["miou"] == 1.0 and perfect["scored_pixels"] == 510 * 544
    support = {c["name"]: c["support"] for c in data["pooled"]["classes"]}
    # tests/data/dubai/README.md: pixels per class, twice (two pairs)
    assert support == {
        "building": 2 * 24943,
        "land": 2 * 89738,
        "road": 2 * 33972,
        "vegetation": 2 * 46346,
        "water": 2 * 82441,
        "unlabeled": 0,
    }
    expected = confusion_matrix(np.concatenate([ids, ids]), np.concatenate([wrong, ids]), 6)
    assert data["pooled"]["confusion"] == expected.tolist()
    # an unknown model, and the report as text
    code, out, err = run_cli(capsys, str(preds), str(truths), "--model", "nonexistent-model")
    assert_one_line_error(code, err, "no packaged model named 'nonexistent-model'")
    code, out, err = run_cli(capsys, str(preds), str(truths), "--model", "default")
    assert code == 0, err
    assert "| IoU building |" in out and "Pooled over 2 pairs" in out and "| building |" in out


def test_model_path_gives_its_classes(make_checkpoint: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = make_checkpoint("evalcolours", bands=("red", "green", "blue"), mean=(0.0,) * 3, std=(1.0,) * 3)
    names, table = model_classes(checkpoint)
    assert names == ("class0", "class1", "class2")
    assert table.hex_colours == ("#E6194B", "#3CB44B", "#FFE119")
    truth = np.array([[0, 1, 2, 2]], np.uint8)
    write(tmp_path / "p.tif", np.array([[0, 1, 2, 1]], np.uint8))
    write(tmp_path / "g.tif", np.array(table.colours, np.uint8)[truth].transpose(2, 0, 1))
    code, out, err = run_cli(capsys, str(tmp_path / "p.tif"), str(tmp_path / "g.tif"), "--model", str(checkpoint))
    assert code == 0, err
    assert "| 2 | class2 |" in out and "overall accuracy 0.7500" in out


def test_cli_list_file_json(folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "pairs.txt"
    listing.write_text("# two pairs\npreds/one.mask.tif truths/one.png\npreds/two.tif truths/two.tif\n")
    code, out, err = run_cli(capsys, str(listing), "--classes", "a,b", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["pooled"]["confusion"] == [[4, 1], [0, 1]]
    assert [r["miou"] for r in data["images"]] == [1.0, 0.25]
    code, out2, err = run_cli(capsys, str(listing), "-", "--classes", "a,b", "--json")
    assert code == 0 and json.loads(out2) == data
    # a single pair of rasters keeps its report as before
    code, out, err = run_cli(capsys, str(folders[0] / "two.tif"), str(folders[1] / "two.tif"), "--json")
    assert code == 0 and json.loads(out)["confusion"] == [[0, 1], [0, 1]]


@pytest.mark.parametrize(
    ("args", "texts"),
    [
        (["{preds}", "{truths}/extra"], ["without ground truth: two.tif", "--allow-missing"]),
        (["{preds}", "{truths}", "--model", "default", "--colours", "#000000"], ["pass --model or --classes"]),
        (["{preds}"], ["give the ground-truth folder too"]),
        (["{list}"], ["line 1: expected 'PRED GT'"]),
        (["{preds}/two.tif"], ["is a raster, not a list file"]),
        (["{preds}", "{truths}", "--unknown", "maybe"], ["argument --unknown: invalid choice"]),
        (["{preds}", "{truths}", "--classes", "a"], ["not class ids 0..0"]),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], texts: list[str]
) -> None:
    preds, truths = folders
    extra = truths / "extra"
    extra.mkdir()
    write(extra / "one.png", GT1)
    (tmp_path / "bad.txt").write_text("only-one-path\n")
    filled = [a.format(preds=preds, truths=truths, list=tmp_path / "bad.txt") for a in args]
    try:
        code, _, err = run_cli(capsys, *filled)
    except SystemExit as exit_:  # argparse's own errors
        code, err = int(exit_.code or 0), capsys.readouterr().err
    assert_one_line_error(code, err, *texts)


def test_command_line_end_to_end(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """The installed command: JSON on stdout with exit 0, and exit 2 with one line on stderr."""
    preds, truths = folders
    write(truths / "lonely.png", GT1)
    command = [sys.executable, "-m", "segpipe.cli", "evaluate", str(preds), str(truths)]
    bad = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        f"error: 1 ground truth(s) in {truths} without prediction: lonely.png (files pair by name without suffix "
        "and without a trailing .mask); pass --allow-missing to score only the 2 complete pair(s)"
    ]
    good = subprocess.run([*command, "--allow-missing", "--json"], env=ENV, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["pooled"]["confusion"] == [[4, 1], [0, 1]]
    assert "warning: scoring the 2 complete pair(s) only" in good.stderr and "lonely.png" in good.stderr
