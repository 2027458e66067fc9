"""Segmentation metrics from a confusion matrix: IoU, F1, precision, recall, mIoU, overall accuracy. Pure numpy.

Per class c, with TP/FP/FN from the confusion matrix (rows: ground truth, columns: prediction):
IoU = TP / (TP + FP + FN), precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2TP / (2TP + FP + FN);
undefined ratios are NaN (``None`` in JSON). mIoU is the mean IoU over the classes that occur in the ground
truth or the prediction of scored pixels and are not ignored. Overall accuracy = trace / scored pixels.

Over a data set (:class:`DatasetEvaluation`), the pooled metrics come from the confusion matrix summed over all
pairs, so every scored pixel weighs the same; the mean of the per-image mIoUs, where every image weighs the same,
is reported beside them and is a different number.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segpipe.core.errors import ConfigError, InputError


def confusion_matrix(
    truth: np.ndarray,
    prediction: np.ndarray,
    num_classes: int,
    *,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Counts ``[t, p]`` of pixels with ground truth ``t`` and prediction ``p`` (int64, K x K).

    Args:
        truth: Class ids, any integer dtype.
        prediction: Class ids, same shape.
        num_classes: K; every scored value must be in 0..K-1.
        valid: Optional boolean array, same shape: only these pixels are counted.
    """
    if truth.shape != prediction.shape:
        raise InputError(f"expected ground truth and prediction of one shape, got {truth.shape} and {prediction.shape}")
    t = truth.astype(np.int64, copy=False).ravel()
    p = prediction.astype(np.int64, copy=False).ravel()
    if valid is not None:
        keep = valid.ravel()
        t, p = t[keep], p[keep]
    if t.size and (min(int(t.min()), int(p.min())) < 0 or max(int(t.max()), int(p.max())) >= num_classes):
        raise InputError(f"class ids outside 0..{num_classes - 1} among the scored pixels")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """A confusion matrix and the metrics derived from it.

    Attributes:
        confusion: (K, K) int64 pixel counts, rows ground truth, columns prediction.
        class_names: K names (``class_<i>`` where none were given).
        ignored: Class ids (and other values) whose ground-truth pixels were skipped.
        ignored_pixels: Pixels skipped for their ground truth (in ``ignored`` or ground-truth nodata).
        nodata_pixels: Pixels skipped because the prediction is nodata there.
        sources: Where the rasters came from (``prediction``, ``ground_truth``), for reports.
        unknown_pixels: Pixels skipped because their ground-truth colour is not in the colour table
            (``unknown="ignore"``, ``--unknown ignore``).
    """

    confusion: np.ndarray
    class_names: tuple[str, ...]
    ignored: tuple[int, ...] = ()
    ignored_pixels: int = 0
    nodata_pixels: int = 0
    sources: dict[str, str] = field(default_factory=dict)
    unknown_pixels: int = 0

    def __post_init__(self) -> None:
        k = self.confusion.shape[0]
        if self.confusion.shape != (k, k) or len(self.class_names) != k:
            raise ConfigError(
                f"expected a square confusion matrix with one name per class, got shape "
                f"{self.confusion.shape} and {len(self.class_names)} names"
            )

    @classmethod
    def from_confusion(
        cls,
        confusion: np.ndarray,
        *,
        class_names: Sequence[str] | None = None,
        ignored: Sequence[int] = (),
        ignored_pixels: int = 0,
        nodata_pixels: int = 0,
        unknown_pixels: int = 0,
        sources: dict[str, str] | None = None,
    ) -> EvaluationResult:
        k = confusion.shape[0]
        names = tuple(class_names) if class_names is not None else tuple(f"class_{i}" for i in range(k))
        return cls(
            np.asarray(confusion, dtype=np.int64),
            names,
            tuple(int(i) for i in ignored),
            int(ignored_pixels),
            int(nodata_pixels),
            dict(sources or {}),
            int(unknown_pixels),
        )

    def padded(self, num_classes: int, class_names: Sequence[str] | None = None) -> EvaluationResult:
        """The same counts with ``num_classes`` classes (zero rows and columns added; no metric changes)."""
        k = self.num_classes
        if num_classes < k:
            raise ConfigError(f"expected num_classes >= {k} to pad a confusion matrix, got {num_classes}")
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        confusion[:k, :k] = self.confusion
        return dataclasses.replace(
            self,
            confusion=confusion,
            class_names=tuple(class_names or (*self.class_names, *(f"class_{i}" for i in range(k, num_classes)))),
        )

    @property
    def num_classes(self) -> int:
        return self.confusion.shape[0]

    @property
    def true_positives(self) -> np.ndarray:
        return np.diag(self.confusion).astype(np.float64)

    @property
    def support(self) -> np.ndarray:
        """Ground-truth pixels per class (scored pixels only)."""
        return self.confusion.sum(axis=1)

    @property
    def predicted(self) -> np.ndarray:
        """Predicted pixels per class (scored pixels only)."""
        return self.confusion.sum(axis=0)

    @property
    def scored_pixels(self) -> int:
        return int(self.confusion.sum())

    @property
    def iou(self) -> np.ndarray:
        tp = self.true_positives
        return _ratio(tp, self.support + self.predicted - tp)

    @property
    def precision(self) -> np.ndarray:
        return _ratio(self.true_positives, self.predicted)

    @property
    def recall(self) -> np.ndarray:
        return _ratio(self.true_positives, self.support)

    @property
    def f1(self) -> np.ndarray:
        tp = self.true_positives
        return _ratio(2 * tp, self.support + self.predicted)

    @property
    def counted_classes(self) -> np.ndarray:
        """Class ids in the mIoU: present in ground truth or prediction, and not ignored."""
        present = (self.support + self.predicted) > 0
        present[[i for i in self.ignored if 0 <= i < self.num_classes]] = False
        return np.flatnonzero(present)

    @property
    def miou(self) -> float:
        """Mean IoU over :attr:`counted_classes` (NaN if there is none)."""
        ids = self.counted_classes
        return float(np.nanmean(self.iou[ids])) if ids.size else math.nan

    @property
    def mean_f1(self) -> float:
        ids = self.counted_classes
        return float(np.nanmean(self.f1[ids])) if ids.size else math.nan

    @property
    def overall_accuracy(self) -> float:
        total = self.scored_pixels
        return float(np.trace(self.confusion)) / total if total else math.nan

    def per_class_iou(self) -> dict[str, float | None]:
        """IoU by class name for the counted classes (``None`` where undefined)."""
        iou = self.iou
        return {self.class_names[i]: _clean(float(iou[i])) for i in self.counted_classes}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (NaN becomes ``None``)."""
        counted = set(self.counted_classes.tolist())
        iou, f1, precision, recall = self.iou, self.f1, self.precision, self.recall
        classes = [
            {
                "id": i,
                "name": self.class_names[i],
                "iou": _clean(float(iou[i])),
                "f1": _clean(float(f1[i])),
                "precision": _clean(float(precision[i])),
                "recall": _clean(float(recall[i])),
                "support": int(self.support[i]),
                "predicted": int(self.predicted[i]),
                "in_miou": i in counted,
            }
            for i in range(self.num_classes)
        ]
        return {
            "miou": _clean(self.miou),
            "mean_f1": _clean(self.mean_f1),
            "overall_accuracy": _clean(self.overall_accuracy),
            "classes": classes,
            "scored_pixels": self.scored_pixels,
            "ignored": list(self.ignored),
            "ignored_pixels": self.ignored_pixels,
            "nodata_pixels": self.nodata_pixels,
            "unknown_pixels": self.unknown_pixels,
            "confusion": self.confusion.tolist(),
            **({"sources": dict(self.sources)} if self.sources else {}),
        }

    def to_markdown(self) -> str:
        """A Markdown table of the per-class metrics with the summary lines below it."""

        def fmt(v: float) -> str:
            return "-" if math.isnan(v) else f"{v:.4f}"

        counted = set(self.counted_classes.tolist())
        lines = [
            "| id | class | IoU | F1 | precision | recall | GT pixels | predicted pixels |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        iou, f1, precision, recall = self.iou, self.f1, self.precision, self.recall
        for i in range(self.num_classes):
            note = "" if i in counted else " (not in mIoU)"
            lines.append(
                f"| {i} | {self.class_names[i]}{note} | {fmt(iou[i])} | {fmt(f1[i])} | {fmt(precision[i])} "
                f"| {fmt(recall[i])} | {int(self.support[i])} | {int(self.predicted[i])} |"
            )
        lines += [
            "",
            f"mIoU {fmt(self.miou)} over {len(counted)} classes; mean F1 {fmt(self.mean_f1)}; "
            f"overall accuracy {fmt(self.overall_accuracy)}; {self.scored_pixels} pixels scored.",
            f"Skipped: {self.ignored_pixels} pixels with ignored ground truth {list(self.ignored)} or "
            f"ground-truth nodata; {self.nodata_pixels} pixels where the prediction is nodata"
            + (
                f"; {self.unknown_pixels} pixels of ground-truth colours not in the colour table."
                if self.unknown_pixels
                else "."
            ),
        ]
        return "\n".join(lines)

    def confusion_markdown(self) -> str:
        """The confusion matrix as a Markdown table: rows ground truth, columns prediction, pixel counts."""
        names = self.class_names
        lines = [
            "| ground truth (rows) / prediction (columns) | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for i, row in enumerate(self.confusion.tolist()):
            lines.append(f"| {names[i]} | " + " | ".join(str(int(v)) for v in row) + " |")
        return "\n".join(lines)


#: How pooled metrics are computed, stated in every data-set report.
POOLING = (
    "pooled metrics come from the confusion matrix summed over all pairs (every scored pixel weighs the same), "
    "not from the mean of per-image IoUs; mean_image_miou is the mean of the per-image mIoUs (every image with "
    "scored pixels weighs the same)"
)


@dataclass(frozen=True, eq=False)
class DatasetEvaluation:
    """The evaluations of several (prediction, ground truth) pairs and their pooled result.

    Build one with :meth:`from_results`, which gives every pair the same classes.

    Attributes:
        images: One result per pair, in pair order, all with the same class names and ignored values.
    """

    images: tuple[EvaluationResult, ...]

    def __post_init__(self) -> None:
        if not self.images:
            raise ConfigError("expected at least one evaluated pair, got none")
        first = self.images[0]
        for result in self.images[1:]:
            if result.class_names != first.class_names or result.ignored != first.ignored:
                raise ConfigError(
                    f"expected every pair with classes {list(first.class_names)} and ignored {list(first.ignored)}, "
                    f"got {list(result.class_names)} and {list(result.ignored)}; use DatasetEvaluation.from_results"
                )

    @classmethod
    def from_results(cls, results: Sequence[EvaluationResult]) -> DatasetEvaluation:
        """Pool results whose class counts may differ (classes inferred per image): every confusion matrix is
        padded to the largest K, which changes no metric (an added class is absent, hence not in the mIoU)."""
        if not results:
            raise ConfigError("expected at least one evaluated pair, got none")
        widest = max(results, key=lambda r: r.num_classes)
        k, names = widest.num_classes, widest.class_names
        return cls(tuple(r if r.num_classes == k else r.padded(k, names) for r in results))

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.images[0].class_names

    @property
    def pooled(self) -> EvaluationResult:
        """The result of the summed confusion matrix (and summed skipped-pixel counts) of all pairs."""
        first = self.images[0]
        confusion = np.zeros_like(first.confusion, dtype=np.int64)
        for result in self.images:
            confusion += result.confusion
        return EvaluationResult(
            confusion,
            first.class_names,
            first.ignored,
            sum(r.ignored_pixels for r in self.images),
            sum(r.nodata_pixels for r in self.images),
            {},
            sum(r.unknown_pixels for r in self.images),
        )

    @property
    def mean_image_miou(self) -> float:
        """Mean of the per-image mIoUs over the images that have one (scored pixels); NaN if none has."""
        values = [r.miou for r in self.images if not math.isnan(r.miou)]
        return float(np.mean(values)) if values else math.nan

    def _image_row(self, result: EvaluationResult) -> dict[str, Any]:
        counted = set(result.counted_classes.tolist())
        iou = result.iou
        return {
            "prediction": result.sources.get("prediction"),
            "ground_truth": result.sources.get("ground_truth"),
            "miou": _clean(result.miou),
            "overall_accuracy": _clean(result.overall_accuracy),
            "scored_pixels": result.scored_pixels,
            "ignored_pixels": result.ignored_pixels,
            "nodata_pixels": result.nodata_pixels,
            "unknown_pixels": result.unknown_pixels,
            "iou": {name: _clean(float(iou[i])) if i in counted else None for i, name in enumerate(result.class_names)},
            "confusion": result.confusion.tolist(),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable report: ``pooled`` (as :meth:`EvaluationResult.to_dict`), ``mean_image_miou``,
        ``images`` (one row per pair: per-class IoU, mIoU, overall accuracy, pixel counts, confusion matrix)."""
        return {
            "pairs": len(self.images),
            "pooling": POOLING,
            "pooled": self.pooled.to_dict(),
            "mean_image_miou": _clean(self.mean_image_miou),
            "images": [self._image_row(r) for r in self.images],
        }

    def to_markdown(self) -> str:
        """Per-image rows, then the pooled per-class table, the mean of per-image mIoUs and the pooled confusion
        matrix, as Markdown."""

        def fmt(v: float | None) -> str:
            return "-" if v is None or math.isnan(v) else f"{v:.4f}"

        pooled = self.pooled
        columns = pooled.counted_classes.tolist()
        names = self.class_names
        lines = [
            f"Per image ({len(self.images)} pairs; IoU per class, '-' where the class is in neither mask):",
            "",
            "| prediction | ground truth | mIoU | overall accuracy | pixels scored | "
            + " | ".join(f"IoU {names[i]}" for i in columns)
            + " |",
            "|---|---|---:|---:|---:|" + "---:|" * len(columns),
        ]
        for result in self.images:
            row = self._image_row(result)
            ious = " | ".join(fmt(row["iou"][names[i]]) for i in columns)
            lines.append(
                f"| {row['prediction']} | {row['ground_truth']} | {fmt(result.miou)} | "
                f"{fmt(result.overall_accuracy)} | {result.scored_pixels} | {ious} |"
            )
        lines += [
            "",
            f"Pooled over {len(self.images)} pairs: the metrics of the confusion matrix summed over all pairs (every "
            "scored pixel weighs the same), not the mean of per-image IoUs:",
            "",
            pooled.to_markdown(),
            "",
            f"Mean of per-image mIoU: {fmt(self.mean_image_miou)} (every image with scored pixels weighs the same; "
            f"pooled mIoU {fmt(pooled.miou)}).",
            "",
            "Pooled confusion matrix (pixels):",
            "",
            pooled.confusion_markdown(),
        ]
        return "\n".join(lines)
