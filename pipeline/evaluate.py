"""Evaluate stage: compare a predicted mask with a ground-truth mask, block by block; or a data set of pairs.

Both rasters are read in windows of ``block_size`` x ``block_size`` pixels, so memory stays at a few blocks
whatever the size of the scene. Only the confusion matrix (classes x classes counts) is kept. A data set
(:func:`evaluate_pairs`; pairs from folders or a list file, :mod:`segpipe.pipeline.pairs`) is evaluated one pair
after the other, keeping one confusion matrix per pair; its pooled metrics come from their sum
(:class:`~segpipe.core.metrics.DatasetEvaluation`).

Which pixels are scored:

- a pixel whose ground truth is in ``ignore`` (class ids, e.g. "unlabeled" or 255) is skipped;
- a pixel equal to the ground truth's nodata value is skipped;
- a pixel of a colour-coded ground truth whose colour is not in the colour table is an error, or with
  ``unknown="ignore"`` (``--unknown ignore``) skipped and counted apart (``EvaluationResult.unknown_pixels``);
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

from segpipe.core.colours import ColourTable, Unknown
from segpipe.core.errors import ConfigError, InputError
from segpipe.core.metrics import DatasetEvaluation, EvaluationResult, confusion_matrix
from segpipe.core.raster import open_raster
from segpipe.pipeline.pairs import Pair

log = logging.getLogger(__name__)

#: Largest number of classes inferred from the data when ``num_classes`` is not given.
MAX_INFERRED_CLASSES = 1024
#: Class id given to ground-truth colours outside the colour table (a table has at most 255 classes, 0..254).
_UNKNOWN = 255
#: The advice in errors about unknown ground-truth colours.
_UNKNOWN_FIX = "pass --unknown ignore (unknown='ignore') to leave such pixels out"


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
    unknown: Unknown = "error",
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
        colour_table: Maps ground-truth colours to class ids.
        unknown: A colour-coded ground truth's colour outside ``colour_table``: "error" (an InputError), or
            "ignore": such pixels are skipped and counted in ``unknown_pixels``.

    Raises:
        InputError: the rasters differ in width or height, are not integer class rasters, hold a class id
            outside 0..K-1 on a scored pixel, or (with ``unknown="error"``) a colour outside the colour table.
    """
    if unknown not in ("error", "ignore"):
        raise ConfigError(f"expected unknown 'error' or 'ignore', got {unknown!r}")
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
                f"ground truth {gt_path} has {gt.count} bands (colour-coded); pass a colour table to map its "
                f"colours to class ids: --model NAME (its classes' colours) or --colours '#RRGGBB,...'"
            )
        if not colour_mode and (gt.count != 1 or not np.issubdtype(np.dtype(gt.dtypes[0]), np.integer)):
            raise InputError(
                f"ground truth {gt_path}: expected one integer band of class ids, got "
                f"{gt.count} band(s) of {gt.dtypes[0]}"
            )
        palette = _palette_lut(gt, colour_table) if colour_mode and gt.count == 1 else None
        pred_nodata, gt_nodata = pred.nodata, None if colour_mode else gt.nodata
        k = num_classes if num_classes is not None else 1
        confusion = np.zeros((k, k), dtype=np.int64)
        ignored_pixels = nodata_pixels = unknown_pixels = 0
        for window in _blocks(pred.width, pred.height, block_size):
            p = pred.read(1, window=window).astype(np.int64)
            size, at = f"{window.width}x{window.height} px", f"column {window.col_off}, row {window.row_off}"
            where = f"{gt_path} (block of {size} at {at})"
            if colour_mode and palette is None:
                assert colour_table is not None
                t = colour_table.to_class_ids(
                    gt.read([1, 2, 3], window=window),
                    source=where,
                    unknown=unknown,
                    ignore_index=_UNKNOWN,
                    fix=_UNKNOWN_FIX,
                ).astype(np.int64)
            elif palette is not None:
                assert colour_table is not None
                index = gt.read(1, window=window)
                t = palette[0][index].astype(np.int64)
                if unknown == "error" and (t == _UNKNOWN).any():
                    bad, counts = np.unique(palette[1][index[t == _UNKNOWN]], return_counts=True)
                    raise colour_table.unknown_colours_error(bad, counts, source=where, fix=_UNKNOWN_FIX)
            else:
                t = gt.read(1, window=window).astype(np.int64)
            unknown_gt = t == _UNKNOWN if colour_mode else np.zeros(t.shape, dtype=bool)
            skip_gt = np.isin(t, ignore_values) & ~unknown_gt
            if gt_nodata is not None:
                skip_gt |= t == gt_nodata
            skip = skip_gt | unknown_gt
            no_pred = ~skip & (p == pred_nodata) if pred_nodata is not None else np.zeros_like(skip)
            valid = ~skip & ~no_pred
            ignored_pixels += int(skip_gt.sum())
            unknown_pixels += int(unknown_gt.sum())
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
                        f"class id {high} in {pred_path} or {gt_path}; name the classes (--classes or --model; "
                        f"num_classes=) and leave fill values out (--ignore, or the prediction's nodata)"
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
        unknown_pixels,
    )
    if nodata_pixels:
        log.info(
            "%s: %d pixels where the prediction is nodata (%s) were not scored",
            pred_path,
            nodata_pixels,
            pred_nodata,
        )
    log.info(
        "evaluated %s against %s: mIoU %.4f, %d pixels scored, %d ignored, %d nodata, %d of unknown colour",
        pred_path,
        gt_path,
        result.miou,
        result.scored_pixels,
        ignored_pixels,
        nodata_pixels,
        unknown_pixels,
    )
    return result


def evaluate_pairs(
    pairs: Sequence[Pair | tuple[str | Path, str | Path]],
    *,
    ignore: Sequence[int] = (),
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    block_size: int = 1024,
    colour_table: ColourTable | None = None,
    unknown: Unknown = "error",
) -> DatasetEvaluation:
    """Evaluate a data set of (prediction, ground truth) pairs one after the other, as :func:`evaluate` each.

    Memory holds one pair's blocks and one confusion matrix per pair. The first pair that fails stops the
    evaluation with its error. Where the number of classes is inferred per pair, the matrices are padded to the
    largest (:meth:`~segpipe.core.metrics.DatasetEvaluation.from_results`).

    Returns:
        The per-pair results and, as ``.pooled``, the result of their summed confusion matrix.
    """
    if not pairs:
        raise ConfigError("expected at least one (prediction, ground truth) pair, got none")
    results = []
    for number, pair in enumerate(pairs, start=1):
        pred_path, gt_path = (pair.prediction, pair.ground_truth) if isinstance(pair, Pair) else pair
        log.info("pair %d of %d: %s against %s", number, len(pairs), pred_path, gt_path)
        results.append(
            evaluate(
                pred_path,
                gt_path,
                ignore=ignore,
                num_classes=num_classes,
                class_names=class_names,
                block_size=block_size,
                colour_table=colour_table,
                unknown=unknown,
            )
        )
    return DatasetEvaluation.from_results(results)


def model_classes(name_or_path: str | Path) -> tuple[tuple[str, ...], ColourTable]:
    """Class names and colour table of a model (``"default"``, a packaged name, a checkpoint path or URL), from its
    metadata sidecar: the weights are not loaded.

    Raises:
        ModelError: the model or its sidecar cannot be found or is invalid.
    """
    from segpipe.models.checkpoint import find_metadata, read_metadata, resolve_model_path

    metadata = read_metadata(find_metadata(resolve_model_path(name_or_path).resolve()))
    names = tuple(c.name for c in metadata.classes)
    return names, ColourTable.from_hex(c.colour for c in metadata.classes)


def _palette_lut(src: rasterio.DatasetReader, table: ColourTable | None) -> tuple[np.ndarray, np.ndarray]:
    """256-entry lookups palette index -> class id (``_UNKNOWN`` where the entry's colour is not in the table), and
    palette index -> its colour as 0xRRGGBB (black for an index without an entry).

    Entries not in the table only matter if a pixel uses them.
    """
    assert table is not None
    codes = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(table.colours)}
    lut = np.full(256, _UNKNOWN, dtype=np.uint8)
    colours = np.zeros(256, dtype=np.int64)
    for index, rgba in src.colormap(1).items():
        if 0 <= index < 256:
            r, g, b = rgba[:3]
            colours[index] = (r << 16) | (g << 8) | b
            lut[index] = codes.get(int(colours[index]), _UNKNOWN)
    return lut, colours


def _raise_bad_value(
    truth: np.ndarray, pred: np.ndarray, num_classes: int | None, pred_path: str | Path, gt_path: str | Path
) -> None:
    limit = num_classes if num_classes is not None else MAX_INFERRED_CLASSES
    for values, role, path in ((pred, "prediction", pred_path), (truth, "ground truth", gt_path)):
        bad = values[(values < 0) | (values >= limit)]
        if bad.size:
            odd = np.unique(bad)[:5].tolist()
            hint = (
                "set the prediction's nodata value, e.g. to 255"
                if role == "prediction"
                else f"leave it out with --ignore {odd[0]} (ignore=)"
            )
            raise InputError(f"{role} {path}: value(s) {odd} are not class ids 0..{limit - 1}; {hint}")
