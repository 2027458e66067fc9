"""Tests for segpipe.pipeline.evaluate: block-wise confusion matrix and metrics on small rasters written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe.core.colours import ColourTable
from segpipe.core.errors import ConfigError, InputError
from segpipe.core.metrics import EvaluationResult, confusion_matrix
from segpipe.models.dubai import DUBAI_CLASSES
from segpipe.pipeline.evaluate import evaluate

# 4 rows x 5 columns, classes 0..2.
GT = np.array(
    [
        [0, 0, 1, 1, 2],
        [0, 0, 1, 1, 2],
        [0, 2, 2, 1, 2],
        [1, 1, 2, 2, 2],
    ],
    dtype=np.uint8,
)
PRED = np.array(
    [
        [0, 1, 1, 1, 2],
        [0, 0, 1, 2, 2],
        [2, 2, 2, 1, 2],
        [1, 0, 2, 2, 1],
    ],
    dtype=np.uint8,
)
# Hand count (rows: ground truth, columns: prediction):
#   GT 0 (5 px): pred 0 at (0,0) (1,0) (1,1); pred 1 at (0,1); pred 2 at (2,0)         -> [3, 1, 1]
#   GT 1 (7 px): pred 1 at (0,2) (0,3) (1,2) (2,3) (3,0); pred 2 at (1,3); pred 0 (3,1) -> [1, 5, 1]
#   GT 2 (8 px): pred 2 at (0,4) (1,4) (2,1) (2,2) (2,4) (3,2) (3,3); pred 1 at (3,4)   -> [0, 1, 7]
EXPECTED = np.array([[3, 1, 1], [1, 5, 1], [0, 1, 7]])


def write(
    path: Path,
    data: np.ndarray,
    *,
    nodata: float | None = None,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
) -> Path:
    bands = data if data.ndim == 3 else data[None]
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=bands.shape[2],
        height=bands.shape[1],
        count=bands.shape[0],
        dtype=bands.dtype,
        nodata=nodata,
    ) as dst:
        dst.write(bands)
        if colormap is not None:
            dst.write_colormap(1, colormap)
    return path


@pytest.fixture(autouse=True)
def _quiet_georef() -> None:
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    warnings.simplefilter("ignore", NotGeoreferencedWarning)


@pytest.mark.parametrize("block_size", [1, 2, 3, 1024])
def test_confusion_matches_hand_count(tmp_path: Path, block_size: int) -> None:
    result = evaluate(write(tmp_path / "p.tif", PRED), write(tmp_path / "g.tif", GT), block_size=block_size)
    np.testing.assert_array_equal(result.confusion, EXPECTED)
    # IoU_c = TP / (row + col - TP):
    #   class 0: 3 / (5 + 4 - 3), class 1: 5 / (7 + 7 - 5), class 2: 7 / (8 + 9 - 7)
    np.testing.assert_allclose(result.iou, [3 / 6, 5 / 9, 7 / 10])
    np.testing.assert_allclose(result.precision, [3 / 4, 5 / 7, 7 / 9])
    np.testing.assert_allclose(result.recall, [3 / 5, 5 / 7, 7 / 8])
    np.testing.assert_allclose(result.f1, [6 / 9, 10 / 14, 14 / 17])
    assert result.overall_accuracy == pytest.approx(15 / 20)
    assert result.miou == pytest.approx((3 / 6 + 5 / 9 + 7 / 10) / 3)
    assert result.scored_pixels == 20
    assert result.ignored_pixels == 0 and result.nodata_pixels == 0


def test_ignore_skips_ground_truth_and_leaves_class_out_of_miou(tmp_path: Path) -> None:
    gt = GT.copy()
    gt[0, 0] = 255  # a "no label" value
    result = evaluate(
        write(tmp_path / "p.tif", PRED),
        write(tmp_path / "g.tif", gt),
        ignore=(255, 2),
        num_classes=3,
        class_names=("a", "b", "c"),
    )
    # rows of class 2 and the 255 pixel are skipped; predictions of class 2 on class 0/1 pixels still count.
    np.testing.assert_array_equal(result.confusion, [[2, 1, 1], [1, 5, 1], [0, 0, 0]])
    assert result.ignored_pixels == 1 + 8
    assert result.counted_classes.tolist() == [0, 1]
    assert result.miou == pytest.approx((2 / (4 + 3 - 2) + 5 / (7 + 6 - 5)) / 2)
    assert set(result.per_class_iou()) == {"a", "b"}


def test_prediction_nodata_is_not_scored(tmp_path: Path) -> None:
    pred = PRED.copy()
    pred[3, :] = 255
    result = evaluate(write(tmp_path / "p.tif", pred, nodata=255), write(tmp_path / "g.tif", GT))
    assert result.nodata_pixels == 5
    assert result.scored_pixels == 15
    np.testing.assert_array_equal(result.confusion, [[3, 1, 1], [0, 4, 1], [0, 0, 5]])
    assert "5 pixels where the prediction is nodata" in result.to_markdown()


def test_unflagged_fill_value_is_an_error_with_known_classes(tmp_path: Path) -> None:
    pred = PRED.copy()
    pred[0, 0] = 255
    with pytest.raises(InputError, match=r"255.*nodata"):
        evaluate(write(tmp_path / "p.tif", pred), write(tmp_path / "g.tif", GT), num_classes=3)


def test_size_mismatch(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"5x4 px.*4x4 px") as info:
        evaluate(write(tmp_path / "p.tif", PRED), write(tmp_path / "g.tif", GT[:, :4]))
    assert isinstance(info.value, ValueError)


def test_classes_absent_everywhere_are_not_in_miou(tmp_path: Path) -> None:
    result = evaluate(write(tmp_path / "p.tif", PRED), write(tmp_path / "g.tif", GT), num_classes=5)
    assert result.counted_classes.tolist() == [0, 1, 2]
    assert math.isnan(result.iou[4])
    assert result.miou == pytest.approx((3 / 6 + 5 / 9 + 7 / 10) / 3)


def test_colour_coded_ground_truth(tmp_path: Path) -> None:
    table = ColourTable.from_hex(c for _, c in DUBAI_CLASSES)
    rgb = np.array(table.colours, dtype=np.uint8)[GT].transpose(2, 0, 1)
    result = evaluate(write(tmp_path / "p.tif", PRED), write(tmp_path / "g.tif", rgb), colour_table=table)
    assert result.num_classes == 6
    np.testing.assert_array_equal(result.confusion[:3, :3], EXPECTED)
    # a paletted ground truth whose palette order is not the class order
    palette = {0: (*table.colours[2], 255), 1: (*table.colours[0], 255), 2: (*table.colours[1], 255)}
    index = np.array([1, 2, 0], dtype=np.uint8)[GT]  # class 0 -> palette 1, 1 -> 2, 2 -> 0
    paletted = write(tmp_path / "pal.tif", index, colormap=palette)
    result = evaluate(tmp_path / "p.tif", paletted, colour_table=table, block_size=3)
    np.testing.assert_array_equal(result.confusion[:3, :3], EXPECTED)
    # an RGB ground truth needs a colour table
    with pytest.raises(ConfigError, match="colour table"):
        evaluate(tmp_path / "p.tif", tmp_path / "g.tif")


def test_unknown_colour_in_ground_truth(tmp_path: Path) -> None:
    table = ColourTable.from_hex(c for _, c in DUBAI_CLASSES)
    rgb = np.array(table.colours, dtype=np.uint8)[GT].transpose(2, 0, 1).copy()
    rgb[:, 1, 1] = 0
    with pytest.raises(InputError, match="#000000"):
        evaluate(write(tmp_path / "p.tif", PRED), write(tmp_path / "g.tif", rgb), colour_table=table)


def test_reports_are_json_and_markdown(tmp_path: Path) -> None:
    result = evaluate(
        write(tmp_path / "p.tif", PRED),
        write(tmp_path / "g.tif", GT),
        num_classes=4,
        class_names=("building", "land", "road", "water"),
    )
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["miou"] == pytest.approx(result.miou)
    assert data["confusion"][0] == [3, 1, 1, 0]
    assert data["classes"][3]["iou"] is None and data["classes"][3]["in_miou"] is False
    table = result.to_markdown()
    assert table.splitlines()[0].startswith("| id | class | IoU")
    assert "| 1 | land | 0.5556 |" in table
    assert "water (not in mIoU)" in table


def test_not_class_rasters(tmp_path: Path) -> None:
    floats = write(tmp_path / "f.tif", PRED.astype(np.float32))
    with pytest.raises(InputError, match="integer band"):
        evaluate(floats, write(tmp_path / "g.tif", GT))
    with pytest.raises(InputError, match="does not exist"):
        evaluate(tmp_path / "missing.tif", tmp_path / "g.tif")


def test_from_confusion_and_empty() -> None:
    empty = EvaluationResult.from_confusion(np.zeros((2, 2), dtype=np.int64))
    assert math.isnan(empty.miou) and math.isnan(empty.overall_accuracy)
    assert json.dumps(empty.to_dict(), allow_nan=False)


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    block=st.integers(1, 7),
)
def test_blockwise_equals_whole(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, height: int, width: int, block: int
) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    gt = rng.integers(0, 4, (height, width), dtype=np.uint8)
    pred = rng.integers(0, 4, (height, width), dtype=np.uint8)
    folder = tmp_path_factory.mktemp("hyp")
    result = evaluate(write(folder / "p.tif", pred), write(folder / "g.tif", gt), num_classes=4, block_size=block)
    np.testing.assert_array_equal(result.confusion, confusion_matrix(gt, pred, 4))
