"""Train the packaged default model: ``python -m segpipe.models.train_default [--architecture unet] [--out PATH]``.

Fixed data split, hyperparameters and seed (:data:`ARGUMENTS`, :data:`HYPERPARAMETERS`): the Dubai aerial set
under ``../shared/data/dubai-aerial``, tile-1 held out for validation (see
:data:`segpipe.models.dubai.DEFAULT_VALIDATION_TILE`), the six classes with "unlabeled" left out of the loss and of the
mIoU, and the few pure black (#000000) mask pixels ignored. For ``attention_unet`` the best epoch's
checkpoint is written to ``models/weights/default.safetensors`` + ``.json`` (or ``--out``); the ``unet``
ablation, same widths and budget, stays in its work dir unless ``--out`` is given. Working files (resume
state, best checkpoint) go to ``--work-dir`` (default ``out/train-default-<architecture>``, git-ignored).

Interrupted? Run the same command again: it resumes after the last completed epoch (``--fresh`` starts over).

The recipe's figures (time per epoch on 2 CPU cores, held-out scores of the shipped run and of the variants
tried) are in the README's "The model" and ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from segpipe.core.errors import SegpipeError
from segpipe.core.options import OptionField, add_arguments, given
from segpipe.models.checkpoint import load_model, save_checkpoint
from segpipe.models.data import split_folders
from segpipe.models.dubai import DEFAULT_VALIDATION_TILE, DUBAI_CLASSES, DUBAI_UNLABELED
from segpipe.models.training.config import TrainConfig, TrainResult
from segpipe.models.training.loop import train

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "dubai-aerial"
DEFAULT_OUT = REPO / "models" / "weights" / "default.safetensors"

#: Architecture arguments shared by both architectures (identical widths for the ablation).
ARGUMENTS: dict[str, Any] = {
    "in_channels": 3,
    "num_classes": len(DUBAI_CLASSES),
    "base_channels": 16,
    "depth": 4,
}

#: Everything else of the default training run (see :class:`~segpipe.models.training.config.TrainConfig`).
HYPERPARAMETERS: dict[str, Any] = {
    "epochs": 24,
    "steps_per_epoch": 60,
    "batch_size": 8,
    "tile_size": 256,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "colour_jitter": 0.1,
    "warmup_steps": 30,
    "min_lr_ratio": 0.02,
    "class_weighting": "inverse_sqrt",
    "ignore_index": 255,
    "ignore_classes": (DUBAI_UNLABELED,),
    "unknown_colours": "ignore",
    "seed": 20240521,
    "precision": "auto",
    "halo": 32,
    "inference_tile_size": 1024,
    "val_tile_size": 1024,
}


def build_config(
    architecture: str,
    *,
    data: Path,
    work_dir: Path,
    resume: bool,
    num_threads: int | None,
    device: str,
    progress: bool,
    **overrides: Any,
) -> TrainConfig:
    """The :class:`~segpipe.models.training.config.TrainConfig` of the default run; ``overrides`` replace fields of
    :data:`HYPERPARAMETERS` (or set others)."""
    train_dirs, val_dirs = split_folders(data, validation=DEFAULT_VALIDATION_TILE)
    return TrainConfig(
        train_dirs=tuple(train_dirs),
        val_dirs=tuple(val_dirs),
        out_dir=work_dir,
        architecture=architecture,
        arguments=dict(ARGUMENTS),
        classes=DUBAI_CLASSES,
        resume=resume,
        num_threads=num_threads,
        device=device,  # type: ignore[arg-type]  # checked by TrainConfig
        progress=progress,
        **{**HYPERPARAMETERS, **overrides},
    )


#: TrainConfig fields that ``python -m segpipe.models.train_default`` lets a run change.
OVERRIDABLE = ("epochs", "colour_jitter", "scale_jitter", "dice_weight", "ema_decay", "num_threads", "device")


def main(argv: list[str] | None = None) -> int:
    parser, fields = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The ablation (unet) is not packaged: without --out its checkpoint stays in the work dir.
    out: Path | None = args.out or (DEFAULT_OUT if args.architecture == "attention_unet" else None)
    work_dir = args.work_dir or REPO / "out" / f"train-default-{args.architecture}"
    try:
        if args.fresh and work_dir.exists():
            shutil.rmtree(work_dir)
        overrides = given(args, fields)
        config = build_config(
            args.architecture,
            data=args.data,
            work_dir=work_dir,
            resume=True,
            num_threads=overrides.pop("num_threads", None),
            device=overrides.pop("device", "auto"),
            progress=not args.no_progress,
            **overrides,
        )
        result, written = _train(config, args.architecture, out)
    except SegpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _log_done(result, written)
    return 0


def _parser() -> tuple[argparse.ArgumentParser, list[OptionField]]:
    """The script's parser, and the TrainConfig fields it lets a run change (:data:`OVERRIDABLE`)."""
    parser = argparse.ArgumentParser(prog="python -m segpipe.models.train_default", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--architecture", choices=("attention_unet", "unet"), default="attention_unet", help="the network trained"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"checkpoint to write (default for attention_unet: {DEFAULT_OUT})",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the tile-N data folders")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="resume state and run files (default: out/train-default-<arch>)",
    )
    fields = add_arguments(parser, TrainConfig, only=OVERRIDABLE, show_defaults=False)
    parser.add_argument("--fresh", action="store_true", help="delete the work dir's state and start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for log files)")
    return parser, fields


def _train(config: TrainConfig, architecture: str, out: Path | None) -> tuple[TrainResult, Path]:
    """Train (resuming what the work dir holds); copy the best checkpoint to ``out`` if given. Returns the result
    and the checkpoint written."""
    log.info(
        "default training run: %s %s %s -> %s",
        architecture,
        ARGUMENTS,
        {k: getattr(config, k) for k in HYPERPARAMETERS},
        out,
    )
    result = train(config)
    if out is None:
        return result, result.checkpoint
    best = load_model(result.checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    return result, save_checkpoint(best.module, best.metadata, out)


def _log_done(result: TrainResult, written: Path) -> None:
    iou = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in result.per_class_iou.items())
    log.info(
        "done: best epoch %d, val mIoU %.4f (%s); %.0f s wall, %.0f s CPU; checkpoint %s",
        result.best_epoch,
        result.best_miou if result.best_miou is not None else float("nan"),
        iou,
        result.train_seconds,
        result.cpu_seconds,
        written,
    )


if __name__ == "__main__":
    sys.exit(main())
