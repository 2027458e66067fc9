"""The ``segpipe`` command: a thin layer that parses options, validates, and calls the flows.

Exit codes: 0 success; 2 bad input or usage (one line ``error: ...`` on stderr, no traceback); 1 internal
failure (one line, the traceback only with ``--verbose``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from segpipe.errors import SegpipeError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def _quiet_environment(verbose: bool) -> None:
    """Keep third-party chatter off the terminal; must run before prefect or ray are imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Prefect's ephemeral API server gets 20 s to start by default, which a busy machine misses (seen with two
    # training runs on the 2 cores: "Timed out while attempting to connect to ephemeral Prefect API server").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "warning: %(message)s",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="segment a scene: raster in, COG mask out", description="Segment one scene."
    )
    p.add_argument("input", help="the scene: a GeoTIFF/COG path, or any GDAL path or URL (/vsicurl/, s3://)")
    p.add_argument("output", help="the mask to write, a .tif (Cloud Optimized GeoTIFF)")
    p.add_argument(
        "--model", default="default", help="model name or checkpoint path (default: the shipped model)"
    )
    p.add_argument("--tile-size", type=_positive, help="tile core size in pixels (default: the model's)")
    p.add_argument(
        "--halo", type=_positive, help="context margin around each tile in pixels (default: the model's)"
    )
    p.add_argument(
        "--blend",
        default="crop",
        choices=["crop", "cosine", "gaussian"],
        help="crop (default): each tile's core, written directly; cosine/gaussian: blend overlapping tiles",
    )
    p.add_argument("--batch-size", type=_positive, help="tiles per forward pass")
    p.add_argument("--workers", type=_positive, help="segmenter actors (default: one per GPU, or one on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--work-dir", help="keep the zarr work store here; a re-run with it resumes")
    p.add_argument("--probabilities", metavar="PATH", help="also write per-class probabilities as a COG")
    p.add_argument("--ray-address", help="an existing Ray cluster (auto, ray://host:10001); default: local")
    p.add_argument("--executor", default="ray", choices=["ray", "local"], help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument(
        "--no-prefect", action="store_true", help="run the stages directly, without the Prefect flow"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(handler=_cmd_run)


@contextlib.contextmanager
def _warnings_muted(logger_name: str) -> Iterator[None]:
    """Drop warnings (not errors) logged under ``logger_name`` in this block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.plan import RunSettings, make_plan

    settings = RunSettings(
        input=args.input,
        output=args.output,
        model=args.model,
        tile_size=args.tile_size,
        halo=args.halo,
        blend=args.blend,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        work_dir=args.work_dir,
        probabilities=args.probabilities,
        ray_address=args.ray_address,
        overwrite=args.overwrite,
        executor=args.executor,
    )
    with _warnings_muted("pipeline"):  # the run validates again and warns then: one warning, not two
        make_plan(settings)  # fail fast, before Prefect and Ray start
    if args.no_prefect:
        from pipeline.run import run_scene

        summary = run_scene(settings)
    else:
        from flows.segment import segment_scene

        summary = segment_scene(settings)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return EXIT_OK


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines: what was done, how fast, where the output is."""
    scene, tiles, sec = summary["scene"], summary["tiles"], summary["seconds"]
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in sec.items() if k != "total")
    total = sum(summary["class_histogram"].values()) or 1
    classes = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in summary["class_histogram"].items())
    lines = [
        f"segmented {scene['width']}x{scene['height']}x{scene['bands']} {scene['dtype']} "
        f"({scene['megapixels']} MP, {scene['crs'] or 'no CRS'}) in {sec['total']:.1f} s: "
        f"{summary['megapixels_per_second']} MP/s on {summary['workers']} {summary['device']} worker(s)",
        f"tiles: {tiles['total']} total, {tiles['computed']} computed, "
        f"{tiles['skipped_nodata']} skipped (nodata), {tiles['reused']} reused; "
        f"{tiles['tile_size']} px + {tiles['halo']} px halo, {tiles['blend']} blend",
        f"stages: {stages}",
        f"classes: {classes}",
        f"mask: {summary['output']}",
    ]
    if summary.get("probabilities"):
        lines.append(f"probabilities: {summary['probabilities']}")
    if not summary["model"]["trained"]:
        lines.append("note: the model is untrained (fixed-seed weights); its mask is not meaningful")
    return "\n".join(lines)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-class IoU, F1, precision, recall of a mask against ground truth",
        description="Compare a predicted class-id raster with ground truth, block by block (any size).",
    )
    p.add_argument("pred", help="predicted mask (class ids; its nodata pixels are not scored)")
    p.add_argument("gt", help="ground truth (class ids, or RGB colour-coded with --colours)")
    p.add_argument(
        "--ignore",
        type=_positive,
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
    from pipeline.evaluate import evaluate

    table = None
    if args.colours:
        from models.data import ColourTable

        table = ColourTable.from_hex(args.colours.split(","))
    names = args.classes.split(",") if args.classes else None
    result = evaluate(args.pred, args.gt, ignore=args.ignore, class_names=names, colour_table=table)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_markdown())
    return EXIT_OK


def _add_dataset(sub: Any) -> None:
    for name, doc in (
        ("dataset", "segment every raster of a folder now (skips scenes already done)"),
        ("serve", "serve the dataset flow on a cron schedule (Prefect deployment; blocks)"),
    ):
        p = sub.add_parser(name, help=doc, description=doc)
        p.add_argument("input_dir", help="folder of scenes (*.tif, *.tiff, *.jp2, *.vrt)")
        p.add_argument("output_dir", help="folder for <scene>.mask.tif and <scene>.mask.summary.json")
        p.add_argument("--model", default="default")
        p.add_argument("--blend", default="crop", choices=["crop", "cosine", "gaussian"])
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--workers", type=_positive)
        p.add_argument("--work-dir", help="keep work stores here (one per scene) so re-runs resume")
        p.add_argument("--ray-address")
        p.add_argument("--overwrite", action="store_true", help="redo scenes that already have a mask")
        if name == "serve":
            p.add_argument("--cron", default="0 2 * * *", help="schedule (default: 02:00 every night)")
            p.add_argument("--name", default="nightly", help="deployment name")
        p.set_defaults(handler=_cmd_dataset, serve=name == "serve")


def _cmd_dataset(args: argparse.Namespace) -> int:
    from flows.dataset import scenes_in, segment_dataset, serve_nightly

    scenes_in(args.input_dir)  # fail fast on a missing folder
    options = {
        "model": args.model,
        "blend": args.blend,
        "device": args.device,
        "workers": args.workers,
        "work_dir": args.work_dir,
        "ray_address": args.ray_address,
        "overwrite": args.overwrite,
    }
    if args.serve:
        serve_nightly(args.input_dir, args.output_dir, cron=args.cron, name=args.name, **options)
        return EXIT_OK
    result = segment_dataset(args.input_dir, args.output_dir, **options)
    print(json.dumps(result, indent=2))
    return EXIT_OK


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a segmentation model on image/mask folders",
        description=(
            "Train on folders holding images/ and masks/ (class-id or RGB colour-coded masks). Random "
            "tiles with flips and 90-degree rotations, AdamW + cosine schedule, validation mIoU per epoch, "
            "best checkpoint kept (safetensors + JSON), resumable with --resume. "
            "The shipped model: python -m models.train_default."
        ),
    )
    p.add_argument("train_dirs", nargs="+", help="training folders (each with images/ and masks/)")
    p.add_argument("--val", action="append", default=[], metavar="DIR", help="held-out folder (repeatable)")
    p.add_argument("--out", required=True, help="folder for best.safetensors/.json and the resume state")
    p.add_argument("--architecture", default="attention_unet", choices=["attention_unet", "unet"])
    p.add_argument("--base-channels", type=_positive, default=16)
    p.add_argument("--depth", type=_positive, default=4)
    p.add_argument(
        "--downsample",
        type=_positive,
        default=1,
        help="run the network at 1/N of the input resolution (input averaged over N x N blocks, logits "
        "upsampled back); default 1",
    )
    p.add_argument(
        "--classes",
        help="name:#RRGGBB,... in class-id order (default: the Dubai aerial classes and mask colours)",
    )
    p.add_argument("--epochs", type=_positive, default=10)
    p.add_argument("--steps", type=_positive, default=60, help="optimizer steps per epoch")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--tile-size", type=_positive, default=256, help="training tile side in pixels")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--class-weighting", default="inverse_sqrt", choices=["none", "median_frequency", "inverse_sqrt"]
    )
    p.add_argument(
        "--dice-weight",
        type=float,
        default=0.0,
        help="add this times the soft Dice loss (mean over classes) to cross-entropy; default 0",
    )
    p.add_argument(
        "--lovasz-weight",
        type=float,
        default=0.0,
        help="add this times the Lovasz-softmax loss (a surrogate of 1 - IoU per class) to cross-entropy; "
        "default 0",
    )
    p.add_argument(
        "--colour-jitter",
        type=float,
        default=0.0,
        help="per-band gain/offset augmentation strength, 0 <= j < 1; default 0 (none)",
    )
    p.add_argument(
        "--scale-jitter",
        type=float,
        default=0.0,
        help="zoom augmentation strength s, 0 <= s <= 1: each tile covers 1/(1+s) to 1+s times its size in "
        "image pixels; default 0 (none)",
    )
    p.add_argument(
        "--saturation-jitter",
        type=float,
        default=0.0,
        help="saturation augmentation strength q, 0 <= q <= 1: colours scaled about their grey value by "
        "1-q to 1+q; default 0 (none)",
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="validate and keep a moving average of the weights with this decay, 0 <= d < 1 (e.g. 0.995); "
        "default 0 (none)",
    )
    p.add_argument(
        "--ignore-class",
        type=_positive,
        action="append",
        default=[],
        metavar="ID",
        help="class id left out of loss and mIoU (repeatable)",
    )
    p.add_argument(
        "--unknown-colours",
        default="error",
        choices=["error", "ignore"],
        help="a mask colour outside --classes: stop (default) or leave the pixel out of loss and metrics",
    )
    p.add_argument("--seed", type=_positive, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=_positive, help="torch threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue from the last completed epoch in --out")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from models.data import DUBAI_CLASSES
    from models.train import TrainConfig, train
    from segpipe.errors import ConfigError

    classes = DUBAI_CLASSES
    if args.classes:
        try:
            classes = tuple((n, c) for n, c in (item.split(":", 1) for item in args.classes.split(",")))
        except ValueError:
            raise ConfigError(
                f"--classes must look like name:#RRGGBB,name:#RRGGBB; got {args.classes!r}"
            ) from None
    config = TrainConfig(
        train_dirs=tuple(args.train_dirs),
        val_dirs=tuple(args.val),
        out_dir=args.out,
        architecture=args.architecture,
        arguments={
            "in_channels": 3,
            "num_classes": len(classes),
            "base_channels": args.base_channels,
            "depth": args.depth,
            **({"downsample": args.downsample} if args.downsample != 1 else {}),
        },
        classes=classes,
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        batch_size=args.batch_size,
        tile_size=args.tile_size,
        lr=args.lr,
        class_weighting=args.class_weighting,
        dice_weight=args.dice_weight,
        lovasz_weight=args.lovasz_weight,
        colour_jitter=args.colour_jitter,
        scale_jitter=args.scale_jitter,
        saturation_jitter=args.saturation_jitter,
        ema_decay=args.ema_decay,
        ignore_classes=tuple(args.ignore_class),
        unknown_colours=args.unknown_colours,
        seed=args.seed,
        device=args.device,
        num_threads=args.threads,
        resume=args.resume,
    )
    result = train(config)
    print(
        json.dumps(
            {
                "checkpoint": str(result.checkpoint.resolve()),
                "best_epoch": result.best_epoch,
                "best_miou": result.best_miou,
                "per_class_iou": dict(result.per_class_iou),
                "train_seconds": round(result.train_seconds, 1),
            },
            indent=2,
        )
    )
    return EXIT_OK


def _add_explain(sub: Any) -> None:
    p = sub.add_parser(
        "explain",
        help="PNG of one tile: image, predicted mask and the model's attention maps",
        description="Show what the model attends to on one tile of a scene.",
    )
    p.add_argument("input", help="the scene")
    p.add_argument("--model", default="default", help="model name or checkpoint path")
    p.add_argument("--x", type=_positive, help="tile's left column in pixels (default: centred)")
    p.add_argument("--y", type=_positive, help="tile's top row in pixels (default: centred)")
    p.add_argument("--size", type=_positive, help="tile side in pixels (default: the model's tile size)")
    p.add_argument("--out", default="explain.png", help="PNG to write (default: explain.png)")
    p.set_defaults(handler=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    from models.explain import explain

    _check_png(args.out)
    path = explain(args.input, args.out, model=args.model, x=args.x, y=args.y, size=args.size)
    print(f"wrote {path}")
    return EXIT_OK


def _add_quicklook(sub: Any) -> None:
    p = sub.add_parser(
        "quicklook",
        help="PNG of a mask (and its scene) at reduced resolution",
        description="Render a segpipe mask beside its scene, from the COG overviews.",
    )
    p.add_argument("mask", help="a mask written by segpipe run")
    p.add_argument("--scene", help="the scene it was made from, shown beside it")
    p.add_argument("--max-size", type=_positive, default=1024, help="long side of each panel in pixels")
    p.add_argument("--out", default="quicklook.png", help="PNG to write (default: quicklook.png)")
    p.set_defaults(handler=_cmd_quicklook)


def _cmd_quicklook(args: argparse.Namespace) -> int:
    from pipeline.quicklook import quicklook

    _check_png(args.out)
    path = quicklook(args.mask, args.out, scene_path=args.scene, max_size=args.max_size)
    print(f"wrote {path}")
    return EXIT_OK


def _check_png(path: str) -> None:
    from pathlib import Path

    from segpipe.errors import ConfigError

    if Path(path).suffix.lower() != ".png":
        raise ConfigError(f"--out {path!r} must end in .png")
    if not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"the directory of --out {path!r} does not exist; create it first")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segpipe", description="Segment huge images with attention models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS: list[Callable[[Any], None]] = [
    _add_run,
    _add_train,
    _add_evaluate,
    _add_dataset,
    _add_explain,
    _add_quicklook,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_environment(args.verbose)
    try:
        return int(args.handler(args))
    except SegpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; re-run with the same --work-dir to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.verbose:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"internal error: {type(exc).__name__}: {first} (re-run with --verbose for details)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
