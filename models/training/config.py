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

from segpipe.core.bands import parse_bands
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
#: Suffixes of the polygon label files ``--labels`` reads (through pyogrio: GeoJSON, GeoPackage).
LABEL_SUFFIXES = (".geojson", ".json", ".gpkg")

#: The network of a run that names none (and starts from no --init checkpoint).
DEFAULT_ARCHITECTURE = "attention_unet"
#: Its widths; ``in_channels`` comes from the images' bands and ``num_classes`` from the classes.
DEFAULT_WIDTHS: Mapping[str, int] = {"base_channels": 16, "depth": 4}
#: Inference tile and halo written into new checkpoints, in pixels: the run defaults (docs/cli.md, ``--tile-size``,
#: ``--halo``): the attention U-Net's channel attention pools over the whole tile, so the tile size matters far more
#: than the halo; 1024 + 32 px leaves 2.9 % of pixels differing from whole-image inference, 512 + 64 px 5.2 %.
DEFAULT_INFERENCE_TILE, DEFAULT_INFERENCE_HALO = 1024, 32


@dataclass(frozen=True, kw_only=True)
class NetworkOptions:
    """The options of ``segpipe train`` that become a :class:`TrainConfig`'s ``arguments`` (the architecture's widths,
    each None for the architecture's own) and ``classes`` (the class table), which a configuration holds as a
    mapping and a table rather than as options of their own. Checked on construction."""

    base_channels: int | None = option(None, help="channels of the first stage (default: the architecture's)")
    depth: int | None = option(None, help="down-sampling stages (default: the architecture's)")
    downsample: int | None = option(
        None,
        help="run the network at 1/N of the input resolution (input averaged over N x N blocks, logits "
        "upsampled back; default: 1)",
    )
    classes: str | None = option(
        None,
        help="name:#RRGGBB,... in class-id order (default: the --init checkpoint's, else the Dubai aerial classes "
        "and mask colours)",
    )

    def __post_init__(self) -> None:
        for name in ("base_channels", "depth", "downsample"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        self.class_table()

    def widths(self) -> dict[str, int]:
        """The widths given, as arguments of the architecture (those not given are left out)."""
        given = {"base_channels": self.base_channels, "depth": self.depth, "downsample": self.downsample}
        return {name: value for name, value in given.items() if value is not None}

    def class_table(self) -> tuple[tuple[str, str], ...] | None:
        """``--classes water:#0000FF,land:#00FF00`` as ``(("water", "#0000FF"), ("land", "#00FF00"))``; None when
        not given.

        Raises:
            ConfigError: an item that is not ``name:colour``.
        """
        if not self.classes:
            return None
        try:
            return tuple((n, c) for n, c in (item.split(":", 1) for item in self.classes.split(",")))
        except ValueError:
            raise ConfigError(f"--classes must look like name:#RRGGBB,name:#RRGGBB; got {self.classes!r}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; validated on construction. Each field's help says what it is.

    ``train_dirs``, ``out_dir``, ``val_dirs``, ``arguments``, ``classes``, ``mean`` and ``std`` are set by the caller
    (``segpipe train`` has positional arguments and ``--classes``, ``--base-channels``, ``--depth``, ``--downsample``
    for them). What is left None is resolved when the run starts (:func:`segpipe.models.training.inputs.prepare`):
    ``bands`` from the images' band descriptions or colour interpretations, ``arguments['in_channels']`` from their
    number of bands, and, with ``init``, ``architecture``, ``arguments``, ``classes``, ``mean`` and ``std`` from that
    checkpoint's metadata; otherwise ``architecture`` is :data:`DEFAULT_ARCHITECTURE`, ``arguments`` the
    :data:`DEFAULT_WIDTHS`, ``classes`` the Dubai classes, and ``mean``/``std`` are computed from the training images
    (per band, in the images' own units).
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
    architecture: str | None = option(
        None,
        help="network: a name of segpipe.models.registry (attention_unet, unet); default attention_unet, or the "
        "--init checkpoint's",
    )
    arguments: Mapping[str, Any] | None = None
    classes: tuple[tuple[str, str], ...] | None = None
    bands: tuple[str, ...] | None = option(
        None,
        help="names of the model's input bands, comma-separated, one per band trained on (STAC common names such "
        "as blue,green,red,nir); default: the images' band descriptions or colour interpretations",
        flag="--band-names",
        metavar="NAMES",
    )
    select_bands: str | None = option(
        None,
        help="the bands of the images to train on, in the model's order: numbers (2,3,4,8) or names (blue,green,"
        "red,nir, or the files' descriptions such as B8); default: every band",
        flag="--bands",
        metavar="BANDS",
    )
    labels: Path | None = option(
        None,
        help="polygons labelling the images (GeoJSON or GeoPackage), rasterised onto each image's grid instead of "
        "masks/ (the data folders then need only images/, georeferenced)",
        metavar="FILE",
    )
    label_field: str | None = option(
        None,
        help="the polygons' attribute holding class names or class ids (default: every polygon is class 1, the "
        "first class the background)",
        metavar="NAME",
    )
    label_layer: str | None = option(
        None, help="the layer of a --labels file with several (default: its first)", metavar="NAME"
    )
    label_fill: int = option(
        0, help="class id of the pixels no polygon covers; the ignore index (255) leaves them out of the loss"
    )
    init: Path | None = option(
        None,
        help="start from this checkpoint's weights (fine-tuning): its architecture, arguments, bands, "
        "normalisation and, without --classes, classes",
        metavar="CHECKPOINT",
    )
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
        help="a mask colour (or a polygon's class) outside the classes: stop, or leave its pixels out of loss and "
        "metrics",
        choices=("error", "ignore"),
    )
    seed: int = option(0, help="seed of the weights' initialisation and of the training tiles")
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", help="where to train (cuda: the first GPU; an error where there is none)", choices=DEVICES
    )
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
    halo: int = option(
        DEFAULT_INFERENCE_HALO,
        help="inference halo written into the checkpoint (also the validation tiles' halo), in pixels",
    )
    inference_tile_size: int = option(
        DEFAULT_INFERENCE_TILE, help="inference tile size written into the checkpoint, in pixels"
    )
    val_tile_size: int = option(1024, help="validation images larger than this are predicted in tiles, in pixels")
    resolution: str | None = option(
        None,
        help="the pixel size of the training images, e.g. 0.5um (slide regions exported at 0.5 um per pixel), "
        "written into the checkpoint so slides are read at it (default: none stated)",
        metavar="SIZE",
    )
    progress: bool = True

    def __post_init__(self) -> None:
        self._normalise()
        self._check_numbers()
        self._check_choices()
        if self.classes is not None:
            self._check_classes(self.classes)
        if self.bands is not None:
            self._check_bands(self.bands)

    def _normalise(self) -> None:
        """Turn the fields into their canonical types (paths, tuples, floats) and fill the plain defaults."""
        set_ = object.__setattr__
        set_(self, "train_dirs", tuple(Path(p) for p in _as_seq(self.train_dirs)))
        set_(self, "val_dirs", tuple(Path(p) for p in _as_seq(self.val_dirs)))
        set_(self, "out_dir", Path(self.out_dir))
        for name in ("labels", "init"):
            if getattr(self, name) is not None:
                set_(self, name, Path(getattr(self, name)))
        if self.init is None:
            set_(self, "architecture", self.architecture or DEFAULT_ARCHITECTURE)
            set_(self, "classes", DUBAI_CLASSES if self.classes is None else self.classes)
            set_(self, "arguments", dict(DEFAULT_WIDTHS) if self.arguments is None else self.arguments)
        if self.arguments is not None:
            set_(self, "arguments", dict(self.arguments))
        if self.classes is not None:
            set_(self, "classes", tuple((str(n), str(c)) for n, c in self.classes))
            if self.arguments is not None and "num_classes" not in self.arguments:
                set_(self, "arguments", {**self.arguments, "num_classes": len(self.classes)})
        if isinstance(self.bands, str):  # --band-names red,green,blue
            set_(self, "bands", tuple(b.strip() for b in self.bands.split(",")))
        elif self.bands is not None:
            set_(self, "bands", tuple(self.bands))
        set_(self, "ignore_classes", tuple(int(i) for i in self.ignore_classes))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, tuple(float(v) for v in value))
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"expected std > 0, got {self.std}")
        if not self.train_dirs:
            raise ConfigError("expected at least one training folder in train_dirs, got none")
        overlap = {p.resolve() for p in self.train_dirs} & {p.resolve() for p in self.val_dirs}
        if overlap:
            raise ConfigError(
                f"expected validation folders apart from training folders, got both: {sorted(map(str, overlap))}"
            )

    def _check_numbers(self) -> None:
        """Counts, sizes, rates and augmentation strengths in their ranges."""
        for name in ("epochs", "steps_per_epoch", "batch_size", "tile_size", "inference_tile_size", "val_tile_size"):
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
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"expected max_grad_norm > 0 or None, got {self.max_grad_norm}")

    def _check_choices(self) -> None:
        """Named choices, the resolution, the band selection and the label options."""
        if self.resolution is not None and parse_resolution(self.resolution) is None:
            raise ConfigError("expected the training images' pixel size as resolution (e.g. 0.5um), got native")
        _check_choice("class_weighting", self.class_weighting, CLASS_WEIGHTINGS)
        _check_choice("unknown_colours", self.unknown_colours, ("error", "ignore"))
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        if self.select_bands is not None:
            parse_bands(self.select_bands)
        if self.labels is None and (self.label_field is not None or self.label_layer is not None):
            raise ConfigError("--label-field and --label-layer describe a --labels file; give --labels FILE too")
        if self.labels is not None and self.labels.suffix.lower() not in LABEL_SUFFIXES:
            raise ConfigError(
                f"expected --labels to be a GeoJSON or GeoPackage file ({', '.join(LABEL_SUFFIXES)}), got {self.labels}"
            )

    def _check_classes(self, classes: tuple[tuple[str, str], ...]) -> None:
        """The class table against the network's outputs, the ignore index and the label fill."""
        if not classes:
            raise ConfigError("expected at least one class, got none")
        for _, colour in classes:
            parse_colour(colour)
        k = len(classes)
        if self.arguments is not None and self.arguments.get("num_classes", k) != k:
            raise ConfigError(
                f"expected arguments['num_classes'] == {k} (one per class), got {self.arguments['num_classes']}"
            )
        if not 0 <= self.ignore_index <= 255 or self.ignore_index < k:
            raise ConfigError(
                f"expected ignore_index in {k}..255 (not a class id; masks are uint8), got {self.ignore_index}"
            )
        bad = [i for i in self.ignore_classes if not 0 <= i < k]
        if bad:
            raise ConfigError(f"expected ignore_classes among class ids 0..{k - 1}, got {bad}")
        if not (0 <= self.label_fill < k or self.label_fill == self.ignore_index):
            raise ConfigError(
                f"expected label_fill to be a class id 0..{k - 1} or the ignore index {self.ignore_index}, "
                f"got {self.label_fill}"
            )
        if self.labels is not None and self.label_field is None and k < 2:
            raise ConfigError(
                "without --label-field every polygon is class 1; give at least two classes (background first)"
            )

    def _check_bands(self, bands: tuple[str, ...]) -> None:
        """Band names: non-empty, unique, one per ``mean``/``std`` value and per input channel."""
        if not bands or any(not b for b in bands) or len({b.lower() for b in bands}) != len(bands):
            raise ConfigError(f"expected distinct, non-empty band names, got {','.join(bands)!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != len(bands):
                raise ConfigError(f"expected {len(bands)} {name} values (one per band), got {value}")
        if self.arguments is not None and self.arguments.get("in_channels", len(bands)) != len(bands):
            raise ConfigError(
                f"expected arguments['in_channels'] == {len(bands)} (one per band), got "
                f"{self.arguments['in_channels']}"
            )

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
