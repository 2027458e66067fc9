"""``segpipe evaluate`` (masks against ground truth: one pair, or a data set of pairs pooled), ``segpipe explain``
(a tile's attention maps) and ``segpipe quicklook`` (a mask beside its scene). Their options are the fields of
:class:`~segpipe.pipeline.evaluate.EvaluateOptions`, :class:`~segpipe.pipeline.figures.ExplainOptions` and
:class:`~segpipe.pipeline.figures.QuicklookOptions`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from segpipe.cli.options import Printing, parsed
from segpipe.cli.process import EXIT_OK
from segpipe.core.options import add_arguments
from segpipe.pipeline.evaluate import EvaluateOptions, evaluate_paths
from segpipe.pipeline.figures import ExplainOptions, QuicklookOptions


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
    add_arguments(p, EvaluateOptions)
    add_arguments(p, Printing)
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    result = evaluate_paths(args.pred, args.gt, parsed(args, EvaluateOptions))
    print(json.dumps(result.to_dict(), indent=2) if parsed(args, Printing).json else result.to_markdown())
    return EXIT_OK


def add_explain(sub: Any) -> None:
    p = sub.add_parser(
        "explain",
        help="PNG of one tile: image, predicted mask and the model's attention maps",
        description="Show what the model attends to on one tile of a scene.",
    )
    p.add_argument("input", help="the scene")
    add_arguments(p, ExplainOptions)
    p.set_defaults(handler=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    options = parsed(args, ExplainOptions)
    from segpipe.pipeline.explain import explain  # lazy: torch and matplotlib, 3 s; --help must not wait for them

    path = explain(args.input, options.out, model=options.model, x=options.x, y=options.y, size=options.size)
    print(f"wrote {path}")
    return EXIT_OK


def add_quicklook(sub: Any) -> None:
    p = sub.add_parser(
        "quicklook",
        help="PNG of a mask (and its scene) at reduced resolution",
        description="Render a segpipe mask beside its scene, from the COG overviews.",
    )
    p.add_argument("mask", help="a mask written by segpipe run")
    add_arguments(p, QuicklookOptions)
    p.set_defaults(handler=_cmd_quicklook)


def _cmd_quicklook(args: argparse.Namespace) -> int:
    options = parsed(args, QuicklookOptions)
    from segpipe.pipeline.quicklook import quicklook  # lazy: matplotlib, 1 s; --help must not wait for it

    path = quicklook(args.mask, options.out, scene_path=options.scene, max_size=options.max_size)
    print(f"wrote {path}")
    return EXIT_OK
