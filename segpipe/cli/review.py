"""``segpipe evaluate`` (masks against ground truth: one pair, or a data set of pairs pooled), ``segpipe explain``
(a tile's attention maps) and ``segpipe quicklook`` (a mask beside its scene)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from segpipe.cli import EXIT_OK
from segpipe.core.errors import ConfigError
from segpipe.core.options import whole_number


def add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-class IoU, F1, precision, recall of masks against ground truth (one pair or a data set)",
        description=(
            "Compare predicted class-id rasters with ground truth, block by block (any size). PRED GT: two rasters "
            "(one pair); two folders, their rasters paired by name without suffix and without a trailing .mask "
            "(x.mask.tif or x.tif with x.png); or PRED a list file of 'PRED GT' lines (# comments; relative paths "
            "from the list's folder) with GT omitted or '-'. A data set reports each pair and the pooled metrics "
            "of the summed confusion matrix (not the mean of per-image IoUs)."
        ),
    )
    p.add_argument("pred", help="predicted mask, folder of masks, or list file of pairs (class ids; nodata not scored)")
    p.add_argument(
        "gt",
        nargs="?",
        help="ground truth raster or folder (class ids, or colour-coded with --model/--colours); omit or '-' "
        "with a list file",
    )
    p.add_argument(
        "--ignore",
        type=whole_number,
        action="append",
        default=[],
        metavar="ID",
        help="ground-truth class id to leave out (repeatable)",
    )
    p.add_argument("--model", metavar="NAME_OR_PATH", help="take class names and colours from this model's metadata")
    p.add_argument("--classes", help="comma-separated class names, in id order")
    p.add_argument("--colours", help="comma-separated #RRGGBB per class, to read colour-coded ground truth")
    p.add_argument(
        "--unknown",
        choices=("error", "ignore"),
        default="error",
        help="a ground-truth colour outside the classes' colours: error (default), or ignore: leave its pixels out",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="score the complete pairs when some files have no partner (default: an error)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown tables")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from segpipe.core.colours import ColourTable
    from segpipe.pipeline.evaluate import evaluate, evaluate_pairs, model_classes
    from segpipe.pipeline.pairs import find_pairs

    if args.model and (args.classes or args.colours):
        raise ConfigError("--model gives the class names and colours; pass --model or --classes/--colours, not both")
    pairs, dataset = find_pairs(args.pred, args.gt, allow_missing=args.allow_missing)
    names: tuple[str, ...] | None
    table: ColourTable | None
    if args.model:
        names, table = model_classes(args.model)
    else:
        table = ColourTable.from_hex(args.colours.split(",")) if args.colours else None
        names = tuple(args.classes.split(",")) if args.classes else None
    options: dict[str, Any] = {
        "ignore": args.ignore,
        "class_names": names,
        "colour_table": table,
        "unknown": args.unknown,
    }
    if not dataset:
        result = evaluate(pairs[0].prediction, pairs[0].ground_truth, **options)
        print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_markdown())
        return EXIT_OK
    report = evaluate_pairs(pairs, **options)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown())
    return EXIT_OK


def add_explain(sub: Any) -> None:
    p = sub.add_parser(
        "explain",
        help="PNG of one tile: image, predicted mask and the model's attention maps",
        description="Show what the model attends to on one tile of a scene.",
    )
    p.add_argument("input", help="the scene")
    p.add_argument("--model", default="default", help="model name or checkpoint path")
    p.add_argument("--x", type=whole_number, help="tile's left column in pixels (default: centred)")
    p.add_argument("--y", type=whole_number, help="tile's top row in pixels (default: centred)")
    p.add_argument("--size", type=whole_number, help="tile side in pixels (default: the model's tile size)")
    p.add_argument("--out", default="explain.png", help="PNG to write (default: explain.png)")
    p.set_defaults(handler=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    from segpipe.pipeline.explain import explain

    _check_png(args.out)
    path = explain(args.input, args.out, model=args.model, x=args.x, y=args.y, size=args.size)
    print(f"wrote {path}")
    return EXIT_OK


def add_quicklook(sub: Any) -> None:
    p = sub.add_parser(
        "quicklook",
        help="PNG of a mask (and its scene) at reduced resolution",
        description="Render a segpipe mask beside its scene, from the COG overviews.",
    )
    p.add_argument("mask", help="a mask written by segpipe run")
    p.add_argument("--scene", help="the scene it was made from, shown beside it")
    p.add_argument("--max-size", type=whole_number, default=1024, help="long side of each panel in pixels")
    p.add_argument("--out", default="quicklook.png", help="PNG to write (default: quicklook.png)")
    p.set_defaults(handler=_cmd_quicklook)


def _cmd_quicklook(args: argparse.Namespace) -> int:
    from segpipe.pipeline.quicklook import quicklook

    _check_png(args.out)
    path = quicklook(args.mask, args.out, scene_path=args.scene, max_size=args.max_size)
    print(f"wrote {path}")
    return EXIT_OK


def _check_png(path: str) -> None:
    if Path(path).suffix.lower() != ".png":
        raise ConfigError(f"--out {path!r} must end in .png")
    if not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"the directory of --out {path!r} does not exist; create it first")
