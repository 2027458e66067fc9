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

The metrics themselves (IoU, F1, precision, recall, mIoU) are :mod:`segpipe.core.metrics`. What ``segpipe evaluate``
takes is :class:`EvaluateOptions`, and :func:`evaluate_paths` does what it asks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from segpipe.core.colours import ColourTable, Unknown
from segpipe.core.errors import ConfigError, InputError
from segpipe.core.metrics import DatasetEvaluation, EvaluationResult, confusion_matrix
from segpipe.core.options import option
from segpipe.core.raster import open_raster
from segpipe.pipeline.pairs import Pair, find_pairs

log = logging.getLogger(__name__)

#: Largest number of classes inferred from the data when ``num_classes`` is not given.
MAX_INFERRED_CLASSES = 1024
#: What to do with a colour-coded ground truth's colour outside the colour table (``--unknown``).
UNKNOWN_CHOICES = ("error", "ignore")
#: Class id given to ground-truth colours outside the colour table (a table has at most 255 classes, 0..254).
_UNKNOWN = 255
#: The advice in errors about unknown ground-truth colours.
_UNKNOWN_FIX = "pass --unknown ignore (unknown='ignore') to leave such pixels out"


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions:
    """What ``segpipe evaluate`` takes besides the rasters: where the class names and colours come from, the
    ground-truth class ids left out, what an unknown ground-truth colour is, and whether unpaired files are an
    error. Checked on construction (``ConfigError`` naming the flag)."""

    ignore: tuple[int, ...] = option(
        (), help="ground-truth class id to leave out (repeatable)", metavar="ID", repeatable=True
    )
    model: str | None = option(
        None, help="take class names and colours from this model's metadata", metavar="NAME_OR_PATH"
    )
    classes: str | None = option(None, help="comma-separated class names, in id order")
    colours: str | None = option(None, help="comma-separated #RRGGBB per class, to read colour-coded ground truth")
    unknown: Unknown = option(
        "error",
        help="a ground-truth colour outside the classes' colours: error (default), or ignore: leave its pixels out",
        choices=UNKNOWN_CHOICES,
    )
    allow_missing: bool = option(
        False, help="score the complete pairs when some files have no partner (default: an error)"
    )

    def __post_init__(self) -> None:
        if self.model and (self.classes or self.colours):
            raise ConfigError(
                "--model gives the class names and colours; pass --model or --classes/--colours, not both"
            )
        if self.unknown not in UNKNOWN_CHOICES:
            raise ConfigError(f"--unknown must be error or ignore, got {self.unknown!r}")
        if any(i < 0 for i in self.ignore):
            raise ConfigError(f"--ignore must be class ids >= 0, got {list(self.ignore)}")
        self.colour_table()  # ConfigError for a colour that is not #RRGGBB

    def colour_table(self) -> ColourTable | None:
        """The table of ``--colours``, or None."""
        return ColourTable.from_hex(self.colours.split(",")) if self.colours else None

    def class_table(self) -> tuple[tuple[str, ...] | None, ColourTable | None]:
        """The class names and colour table: the model's (from its metadata, :func:`model_classes`), else those of
        ``--classes`` and ``--colours`` (None for either not given)."""
        if self.model:
            return model_classes(self.model)
        return (tuple(self.classes.split(",")) if self.classes else None), self.colour_table()


def evaluate_paths(pred: str, gt: str | None, options: EvaluateOptions) -> EvaluationResult | DatasetEvaluation:
    """``segpipe evaluate PRED [GT]``: one pair (:func:`evaluate`) or a data set of pairs (:func:`evaluate_pairs`),
    as :func:`~segpipe.pipeline.pairs.find_pairs` reads PRED and GT."""
    pairs, dataset = find_pairs(pred, gt, allow_missing=options.allow_missing)
    names, table = options.class_table()
    if not dataset:
        return evaluate(
            pairs[0].prediction,
            pairs[0].ground_truth,
            ignore=options.ignore,
            class_names=names,
            colour_table=table,
            unknown=options.unknown,
        )
    return evaluate_pairs(pairs, ignore=options.ignore, class_names=names, colour_table=table, unknown=options.unknown)


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
    num_classes = _class_count(unknown, block_size, num_classes, class_names, colour_table)
    ignore_values = np.array(sorted({int(i) for i in ignore}), dtype=np.int64)
    with contextlib.ExitStack() as stack:
        pred = stack.enter_context(open_raster(str(pred_path), role="prediction", hint="give a class-id raster"))
        gt = stack.enter_context(open_raster(str(gt_path), role="ground truth", hint="give a class-id raster"))
        truth = _Truth.of(gt, gt_path, pred, pred_path, colour_table, unknown)
        tally = _Tally(pred_path, gt_path, num_classes)
        pred_nodata = pred.nodata
        for window in _blocks(pred.width, pred.height, block_size):
            predicted = pred.read(1, window=window).astype(np.int64)
            ids = truth.read(window)
            tally.add(ids, predicted, *truth.left_out(ids, ignore_values), pred_nodata)
    names = tuple(class_names) if class_names is not None else tuple(f"class_{i}" for i in range(tally.k))
    result = EvaluationResult(
        tally.confusion,
        names,
        tuple(int(i) for i in ignore_values),
        tally.ignored_pixels,
        tally.nodata_pixels,
        {"prediction": str(pred_path), "ground_truth": str(gt_path)},
        tally.unknown_pixels,
    )
    _log_result(result, pred_path, gt_path, pred_nodata)
    return result


def _class_count(
    unknown: Unknown,
    block_size: int,
    num_classes: int | None,
    class_names: Sequence[str] | None,
    colour_table: ColourTable | None,
) -> int | None:
    """Check :func:`evaluate`'s arguments; return the number of classes they state (None: inferred from the data).

    Raises:
        ConfigError: an unknown ``unknown``, a block size < 1, or class counts that disagree or are < 1.
    """
    if unknown not in UNKNOWN_CHOICES:
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
    return num_classes


def _check_prediction(
    pred: rasterio.DatasetReader, pred_path: str | Path, gt: rasterio.DatasetReader, gt_path: str | Path
) -> None:
    """Raise InputError unless the prediction is one integer band on the ground truth's grid (width x height)."""
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


@dataclass(frozen=True)
class _Truth:
    """A ground-truth raster read block by block as class ids: as they are, or, colour-coded, through the colour
    table (RGB bands) or through its palette (:func:`_palette_lut`); unknown colours become ``_UNKNOWN``."""

    src: rasterio.DatasetReader
    path: str | Path
    colour_table: ColourTable | None
    colour_mode: bool
    palette: tuple[np.ndarray, np.ndarray] | None
    unknown: Unknown

    @classmethod
    def of(
        cls,
        gt: rasterio.DatasetReader,
        gt_path: str | Path,
        pred: rasterio.DatasetReader,
        pred_path: str | Path,
        colour_table: ColourTable | None,
        unknown: Unknown,
    ) -> _Truth:
        """Check the pair's rasters and tell how the ground truth is read.

        Raises:
            InputError: the grids differ, or either raster is not one integer band of class ids (a colour-coded
                ground truth aside).
            ConfigError: a colour-coded ground truth without a colour table.
        """
        _check_prediction(pred, pred_path, gt, gt_path)
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
        return cls(gt, gt_path, colour_table, colour_mode, palette, unknown)

    def read(self, window: Window) -> np.ndarray:
        """The class ids (int64) of ``window``.

        Raises:
            InputError: with ``unknown="error"``, a colour outside the colour table.
        """
        size, at = f"{window.width}x{window.height} px", f"column {window.col_off}, row {window.row_off}"
        where = f"{self.path} (block of {size} at {at})"
        if self.colour_mode and self.palette is None:
            assert self.colour_table is not None
            return self.colour_table.to_class_ids(
                self.src.read([1, 2, 3], window=window),
                source=where,
                unknown=self.unknown,
                ignore_index=_UNKNOWN,
                fix=_UNKNOWN_FIX,
            ).astype(np.int64)
        if self.palette is not None:
            assert self.colour_table is not None
            index = self.src.read(1, window=window)
            truth = self.palette[0][index].astype(np.int64)
            if self.unknown == "error" and (truth == _UNKNOWN).any():
                bad, counts = np.unique(self.palette[1][index[truth == _UNKNOWN]], return_counts=True)
                raise self.colour_table.unknown_colours_error(bad, counts, source=where, fix=_UNKNOWN_FIX)
            return truth
        return self.src.read(1, window=window).astype(np.int64)

    def left_out(self, ids: np.ndarray, ignore_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which pixels of a block of class ids are not scored for their ground truth: (ignored or nodata,
        of unknown colour), two boolean arrays of the block's shape."""
        unknown = ids == _UNKNOWN if self.colour_mode else np.zeros(ids.shape, dtype=bool)
        skipped = np.isin(ids, ignore_values) & ~unknown
        nodata = None if self.colour_mode else self.src.nodata
        if nodata is not None:
            skipped |= ids == nodata
        return skipped, unknown


@dataclass
class _Tally:
    """The confusion matrix of a pair so far (K x K; K grows as class ids appear when it is not given) and the
    pixels left out: ignored or nodata in the ground truth, of unknown colour, nodata in the prediction."""

    pred_path: str | Path
    gt_path: str | Path
    num_classes: int | None
    confusion: np.ndarray = field(init=False)
    ignored_pixels: int = 0
    nodata_pixels: int = 0
    unknown_pixels: int = 0

    def __post_init__(self) -> None:
        k = self.num_classes if self.num_classes is not None else 1
        self.confusion = np.zeros((k, k), dtype=np.int64)

    @property
    def k(self) -> int:
        return int(self.confusion.shape[0])

    def add(
        self,
        truth: np.ndarray,
        pred: np.ndarray,
        skip_gt: np.ndarray,
        unknown_gt: np.ndarray,
        pred_nodata: float | None,
    ) -> None:
        """Count one block: ``truth`` and ``pred`` (int64 class ids), the pixels whose ground truth is not scored
        (:meth:`_Truth.left_out`), and the prediction's nodata value (None: none)."""
        skip = skip_gt | unknown_gt
        no_pred = ~skip & (pred == pred_nodata) if pred_nodata is not None else np.zeros_like(skip)
        valid = ~skip & ~no_pred
        self.ignored_pixels += int(skip_gt.sum())
        self.unknown_pixels += int(unknown_gt.sum())
        self.nodata_pixels += int(no_pred.sum())
        tv, pv = truth[valid], pred[valid]
        if tv.size == 0:
            return
        self._make_room(min(int(tv.min()), int(pv.min())), max(int(tv.max()), int(pv.max())), tv, pv)
        self.confusion += confusion_matrix(tv, pv, self.k)

    def _make_room(self, low: int, high: int, tv: np.ndarray, pv: np.ndarray) -> None:
        """Check the block's class ids (``low``..``high``) and grow the matrix to hold them when K is inferred."""
        if low < 0 or (self.num_classes is not None and high >= self.num_classes):
            _raise_bad_value(tv, pv, self.num_classes, self.pred_path, self.gt_path)
        if high < self.k:
            return
        if high >= MAX_INFERRED_CLASSES:
            raise InputError(
                f"class id {high} in {self.pred_path} or {self.gt_path}; name the classes (--classes or --model; "
                f"num_classes=) and leave fill values out (--ignore, or the prediction's nodata)"
            )
        grown = np.zeros((high + 1, high + 1), dtype=np.int64)
        grown[: self.k, : self.k] = self.confusion
        self.confusion = grown


def _log_result(
    result: EvaluationResult, pred_path: str | Path, gt_path: str | Path, pred_nodata: float | None
) -> None:
    if result.nodata_pixels:
        log.info(
            "%s: %d pixels where the prediction is nodata (%s) were not scored",
            pred_path,
            result.nodata_pixels,
            pred_nodata,
        )
    log.info(
        "evaluated %s against %s: mIoU %.4f, %d pixels scored, %d ignored, %d nodata, %d of unknown colour",
        pred_path,
        gt_path,
        result.miou,
        result.scored_pixels,
        result.ignored_pixels,
        result.nodata_pixels,
        result.unknown_pixels,
    )


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
    from segpipe.models.checkpoint import find_metadata, read_metadata, resolve_model_path  # lazy: torch, 1.65 s

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
