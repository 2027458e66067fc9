"""``segpipe train``: train a network on image/mask folders, or on images labelled by polygons (``--labels``). Its
flags are the option fields of :class:`~segpipe.models.training.config.TrainConfig`, plus the architecture's widths
and the class table; the number of input bands comes from the images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from segpipe.cli import EXIT_OK
from segpipe.core.errors import ConfigError
from segpipe.core.options import add_arguments, given, whole_number


def add_train(sub: Any) -> None:
    from segpipe.models.training.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a segmentation model on image/mask folders or polygon labels",
        description=(
            "Train on folders holding images/ and masks/ (class-id or RGB colour-coded masks), or images/ "
            "labelled by the polygons of --labels. The input bands are the images' (any number; --bands picks "
            "some). Random tiles with flips and 90-degree rotations, AdamW + cosine schedule, validation mIoU "
            "per epoch, best checkpoint kept (safetensors + JSON), resumable with --resume, fine-tuning with "
            "--init. The shipped model: python -m segpipe.models.train_default. Guide: docs/training.md."
        ),
    )
    p.add_argument("train_dirs", nargs="+", help="training folders (each with images/, and masks/ without --labels)")
    fields = add_arguments(p, TrainConfig, exclude=("progress",))
    p.add_argument(
        "--base-channels", type=whole_number, help="channels of the first stage (default: the architecture's)"
    )
    p.add_argument("--depth", type=whole_number, help="down-sampling stages (default: the architecture's)")
    p.add_argument(
        "--downsample",
        type=whole_number,
        help="run the network at 1/N of the input resolution (input averaged over N x N blocks, logits "
        "upsampled back; default: 1)",
    )
    p.add_argument(
        "--classes",
        help="name:#RRGGBB,... in class-id order (default: the --init checkpoint's, else the Dubai aerial classes "
        "and mask colours)",
    )
    p.set_defaults(handler=_cmd_train, option_fields=fields)


def parse_classes(text: str) -> tuple[tuple[str, str], ...]:
    """``"water:#0000FF,land:#00FF00"`` -> ``(("water", "#0000FF"), ("land", "#00FF00"))``."""
    try:
        return tuple((n, c) for n, c in (item.split(":", 1) for item in text.split(",")))
    except ValueError:
        raise ConfigError(f"--classes must look like name:#RRGGBB,name:#RRGGBB; got {text!r}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    from segpipe.models.training import TrainConfig, train

    options = given(args, args.option_fields)
    widths = {name: getattr(args, name) for name in ("base_channels", "depth", "downsample")}
    arguments = {name: value for name, value in widths.items() if value is not None}
    config = TrainConfig(
        train_dirs=tuple(Path(d) for d in args.train_dirs),
        # the architecture's own widths unless given; with --init the checkpoint's (given ones must agree)
        arguments=arguments if arguments or "init" not in options else None,
        classes=parse_classes(args.classes) if args.classes else None,
        **options,
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
