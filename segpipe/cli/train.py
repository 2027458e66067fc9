"""``segpipe train``: train a network on image/mask folders. Its flags are the option fields of
:class:`~segpipe.models.training.config.TrainConfig`, plus the architecture's widths and the class table."""

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
        help="train a segmentation model on image/mask folders",
        description=(
            "Train on folders holding images/ and masks/ (class-id or RGB colour-coded masks). Random "
            "tiles with flips and 90-degree rotations, AdamW + cosine schedule, validation mIoU per epoch, "
            "best checkpoint kept (safetensors + JSON), resumable with --resume. "
            "The shipped model: python -m segpipe.models.train_default."
        ),
    )
    p.add_argument("train_dirs", nargs="+", help="training folders (each with images/ and masks/)")
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
        "--classes", help="name:#RRGGBB,... in class-id order (default: the Dubai aerial classes and mask colours)"
    )
    p.set_defaults(handler=_cmd_train, option_fields=fields)


def parse_classes(text: str) -> tuple[tuple[str, str], ...]:
    """``"water:#0000FF,land:#00FF00"`` -> ``(("water", "#0000FF"), ("land", "#00FF00"))``."""
    try:
        return tuple((n, c) for n, c in (item.split(":", 1) for item in text.split(",")))
    except ValueError:
        raise ConfigError(f"--classes must look like name:#RRGGBB,name:#RRGGBB; got {text!r}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    from segpipe.models.dubai import DUBAI_CLASSES
    from segpipe.models.training import TrainConfig, train

    classes = parse_classes(args.classes) if args.classes else DUBAI_CLASSES
    widths = {name: getattr(args, name) for name in ("base_channels", "depth", "downsample")}
    config = TrainConfig(
        train_dirs=tuple(Path(d) for d in args.train_dirs),
        arguments={
            "in_channels": 3,
            "num_classes": len(classes),
            **{name: value for name, value in widths.items() if value is not None},
        },
        classes=classes,
        **given(args, args.option_fields),
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
