"""Evaluate stage: compare a predicted mask with a ground-truth mask, block by block.

Both rasters are read in windows of ``block_size`` x ``block_size`` pixels, so memory stays at a few blocks
whatever the size of the scene. Only the confusion matrix (classes x classes counts) is kept.

Which pixels are scored:

- a pixel whose ground truth is in ``ignore`` (class ids, e.g. "unlabeled" or 255) is skipped;
- a pixel equal to the ground truth's nodata value is skipped;
- a pixel equal to the prediction's nodata value (e.g. 255 outside the scene's footprint) is skipped and
  counted apart (``EvaluationResult.nodata_pixels``): the prediction made no claim there;
- every other pixel is scored. A predicted class in ``ignore`` on a scored pixel is a miss (a model cannot
  raise its score by predicting an ignored class).

The metrics themselves (IoU, F1, precision, recall, mIoU) are :mod:`segpipe.core.metrics`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from segpipe.core.colours import ColourTable
from segpipe.core.errors import ConfigError, InputError
from segpipe.core.metrics import EvaluationResult, confusion_matrix
from segpipe.core.raster import open_raster

log = logging.getLogger(__name__)

#: Largest number of classes inferred from the data when ``num_classes`` is not given.
MAX_INFERRED_CLASSES = 1024


def _blocks(width: int, height: int, size: int) -> Iterator[Window]:
    for row in range(0, height, size):
        for col in range(0, width, size):
            yield Window(col, row, min(size, width - col), min(size, height - row))


def evaluate(
    pred_path: str | Path,
    gt_path: str | Path,
    *,
    ignore: Sequence[int] = (),
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    block_size: int = 1024,
    colour_table: ColourTable | None = None,
) -> EvaluationResult:
    """Compare a predicted class-id raster with a ground-truth raster, block by block.

    Args:
        pred_path: Predicted mask: one integer band of class ids; its nodata value (if set) marks pixels
            without a prediction, which are skipped and counted in ``nodata_pixels``.
        gt_path: Ground truth: one integer band of class ids, or an RGB(A) / paletted colour-coded mask when
            ``colour_table`` is given. Its nodata value (if set) is skipped like an ignored class.
        ignore: Ground-truth values to skip (class ids such as "unlabeled", or 255); ignored classes are left
            out of the mIoU.
        num_classes: Number of classes K. Default: ``len(class_names)``, else ``len(colour_table)``, else
            1 + the largest scored value in either raster.
        class_names: Names of the K classes, for reports.
        block_size: Side of the square read windows, in pixels.
        colour_table: Maps ground-truth colours to class ids (a colour outside it is an InputError).

    Raises:
        InputError: the rasters differ in width or height, are not integer class rasters, or hold a class id
            outside 0..K-1 on a scored pixel.
    """
    if block_size < 1:
        raise ConfigError(f"expected block_size >= 1, got {block_size}")
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if num_classes is None and colour_table is not None:
        num_classes = len(colour_table)
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise ConfigError(f"expected {num_classes} class names, got {len(class_names)}")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"expected num_classes >= 1, got {num_classes}")
    ignore_values = np.array(sorted({int(i) for i in ignore}), dtype=np.int64)

    with contextlib.ExitStack() as stack:
        pred = stack.enter_context(open_raster(str(pred_path), role="prediction", hint="give a class-id raster"))
        gt = stack.enter_context(open_raster(str(gt_path), role="ground truth", hint="give a class-id raster"))
        if (pred.width, pred.height) != (gt.width, gt.height):
            raise InputError(
                f"prediction {pred_path} is {pred.width}x{pred.height} px but ground truth {gt_path} is "
                f"{gt.width}x{gt.height} px (width x height); compare masks of the same grid"
            )
        if pred.count != 1 or not np.issubdtype(np.dtype(pred.dtypes[0]), np.integer):
            raise InputError(
                f"prediction {pred_path}: expected one integer band of class ids, got "
                f"{pred.count} band(s) of {pred.dtypes[0]}"
            )
        colour_mode = gt.count >= 3 or (
            gt.count == 1 and gt.colorinterp[0] == ColorInterp.palette and colour_table is not None
        )
        if colour_mode and colour_table is None:
            raise ConfigError(
                f"ground truth {gt_path} has {gt.count} bands (colour-coded); pass a "
                f"colour table to map its colours to class ids"
            )
        if not colour_mode and (gt.count != 1 or not np.issubdtype(np.dtype(gt.dtypes[0]), np.integer)):
            raise InputError(
                f"ground truth {gt_path}: expected one integer band of class ids, got "
                f"{gt.count} band(s) of {gt.dtypes[0]}"
            )
        palette_lut = _palette_lut(gt, colour_table) if colour_mode and gt.count == 1 else None
        pred_nodata, gt_nodata = pred.nodata, None if colour_mode else gt.nodata
        k = num_classes if num_classes is not None else 1
        confusion = np.zeros((k, k), dtype=np.int64)
        ignored_pixels = nodata_pixels = 0
        for window in _blocks(pred.width, pred.height, block_size):
            p = pred.read(1, window=window).astype(np.int64)
            if colour_mode and palette_lut is None:
                assert colour_table is not None
                t = colour_table.to_class_ids(
                    gt.read([1, 2, 3], window=window), source=str(gt_path), ignore_index=255
                ).astype(np.int64)
            elif palette_lut is not None:
                t = palette_lut[gt.read(1, window=window)].astype(np.int64)
            else:
                t = gt.read(1, window=window).astype(np.int64)
            skip_gt = np.isin(t, ignore_values)
            if gt_nodata is not None:
                skip_gt |= t == gt_nodata
            no_pred = ~skip_gt & (p == pred_nodata) if pred_nodata is not None else np.zeros_like(skip_gt)
            valid = ~skip_gt & ~no_pred
            ignored_pixels += int(skip_gt.sum())
            nodata_pixels += int(no_pred.sum())
            tv, pv = t[valid], p[valid]
            if tv.size == 0:
                continue
            low = min(int(tv.min()), int(pv.min()))
            high = max(int(tv.max()), int(pv.max()))
            if low < 0 or (num_classes is not None and high >= num_classes):
                _raise_bad_value(tv, pv, num_classes, pred_path, gt_path)
            if high >= k:
                if high >= MAX_INFERRED_CLASSES:
                    raise InputError(
                        f"class id {high} in {pred_path} or {gt_path}; pass num_classes "
                        f"(and ignore / nodata for fill values)"
                    )
                grown = np.zeros((high + 1, high + 1), dtype=np.int64)
                grown[:k, :k] = confusion
                confusion, k = grown, high + 1
            confusion += confusion_matrix(tv, pv, k)
    names = tuple(class_names) if class_names is not None else tuple(f"class_{i}" for i in range(k))
    result = EvaluationResult(
        confusion,
        names,
        tuple(int(i) for i in ignore_values),
        ignored_pixels,
        nodata_pixels,
        {"prediction": str(pred_path), "ground_truth": str(gt_path)},
    )
    if nodata_pixels:
        log.info(
            "%s: %d pixels where the prediction is nodata (%s) were not scored",
            pred_path,
            nodata_pixels,
            pred_nodata,
        )
    log.info(
        "evaluated %s against %s: mIoU %.4f, %d pixels scored, %d ignored, %d nodata",
        pred_path,
        gt_path,
        result.miou,
        result.scored_pixels,
        ignored_pixels,
        nodata_pixels,
    )
    return result


def _palette_lut(src: rasterio.DatasetReader, table: ColourTable | None) -> np.ndarray:
    """256-entry palette index -> class id lookup (255 for entries whose colour is not in the table).

    Entries not in the table only matter if a pixel uses them: those pixels are scored with value 255, which
    is reported as an out-of-range class id unless 255 is in ``ignore``.
    """
    assert table is not None
    codes = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(table.colours)}
    lut = np.full(256, 255, dtype=np.uint8)
    for index, rgba in src.colormap(1).items():
        if 0 <= index < 256:
            r, g, b = rgba[:3]
            lut[index] = codes.get((r << 16) | (g << 8) | b, 255)
    return lut


def _raise_bad_value(
    truth: np.ndarray, pred: np.ndarray, num_classes: int | None, pred_path: str | Path, gt_path: str | Path
) -> None:
    limit = num_classes if num_classes is not None else MAX_INFERRED_CLASSES
    for values, role, path in ((pred, "prediction", pred_path), (truth, "ground truth", gt_path)):
        bad = values[(values < 0) | (values >= limit)]
        if bad.size:
            odd = np.unique(bad)[:5].tolist()
            hint = (
                "set the prediction's nodata value, e.g. to 255" if role == "prediction" else "add the value to ignore"
            )
            raise InputError(f"{role} {path}: value(s) {odd} are not class ids 0..{limit - 1}; {hint}")
