"""The configuration of a training run (:class:`TrainConfig`) and what a run reports (:class:`EpochRecord`,
:class:`TrainResult`). No torch here: a configuration is checked before anything heavy is imported.

Every field is declared with :func:`segpipe.core.options.option`: its default and its help are stated here once,
and ``segpipe train`` builds its flags from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from segpipe.core.colours import parse_colour
from segpipe.core.errors import ConfigError
from segpipe.core.options import option
from segpipe.core.pyramid import parse_resolution
from segpipe.core.runtime import DEVICES
from segpipe.models.dubai import DUBAI_CLASSES

#: Fields of :class:`TrainConfig` that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"resume", "num_threads", "progress", "device", "num_workers"})

CLASS_WEIGHTINGS = ("none", "median_frequency", "inverse_sqrt")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _default_arguments() -> dict[str, Any]:
    return {"in_channels": 3, "num_classes": 6, "base_channels": 16, "depth": 4}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; validated on construction. Each field's help says what it is.

    ``train_dirs``, ``out_dir``, ``val_dirs``, ``arguments``, ``classes``, ``bands``, ``mean`` and ``std`` are set by
    the caller (``segpipe train`` has positional arguments and ``--classes``, ``--base-channels``, ``--depth``,
    ``--downsample`` for them); ``mean``/``std`` of None are computed from the training images (0-255 units).
    """

    train_dirs: tuple[Path, ...]
    out_dir: Path = option(
        help="folder for best.safetensors/.json and the resume state", flag="--out", metavar="DIR"
    )
    val_dirs: tuple[Path, ...] = option(
        (),
        help="held-out data folder, validated on whole images after each epoch (repeatable)",
        flag="--val",
        metavar="DIR",
        repeatable=True,
    )
    architecture: str = option(
        "attention_unet", help="network: a name of segpipe.models.registry (attention_unet, unet)"
    )
    arguments: Mapping[str, Any] = field(default_factory=_default_arguments)
    classes: tuple[tuple[str, str], ...] = DUBAI_CLASSES
    bands: tuple[str, ...] = ("red", "green", "blue")
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    epochs: int = option(20, help="number of epochs")
    steps_per_epoch: int = option(100, help="optimizer steps per epoch", flag="--steps")
    batch_size: int = option(8, help="tiles per step")
    tile_size: int = option(256, help="side of the square training tiles, in pixels")
    lr: float = option(2e-3, help="peak learning rate of AdamW")
    weight_decay: float = option(1e-4, help="AdamW weight decay (not on biases and normalisation weights)")
    warmup_steps: int = option(0, help="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = option(0.01, help="the cosine decays to lr x this")
    class_weighting: Literal["none", "median_frequency", "inverse_sqrt"] = option(
        "inverse_sqrt", help="loss weights from training pixel frequencies", choices=CLASS_WEIGHTINGS
    )
    ignore_index: int = option(255, help="mask value left out of the loss and the metrics")
    ignore_classes: tuple[int, ...] = option(
        (),
        help="class id left out of the loss and of the validation mIoU (repeatable)",
        flag="--ignore-class",
        metavar="ID",
        repeatable=True,
    )
    unknown_colours: Literal["error", "ignore"] = option(
        "error",
        help="a mask colour outside the classes: stop, or leave the pixel out of loss and metrics",
        choices=("error", "ignore"),
    )
    seed: int = option(0, help="seed of the weights' initialisation and of the training tiles")
    device: Literal["auto", "cpu", "cuda"] = option("auto", help="where to train", choices=DEVICES)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto",
        help="auto: bf16 autocast on CUDA (fp16 with loss scaling where bf16 is missing) and on CPUs with bf16 "
        "instructions, else fp32",
        choices=PRECISIONS,
    )
    max_grad_norm: float | None = option(None, help="clip the gradient norm to this (default: no clipping)")
    sample_by_area: bool = option(
        True, help="pick training images in proportion to their area (every labelled pixel equally likely)"
    )
    colour_jitter: float = option(
        0.0, help="per-band gain/offset augmentation strength, 0 <= j < 1 (see segpipe.models.data.TileDataset)"
    )
    scale_jitter: float = option(
        0.0, help="zoom augmentation strength s, 0 <= s <= 1: each tile covers 1/(1+s) to 1+s times its size"
    )
    saturation_jitter: float = option(
        0.0, help="saturation augmentation strength q, 0 <= q <= 1: colours scaled about their grey value by 1-q..1+q"
    )
    dice_weight: float = option(0.0, help="add this times the soft Dice loss (mean over classes) to cross-entropy")
    lovasz_weight: float = option(
        0.0, help="add this times the Lovasz-softmax loss (a surrogate of 1 - IoU per class) to cross-entropy"
    )
    ema_decay: float = option(
        0.0, help="validate and keep a moving average of the weights with this decay, 0 <= d < 1 (e.g. 0.995)"
    )
    resume: bool = option(False, help="continue from the last completed epoch in --out")
    num_threads: int | None = option(None, help="torch threads (default: torch's choice)", flag="--threads")
    num_workers: int = option(0, help="DataLoader worker processes (0: load in the training process)")
    halo: int = option(64, help="inference halo written into the checkpoint, in pixels")
    inference_tile_size: int = option(512, help="inference tile size written into the checkpoint, in pixels")
    val_tile_size: int = option(1024, help="validation images larger than this are predicted in tiles, in pixels")
    resolution: str | None = option(
        None,
        help="the pixel size of the training images, e.g. 0.5um (slide regions exported at 0.5 um per pixel), "
        "written into the checkpoint so slides are read at it (default: none stated)",
        metavar="SIZE",
    )
    progress: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "train_dirs", tuple(Path(p) for p in _as_seq(self.train_dirs)))
        set_(self, "val_dirs", tuple(Path(p) for p in _as_seq(self.val_dirs)))
        set_(self, "out_dir", Path(self.out_dir))
        set_(self, "arguments", dict(self.arguments))
        set_(self, "classes", tuple((str(n), str(c)) for n, c in self.classes))
        set_(self, "bands", tuple(self.bands))
        set_(self, "ignore_classes", tuple(int(i) for i in self.ignore_classes))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, tuple(float(v) for v in value))
                if len(getattr(self, name)) != len(self.bands):
                    raise ConfigError(f"expected {len(self.bands)} {name} values (one per band), got {value}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"expected std > 0, got {self.std}")
        if not self.train_dirs:
            raise ConfigError("expected at least one training folder in train_dirs, got none")
        overlap = {p.resolve() for p in self.train_dirs} & {p.resolve() for p in self.val_dirs}
        if overlap:
            raise ConfigError(
                f"expected validation folders apart from training folders, got both: {sorted(map(str, overlap))}"
            )
        for name in (
            "epochs",
            "steps_per_epoch",
            "batch_size",
            "tile_size",
            "inference_tile_size",
            "val_tile_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"expected {name} >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "halo", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"expected {name} >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"expected lr > 0, weight_decay >= 0 and 0 <= min_lr_ratio <= 1, got "
                f"{self.lr}, {self.weight_decay} and {self.min_lr_ratio}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"expected num_threads >= 1 or None, got {self.num_threads}")
        if not 0 <= self.colour_jitter < 1:
            raise ConfigError(f"expected 0 <= colour_jitter < 1 (0: no colour augmentation), got {self.colour_jitter}")
        if not 0 <= self.scale_jitter <= 1:
            raise ConfigError(f"expected 0 <= scale_jitter <= 1 (0: no scale augmentation), got {self.scale_jitter}")
        if not 0 <= self.saturation_jitter <= 1:
            raise ConfigError(
                f"expected 0 <= saturation_jitter <= 1 (0: no saturation augmentation), got {self.saturation_jitter}"
            )
        if not 0 <= self.dice_weight < math.inf:
            raise ConfigError(f"expected dice_weight >= 0 (0: cross-entropy alone), got {self.dice_weight}")
        if not 0 <= self.lovasz_weight < math.inf:
            raise ConfigError(f"expected lovasz_weight >= 0 (0: no Lovasz term), got {self.lovasz_weight}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"expected 0 <= ema_decay < 1 (0: no weight averaging), got {self.ema_decay}")
        if self.resolution is not None and parse_resolution(self.resolution) is None:
            raise ConfigError("expected the training images' pixel size as resolution (e.g. 0.5um), got native")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"expected max_grad_norm > 0 or None, got {self.max_grad_norm}")
        _check_choice("class_weighting", self.class_weighting, CLASS_WEIGHTINGS)
        _check_choice("unknown_colours", self.unknown_colours, ("error", "ignore"))
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        if not self.classes:
            raise ConfigError("expected at least one class, got none")
        for _, colour in self.classes:
            parse_colour(colour)
        k = len(self.classes)
        if self.arguments.get("num_classes", k) != k:
            raise ConfigError(
                f"expected arguments['num_classes'] == {k} (one per class), got {self.arguments['num_classes']}"
            )
        if self.arguments.get("in_channels", len(self.bands)) != len(self.bands):
            raise ConfigError(
                f"expected arguments['in_channels'] == {len(self.bands)} (one per band), got "
                f"{self.arguments['in_channels']}"
            )
        if not 0 <= self.ignore_index <= 255 or self.ignore_index < k:
            raise ConfigError(
                f"expected ignore_index in {k}..255 (not a class id; masks are uint8), got {self.ignore_index}"
            )
        bad = [i for i in self.ignore_classes if not 0 <= i < k]
        if bad:
            raise ConfigError(f"expected ignore_classes among class ids 0..{k - 1}, got {bad}")

    def fingerprint(self) -> dict[str, Any]:
        """The fields that decide the result, as JSON-compatible values (compared on resume)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in RESUMABLE_CHANGES or f.name == "out_dir":
                continue
            out[f.name] = json.loads(json.dumps(getattr(self, f.name), default=str))
        return out


def fingerprint_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Names of the fields that differ; a field missing from ``saved`` (a state written before the field
    existed) matches its default value."""
    defaults = {
        f.name: json.loads(json.dumps(f.default, default=str))
        for f in dataclasses.fields(TrainConfig)
        if f.default is not dataclasses.MISSING
    }
    missing = object()
    changed = []
    for name, value in current.items():
        old = saved.get(name, defaults.get(name, missing))
        if old != value:
            changed.append(name)
    changed += [name for name in saved if name not in current]
    return sorted(changed)


def _as_seq(value: Any) -> Sequence[Any]:
    return (value,) if isinstance(value, str | Path) else tuple(value)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"expected {name} in {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class EpochRecord:
    """One epoch's figures (``epoch`` counts from 1)."""

    epoch: int
    train_loss: float
    lr: float
    seconds: float
    val_miou: float | None = None
    val_iou: Mapping[str, float | None] = field(default_factory=dict)
    val_seconds: float = 0.0
    raw_val_miou: float | None = None


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        checkpoint: The best checkpoint's weights file (its ``.json`` metadata lies beside it).
        state: The resume state's tensors file (``last.json`` beside it).
        best_epoch: Epoch (from 1) of the best checkpoint.
        best_miou: Its validation mIoU (None without validation folders).
        per_class_iou: Its validation IoU by class name.
        history: One record per completed epoch.
        train_seconds: Wall time spent in all invocations, validation included.
        cpu_seconds: CPU time of the training process in all invocations (all its threads).
    """

    checkpoint: Path
    state: Path
    best_epoch: int
    best_miou: float | None
    per_class_iou: Mapping[str, float | None]
    history: tuple[EpochRecord, ...]
    train_seconds: float
    cpu_seconds: float = 0.0
