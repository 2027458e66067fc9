"""``segpipe train``: train a network on image/mask folders, or on images labelled by polygons (``--labels``). Its
flags are the option fields of :class:`~segpipe.models.training.config.TrainConfig`, plus those of
:class:`~segpipe.models.training.config.NetworkOptions` (the architecture's widths and the class table); the number of
input bands comes from the images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from segpipe.cli.options import parsed
from segpipe.cli.process import EXIT_OK
from segpipe.core.options import add_arguments, given
from segpipe.models.training.config import NetworkOptions, TrainConfig


def add_train(sub: Any) -> None:
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
    add_arguments(p, NetworkOptions)
    p.set_defaults(handler=_cmd_train, option_fields=fields)


def _cmd_train(args: argparse.Namespace) -> int:
    from segpipe.models.training.loop import train  # lazy: torch, 2 s; --help and bad options must not wait

    options = given(args, args.option_fields)
    network = parsed(args, NetworkOptions)
    arguments = network.widths()
    config = TrainConfig(
        train_dirs=tuple(Path(d) for d in args.train_dirs),
        # the architecture's own widths unless given; with --init the checkpoint's (given ones must agree)
        arguments=arguments if arguments or "init" not in options else None,
        classes=network.class_table(),
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
