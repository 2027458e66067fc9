"""Train the packaged default model: ``python -m models.train_default [--architecture unet] [--out PATH]``.

Fixed data split, hyperparameters and seed (:data:`ARGUMENTS`, :data:`HYPERPARAMETERS`): the Dubai aerial set
under ``../shared/data/dubai-aerial``, tile-1 held out for validation (see
:data:`models.data.DEFAULT_VALIDATION_TILE`), the six classes with "unlabeled" left out of the loss and of the
mIoU, and the few pure black (#000000) mask pixels ignored. For ``attention_unet`` the best epoch's
checkpoint is written to ``models/weights/default.safetensors`` + ``.json`` (or ``--out``); the ``unet``
ablation, same widths and budget, stays in its work dir unless ``--out`` is given. Working files (resume
state, best checkpoint) go to ``--work-dir`` (default ``out/train-default-<architecture>``, git-ignored).

Interrupted? Run the same command again: it resumes after the last completed epoch (``--fresh`` starts over).

Budget of the shipped model: 1440 steps of 8 tiles of 256 x 256 px (24 epochs of 60 steps), with colour jitter
0.1. With bf16 autocast on a CPU with AVX512-BF16 (fp32 took twice as long then; with the malloc and
channels-last settings added since, 1.2x: ``benchmarks/bench_train_step.py``), an epoch of the attention
U-Net took 100-127 s with 2 threads on the otherwise idle 2-core machine (epochs 15-24 of the shipped run),
validation 4-5 s: about 45 minutes for the 24 epochs. On a 2-core Intel Xeon without bf16 (fp32, with the
channels-last and malloc settings of :mod:`models.train`) epochs 1-8 took 120-182 s + 7-8 s of validation
(2 threads, alone): about 65-70 minutes for the 24 epochs (2026-12-01; the run was cut short). The
shipped checkpoint is epoch 20 of such a run (held-out tile-1 mIoU 0.477), which ran 12 epochs with one thread
beside the plain U-Net ablation and was resumed with two threads; a resume reproduces an uninterrupted run
exactly at the same thread count, and up to floating-point summation order across thread counts.

Tried (README, "The model"): 10 epochs without jitter (attention 0.446, plain 0.433; the previous shipped model);
the same 24 epochs for the plain U-Net (0.510); and ``--dice-weight 1`` (soft Dice added to cross-entropy): plain
U-Net 0.480, attention U-Net 0.453 (stopped after 21 epochs), i.e. worse; ``--ema-decay 0.995`` (a moving average
of the weights is kept): plain 0.472, attention 0.479 at epoch 3, both 0.44-0.47 over the last five epochs. No
setting reached the 0.55 target.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from models.data import DEFAULT_VALIDATION_TILE, DUBAI_CLASSES, DUBAI_UNLABELED, split_folders
from segpipe.errors import SegpipeError

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

#: Everything else of the default training run (see :class:`models.train.TrainConfig`).
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
    epochs: int | None = None,
    colour_jitter: float | None = None,
    scale_jitter: float | None = None,
    dice_weight: float | None = None,
    ema_decay: float | None = None,
) -> Any:
    """The :class:`models.train.TrainConfig` of the default run."""
    from models.train import TrainConfig

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
        device=device,  # type: ignore[arg-type]
        progress=progress,
        **{
            **HYPERPARAMETERS,
            **({"epochs": epochs} if epochs else {}),
            **({"colour_jitter": colour_jitter} if colour_jitter is not None else {}),
            **({"scale_jitter": scale_jitter} if scale_jitter is not None else {}),
            **({"dice_weight": dice_weight} if dice_weight is not None else {}),
            **({"ema_decay": ema_decay} if ema_decay is not None else {}),
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.train_default", description=__doc__.split("\n")[0])
    parser.add_argument("--architecture", choices=("attention_unet", "unet"), default="attention_unet")
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
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--epochs", type=int, default=None, help="override the schedule's 24 epochs of 60 steps")
    parser.add_argument(
        "--colour-jitter",
        type=float,
        default=None,
        help="per-band gain/offset augmentation strength j (default 0.1; 0: none; see models.data.TileDataset)",
    )
    parser.add_argument(
        "--scale-jitter",
        type=float,
        default=None,
        help="zoom augmentation strength s: tiles cover 1/(1+s)..1+s times their size (default 0: none; "
        "see models.data.TileDataset)",
    )
    parser.add_argument(
        "--dice-weight",
        type=float,
        default=None,
        help="add this times the soft Dice loss to cross-entropy (default 0; see models.losses)",
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="validate and keep a moving average of the weights with this decay (default 0: none; "
        "see models.train.ema_update)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--fresh", action="store_true", help="delete the work dir's state and start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for log files)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # The ablation (unet) is not packaged: without --out its checkpoint stays in the work dir.
    out: Path | None = args.out or (DEFAULT_OUT if args.architecture == "attention_unet" else None)
    work_dir = args.work_dir or REPO / "out" / f"train-default-{args.architecture}"
    try:
        from models.checkpoint import load_model, save_checkpoint
        from models.train import train

        if args.fresh and work_dir.exists():
            shutil.rmtree(work_dir)
        config = build_config(
            args.architecture,
            data=args.data,
            work_dir=work_dir,
            resume=True,
            num_threads=args.threads,
            device=args.device,
            progress=not args.no_progress,
            epochs=args.epochs,
            colour_jitter=args.colour_jitter,
            scale_jitter=args.scale_jitter,
            dice_weight=args.dice_weight,
            ema_decay=args.ema_decay,
        )
        log.info(
            "default training run: %s %s %s -> %s",
            args.architecture,
            ARGUMENTS,
            {k: getattr(config, k) for k in HYPERPARAMETERS},
            out,
        )
        result = train(config)
        written = result.checkpoint
        if out is not None:
            best = load_model(result.checkpoint)
            out.parent.mkdir(parents=True, exist_ok=True)
            written = save_checkpoint(best.module, best.metadata, out)
    except SegpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
