"""Which predictions go with which ground truths, for ``segpipe evaluate``: one pair, two folders, or a list file.

``find_pairs(PRED, GT)`` accepts three shapes:

- two rasters (files or URLs): one pair;
- two folders: their rasters paired by name (:func:`pair_key`). Only the files directly in each folder count
  (no subfolders), and only rasters: names ending in one of :data:`RASTER_SUFFIXES` (any case) that do not start
  with ``.``; other files (a run's ``.summary.json``) are passed over;
- a list file as PRED with GT omitted (or ``-``): a text file of one ``PRED GT`` pair per line. ``#`` starts a
  comment (a whole line or the end of one); blank lines are skipped; a path holding spaces is quoted (shell
  rules: ``"my scene.tif"``); a relative path is relative to the list file's folder; URLs (``s3://``,
  ``/vsicurl/...``) are taken as they are.

A prediction or ground truth without a partner (a folder's raster whose key the other folder lacks, a listed local
file that does not exist) is an :class:`~segpipe.core.errors.InputError` that names them all in one line, unless
``allow_missing``: then they are left out with one warning. No pair at all is an error either way.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from segpipe.core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: File name endings that make a file in a folder a raster to pair (compared case-insensitively).
RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".bmp", ".gif", ".img", ".vrt")
#: A trailing part of a name, before the raster suffix, that pairing disregards (``x.mask.tif`` pairs as ``x``).
MASK_INFIX = ".mask"
_SHOWN = 5


@dataclass(frozen=True)
class Pair:
    """A predicted mask and its ground truth: paths or URLs as :func:`segpipe.pipeline.evaluate.evaluate` takes."""

    prediction: str
    ground_truth: str


def pair_key(name: str) -> str | None:
    """The name a raster file pairs by: its name without the raster suffix, then without one trailing ``.mask``
    (both compared case-insensitively; the rest is case-sensitive). None for a file that is not paired: a hidden
    file or a name without a raster suffix.

    ``x.mask.tif``, ``x.tif``, ``x.png``, ``x.MASK.TIFF`` -> ``x``; ``x.summary.json`` -> None.
    """
    lower = name.lower()
    suffix = next((s for s in RASTER_SUFFIXES if lower.endswith(s)), None)
    if name.startswith(".") or suffix is None or len(name) == len(suffix):
        return None
    stem = name[: -len(suffix)]
    if stem.lower().endswith(MASK_INFIX) and len(stem) > len(MASK_INFIX):
        stem = stem[: -len(MASK_INFIX)]
    return stem


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _rasters_by_key(folder: Path, role: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        key = pair_key(path.name)
        if key is None or not path.is_file():
            continue
        if key in found:
            raise InputError(
                f"{role} folder {folder}: {found[key].name} and {path.name} both pair as {key!r}; "
                "keep one of them there, or list the pairs in a list file"
            )
        found[key] = path
    if not found:
        raise InputError(f"{role} folder {folder} holds no raster ({', '.join(RASTER_SUFFIXES)}); check the folder")
    return found


def _missing(what: list[str], matched: int, allow_missing: bool, rule: str) -> None:
    """One line naming every unmatched file: an error, or with ``allow_missing`` a warning."""
    if not what:
        return
    text = "; ".join(what)
    if matched == 0:
        raise InputError(f"no pair to evaluate: {text} ({rule})")
    if not allow_missing:
        raise InputError(f"{text} ({rule}); pass --allow-missing to score only the {matched} complete pair(s)")
    log.warning("scoring the %d complete pair(s) only: %s", matched, text)


def pair_folders(pred_dir: str | Path, gt_dir: str | Path, *, allow_missing: bool = False) -> tuple[Pair, ...]:
    """Pair the rasters of two folders by :func:`pair_key`, in the order of the keys.

    Raises:
        InputError: a folder holds no raster or two rasters with one key; a raster has no partner (unless
            ``allow_missing``); no key is in both folders.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds = _rasters_by_key(pred_dir, "prediction")
    truths = _rasters_by_key(gt_dir, "ground truth")
    keys = sorted(preds.keys() & truths.keys())
    lonely_preds = sorted(p.name for k, p in preds.items() if k not in truths)
    lonely_truths = sorted(p.name for k, p in truths.items() if k not in preds)
    what = []
    if lonely_preds:
        what.append(f"{len(lonely_preds)} prediction(s) in {pred_dir} without ground truth: {_shown(lonely_preds)}")
    if lonely_truths:
        what.append(f"{len(lonely_truths)} ground truth(s) in {gt_dir} without prediction: {_shown(lonely_truths)}")
    _missing(what, len(keys), allow_missing, "files pair by name without suffix and without a trailing .mask")
    return tuple(Pair(str(preds[k]), str(truths[k])) for k in keys)


def _is_url(text: str) -> bool:
    return "://" in text or text.startswith("/vsi")


def read_pair_list(path: str | Path, *, allow_missing: bool = False) -> tuple[Pair, ...]:
    """The pairs of a list file (see the module's docstring for its format), in file order.

    Raises:
        InputError: the file does not exist or cannot be read; a listed local file does not exist (unless
            ``allow_missing``); no pair is left.
        ConfigError: the file is a raster rather than a list, or a line is not two paths.
    """
    path = Path(path)
    if path.name.lower().endswith(RASTER_SUFFIXES):
        raise ConfigError(
            f"{path} is a raster, not a list file of pairs; give its ground truth too (segpipe evaluate PRED GT)"
        )
    if not path.is_file():
        raise InputError(f"list file {path} does not exist; give a text file of 'PRED GT' lines, or PRED and GT")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path} is not a text list of pairs; give a list file, or a prediction and its ground truth"
        ) from None
    except OSError as error:
        raise InputError(f"list file {path} cannot be read ({error}); check the file") from None
    base = path.parent
    pairs: list[Pair] = []
    absent: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            fields = shlex.split(line, comments=True)
        except ValueError as error:
            raise ConfigError(f'{path} line {number}: {error}; quote a path with spaces as "a b.tif"') from None
        if not fields:
            continue
        if len(fields) != 2:
            raise ConfigError(
                f"{path} line {number}: expected 'PRED GT' (two paths; quote a path with spaces), got "
                f"{len(fields)} field(s)"
            )
        resolved = [f if _is_url(f) or Path(f).is_absolute() else str(base / f) for f in fields]
        gone = [f for f in resolved if not _is_url(f) and not Path(f).is_file()]
        if gone:
            absent.extend(f"{f} (line {number})" for f in gone)
            continue
        pairs.append(Pair(resolved[0], resolved[1]))
    if not pairs and not absent:
        raise ConfigError(f"list file {path} lists no pair; write one 'PRED GT' line per pair")
    what = [f"{len(absent)} listed file(s) in {path} do not exist: {_shown(absent)}"] if absent else []
    _missing(what, len(pairs), allow_missing, "relative paths are relative to the list file's folder")
    return tuple(pairs)


def find_pairs(
    pred: str | Path, gt: str | Path | None = None, *, allow_missing: bool = False
) -> tuple[tuple[Pair, ...], bool]:
    """The pairs that ``segpipe evaluate PRED GT`` means, and whether they form a data set (folders or a list
    file; False for a single PRED GT pair of rasters, whose existence :func:`evaluate` checks).

    Raises:
        ConfigError: a folder given with a file, or a folder with GT omitted.
        InputError: see :func:`pair_folders` and :func:`read_pair_list`.
    """
    pred_text = str(pred)
    if gt is None or str(gt) == "-":
        if Path(pred_text).is_dir():
            raise ConfigError(
                f"PRED {pred_text} is a folder; give the ground-truth folder too (segpipe evaluate PREDS/ TRUTHS/)"
            )
        return read_pair_list(pred_text, allow_missing=allow_missing), True
    gt_text = str(gt)
    pred_dir, gt_dir = Path(pred_text).is_dir(), Path(gt_text).is_dir()
    if pred_dir and gt_dir:
        return pair_folders(pred_text, gt_text, allow_missing=allow_missing), True
    if pred_dir or gt_dir:
        folder, other = (pred_text, gt_text) if pred_dir else (gt_text, pred_text)
        state = "is not" if Path(other).exists() or _is_url(other) else "does not exist"
        raise ConfigError(
            f"{folder} is a folder but {other} {state}; give two rasters, two folders, or a list file with GT omitted"
        )
    return (Pair(pred_text, gt_text),), False
