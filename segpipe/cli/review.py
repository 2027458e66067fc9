"""``segpipe evaluate`` (a mask against ground truth), ``segpipe explain`` (a tile's attention maps) and
``segpipe quicklook`` (a mask beside its scene)."""

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
        help="per-class IoU, F1, precision, recall of a mask against ground truth",
        description="Compare a predicted class-id raster with ground truth, block by block (any size).",
    )
    p.add_argument("pred", help="predicted mask (class ids; its nodata pixels are not scored)")
    p.add_argument("gt", help="ground truth (class ids, or RGB colour-coded with --colours)")
    p.add_argument(
        "--ignore",
        type=whole_number,
        action="append",
        default=[],
        metavar="ID",
        help="ground-truth class id to leave out (repeatable)",
    )
    p.add_argument("--classes", help="comma-separated class names, in id order")
    p.add_argument("--colours", help="comma-separated #RRGGBB per class, to read colour-coded ground truth")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from segpipe.core.colours import ColourTable
    from segpipe.pipeline.evaluate import evaluate

    table = ColourTable.from_hex(args.colours.split(",")) if args.colours else None
    names = args.classes.split(",") if args.classes else None
    result = evaluate(args.pred, args.gt, ignore=args.ignore, class_names=names, colour_table=table)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_markdown())
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
