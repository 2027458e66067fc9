"""Train a segmentation network on image/mask folders, validate on held-out folders, keep the best checkpoint.

``train(TrainConfig(...))`` runs AdamW with a (warmup +) cosine learning-rate schedule on random tiles
(:class:`models.data.TileDataset`), computes the validation confusion matrix on whole held-out images after
every epoch, and keeps the checkpoint with the best validation mIoU (``<out_dir>/best.safetensors`` +
``.json``, written by :func:`models.checkpoint.save_checkpoint` with full metadata and provenance).

Weight averaging. With ``ema_decay`` > 0 an exponential moving average of the weights (and of the batch-norm
statistics) is kept beside the trained weights (:func:`ema_update`); it is what is validated, kept as the best
checkpoint and shipped, while the trained weights' validation mIoU is recorded beside it (``raw_val_miou``).

Resume. After every epoch the whole training state is written without pickle to ``<out_dir>/state/``:
``last.safetensors`` (model weights, optimizer moments, RNG states) and ``last.json`` (epoch, optimizer and
scheduler settings, history, best score, a fingerprint of the configuration, the sha256 of the tensors file).
Training tiles are a pure function of (seed, epoch, index), so no data-loader state is needed. Re-running the
same configuration with ``resume=True`` continues after the last completed epoch and, on the CPU, ends with
bit-identical weights to an uninterrupted run.

Determinism. On the CPU a fixed seed and thread count give identical results. On CUDA, cuDNN autotuning and
atomics make runs close but not identical.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.data import (
    DUBAI_CLASSES,
    ColourTable,
    TileDataset,
    band_statistics,
    class_weights,
    load_folders,
    normalise,
    parse_colour,
    pixel_counts,
)
from models.losses import lovasz_softmax_loss, soft_dice_loss
from pipeline.evaluate import EvaluationResult, confusion_matrix
from pipeline.infer import retain_freed_memory
from segpipe.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

STATE_VERSION = 1
#: Fields of :class:`TrainConfig` that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"resume", "num_threads", "progress", "device", "num_workers"})


def _default_arguments() -> dict[str, Any]:
    return {"in_channels": 3, "num_classes": 6, "base_channels": 16, "depth": 4}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; validated on construction.

    Attributes:
        train_dirs: Data folders to train on (each with ``images/`` and ``masks/``).
        out_dir: Where the best checkpoint (``best.*``) and the resume state (``state/``) go.
        val_dirs: Held-out data folders, validated on whole images after each epoch; none: the last epoch's
            weights are kept.
        architecture: Name for :func:`models.registry.build_model` ("attention_unet", "unet").
        arguments: Keyword arguments of the architecture (``in_channels`` must equal ``len(bands)``,
            ``num_classes`` must equal ``len(classes)``).
        classes: (name, "#RRGGBB") per class id; the colours also decode colour-coded masks.
        bands: Names of the input bands, in order.
        mean: Per-band normalisation mean in 0-255 units; None: computed from the training images.
        std: Per-band standard deviation in 0-255 units; None: computed from the training images.
        epochs: Number of epochs.
        steps_per_epoch: Optimizer steps per epoch.
        batch_size: Tiles per step.
        tile_size: Side of the square training tiles, in pixels.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and normalisation weights).
        warmup_steps: Linear warmup steps before the cosine decay.
        min_lr_ratio: The cosine decays to ``lr * min_lr_ratio``.
        class_weighting: Loss weights from training pixel frequencies: "none", "median_frequency" or
            "inverse_sqrt" (see :func:`models.data.class_weights`).
        ignore_index: Mask value left out of the loss and the metrics.
        ignore_classes: Class ids left out of the loss and of the validation mIoU (e.g. "unlabeled").
        unknown_colours: "error" (a mask colour outside ``classes`` stops the run) or "ignore" (such pixels
            get ``ignore_index``).
        seed: Seed for the weights' initialisation and the training tiles.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        precision: "auto" (CUDA: bf16 autocast if supported, else fp16 with loss scaling; CPU: bf16 autocast
            if the CPU has bf16 instructions, else fp32), "fp32", "bf16" (autocast, CPU or CUDA) or "fp16"
            (CUDA only, with loss scaling).
        max_grad_norm: Clip the gradient norm to this value; None: no clipping.
        sample_by_area: Pick training images with probability proportional to their area (every labelled
            pixel equally likely); False: every image equally likely.
        colour_jitter: Strength j of the per-tile colour augmentation (0: none; see
            :class:`models.data.TileDataset`).
        scale_jitter: Strength s of the per-tile zoom augmentation, factors 1/(1+s)..1+s (0: none; see
            :class:`models.data.TileDataset`).
        saturation_jitter: Strength q of the per-tile saturation augmentation, factors 1-q..1+q (0: none;
            see :class:`models.data.TileDataset`).
        dice_weight: w in loss = cross-entropy + w * soft Dice (:func:`models.losses.soft_dice_loss`, over the
            classes not in ``ignore_classes``); 0: cross-entropy alone.
        lovasz_weight: w in loss = cross-entropy + w * Lovasz-softmax (:func:`models.losses.lovasz_softmax_loss`,
            a surrogate of 1 - IoU per class); 0: none.
        ema_decay: Decay of the moving average of the weights (:func:`ema_update`; e.g. 0.995 averages over
            roughly the last 200 steps); 0: no averaging, the trained weights are validated and kept.
        resume: Continue from ``out_dir/state`` if present (an error if it belongs to another configuration).
        num_threads: torch intra-op threads; None leaves torch's default.
        num_workers: DataLoader worker processes (0: load in the training process).
        halo: Recommended inference halo written into the checkpoint, in pixels.
        inference_tile_size: Recommended inference tile size written into the checkpoint, in pixels.
        val_tile_size: Validation images larger than this are predicted in overlapping windows.
        progress: Show a tqdm progress bar.
    """

    train_dirs: tuple[Path, ...]
    out_dir: Path
    val_dirs: tuple[Path, ...] = ()
    architecture: str = "attention_unet"
    arguments: Mapping[str, Any] = field(default_factory=_default_arguments)
    classes: tuple[tuple[str, str], ...] = DUBAI_CLASSES
    bands: tuple[str, ...] = ("red", "green", "blue")
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    epochs: int = 20
    steps_per_epoch: int = 100
    batch_size: int = 8
    tile_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01
    class_weighting: Literal["none", "median_frequency", "inverse_sqrt"] = "inverse_sqrt"
    ignore_index: int = 255
    ignore_classes: tuple[int, ...] = ()
    unknown_colours: Literal["error", "ignore"] = "error"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_grad_norm: float | None = None
    sample_by_area: bool = True
    colour_jitter: float = 0.0
    scale_jitter: float = 0.0
    saturation_jitter: float = 0.0
    dice_weight: float = 0.0
    lovasz_weight: float = 0.0
    ema_decay: float = 0.0
    resume: bool = False
    num_threads: int | None = None
    num_workers: int = 0
    halo: int = 64
    inference_tile_size: int = 512
    val_tile_size: int = 1024
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
            raise ConfigError(
                f"expected 0 <= scale_jitter <= 1 (0: no scale augmentation), got {self.scale_jitter}"
            )
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
        _check_choice("class_weighting", self.class_weighting, ("none", "median_frequency", "inverse_sqrt"))
        _check_choice("unknown_colours", self.unknown_colours, ("error", "ignore"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
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


def _fingerprint_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
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


class WarmupCosine:
    """Learning-rate factor per step: linear warmup, then cosine decay to ``min_ratio`` (plain numbers only,
    so the scheduler's ``state_dict`` is JSON)."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup = warmup
        self.total = total
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but torch sees no CUDA device; use device='cpu' or 'auto'")
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether the CPU has native bf16 instructions (AVX512-BF16 or AMX-BF16; read from /proc/cpuinfo, so
    False off Linux). There, bf16 autocast halves the CPU time of a training step; elsewhere it is emulated
    and slower than fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _pick_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if device.type != "cuda":
        if choice == "fp16":
            raise ConfigError("precision='fp16' needs CUDA; on the CPU use 'fp32', 'bf16' or 'auto'")
        return torch.bfloat16 if choice == "bf16" or (choice == "auto" and cpu_has_bf16()) else None
    if choice == "fp32":
        return None
    if choice == "bf16" or (choice == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """Move ``average``'s weights and buffers towards ``model``'s: a <- a + (1 - d) * (m - a).

    ``d = min(decay, (1 + step) / (10 + step))`` (``step`` counts optimizer steps from 0), so the first steps
    are not dominated by the random initialisation. Integer buffers (batch-norm step counters) are copied.
    torch's ``AveragedModel`` has no such warm-up, hence these few lines.
    """
    d = min(decay, (1 + step) / (10 + step))
    for a, m in zip(average.state_dict().values(), model.state_dict().values(), strict=True):
        if a.dtype.is_floating_point:
            a.lerp_(m, 1 - d)
        else:
            a.copy_(m)


def predict_image(
    model: nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    size_multiple: int = 1,
    window: int = 1024,
    halo: int = 64,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Class ids (H, W) uint8 for one whole (C, H, W) image, 0-255 units.

    Each window is reflect-padded up to a multiple of ``size_multiple``; an image larger than ``window`` is
    cut into windows whose cores (``window - 2 * halo`` wide, rounded down to a multiple of ``size_multiple``)
    tile the image and whose halos are dropped. Window origins are multiples of ``size_multiple``, so the
    network's pooling grid stays aligned with the whole image's.
    """
    device = torch.device(device)
    x = torch.from_numpy(normalise(image, mean, std))
    _, h, w = x.shape
    out = np.empty((h, w), dtype=np.uint8)
    m = max(size_multiple, 1)
    core = (window - 2 * halo) // m * m if max(h, w) > window else max(h, w)
    if core < 1:
        raise ConfigError(
            f"expected window > 2 * halo + size_multiple, got window {window}, halo {halo} and "
            f"size_multiple {size_multiple}"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for y0 in range(0, h, core):
                for x0 in range(0, w, core):
                    y1, x1 = min(y0 + core, h), min(x0 + core, w)
                    ya, xa = max((y0 - halo) // m * m, 0), max((x0 - halo) // m * m, 0)
                    yb, xb = min(y1 + halo, h), min(x1 + halo, w)
                    crop = x[:, ya:yb, xa:xb].unsqueeze(0).to(device)
                    ph = (-crop.shape[2]) % size_multiple
                    pw = (-crop.shape[3]) % size_multiple
                    if ph or pw:
                        mode = "reflect" if ph < crop.shape[2] and pw < crop.shape[3] else "replicate"
                        crop = F.pad(crop, (0, pw, 0, ph), mode=mode)
                    with torch.autocast(
                        device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                    ):
                        logits = model(crop)
                    labels = logits[0, :, : yb - ya, : xb - xa].argmax(0).to("cpu", torch.uint8).numpy()
                    out[y0:y1, x0:x1] = labels[y0 - ya : y1 - ya, x0 - xa : x1 - xa]
    finally:
        model.train(was_training)
    return out


def validate(
    model: nn.Module,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    ignore_index: int = 255,
    ignore_classes: Sequence[int] = (),
    size_multiple: int = 1,
    window: int = 1024,
    halo: int = 64,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> EvaluationResult:
    """Confusion matrix and metrics of ``model`` on whole images (pixels at ``ignore_index`` or of
    ``ignore_classes`` in the mask are skipped; ignored classes are left out of the mIoU)."""
    k = len(class_names)
    total = np.zeros((k, k), dtype=np.int64)
    skipped = 0
    for image, mask in zip(images, masks, strict=True):
        pred = predict_image(
            model,
            image,
            mean,
            std,
            size_multiple=size_multiple,
            window=window,
            halo=halo,
            device=device,
            autocast_dtype=autocast_dtype,
        )
        valid = (mask != ignore_index) & ~np.isin(mask, list(ignore_classes))
        skipped += int((~valid).sum())
        total += confusion_matrix(mask, pred, k, valid=valid)
    return EvaluationResult.from_confusion(
        total, class_names=class_names, ignored=ignore_classes, ignored_pixels=skipped
    )


# --- resume state (safetensors + JSON, no pickle) -------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".segpipe-partial")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True))
    os.replace(tmp, path)


def _save_state(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    info: Mapping[str, Any],
    average: nn.Module | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
    }
    if average is not None:
        tensors.update({f"ema.{k}": v.detach().to("cpu").contiguous().clone() for k, v in average.state_dict().items()})
    opt = optimizer.state_dict()
    opt_extra: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                opt_extra.setdefault(str(idx), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state: Any = np.random.get_state()
    py_state: Any = random.getstate()
    data = {
        **info,
        "version": STATE_VERSION,
        "optimizer": {"param_groups": opt["param_groups"], "state": opt_extra},
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
        },
    }
    try:
        text = json.dumps(data)
    except TypeError as exc:  # a torch upgrade put a non-JSON value in a state_dict: fail loudly
        raise ModelError(f"training state is not JSON-serialisable ({exc}); refusing to fall back to pickle") from None
    del text
    weights = directory / "last.safetensors"
    tmp = weights.with_name(weights.name + ".segpipe-partial")
    save_file(tensors, str(tmp), metadata={"format": "segpipe-train-state"})
    os.replace(tmp, weights)
    data["tensors_sha256"] = _sha256(weights)
    _write_json(directory / "last.json", data)
    return weights


def _load_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights, meta = directory / "last.safetensors", directory / "last.json"
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{meta}: cannot read the training state ({exc}); delete {directory} to start over") from None
    if data.get("version") != STATE_VERSION:
        raise ModelError(
            f"{meta}: state version {data.get('version')}, expected {STATE_VERSION}; delete {directory} to start over"
        )
    if not weights.is_file() or _sha256(weights) != data.get("tensors_sha256"):
        raise ModelError(
            f"{weights} is missing or does not match {meta} (interrupted while saving?); delete "
            f"{directory} to start over"
        )
    return load_file(str(weights)), data


def _restore(
    tensors: Mapping[str, torch.Tensor],
    data: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    average: nn.Module | None = None,
) -> None:
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    if average is not None:
        average.load_state_dict({k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    for idx, extra in data["optimizer"]["state"].items():
        opt_state.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict({"state": opt_state, "param_groups": data["optimizer"]["param_groups"]})
    scheduler.load_state_dict(data["scheduler"])
    if data["scaler"]:
        scaler.load_state_dict(data["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    np_state = data["rng"]["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    py_state = data["rng"]["python"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))


def _record_from_json(d: Mapping[str, Any]) -> EpochRecord:
    names = {f.name for f in dataclasses.fields(EpochRecord)}
    return EpochRecord(**{k: v for k, v in d.items() if k in names})


def _clean(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


# --- training -----------------------------------------------------------------------------------------


def train(config: TrainConfig, *, on_epoch_end: Callable[[EpochRecord], None] | None = None) -> TrainResult:
    """Train ``config.architecture`` on ``config.train_dirs``; see the module docstring.

    Args:
        config: The run's configuration.
        on_epoch_end: Called with each completed epoch's record, after its state is saved (an exception
            raised there stops training; the run can be resumed).

    Returns:
        The best checkpoint's path and scores, and the per-epoch history.

    Raises:
        ConfigError: inconsistent options, or ``out_dir`` holds another run's state.
        InputError: unreadable or inconsistent data.
    """
    from models.checkpoint import ClassInfo, ModelMetadata, save_checkpoint
    from models.registry import build_model

    started, cpu_started = time.perf_counter(), time.process_time()
    device = _pick_device(config.device)
    autocast_dtype = _pick_precision(config.precision, device)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    out_dir = config.out_dir
    state_dir = out_dir / "state"
    best_path = out_dir / "best.safetensors"
    fingerprint = config.fingerprint()
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    if (state_dir / "last.json").exists():
        if not config.resume:
            raise ConfigError(
                f"{out_dir} already holds a training state; pass resume=True to continue it, "
                f"or choose another out_dir (or delete {state_dir})"
            )
        saved = _load_state(state_dir)
        diff = _fingerprint_changes(saved[1]["config"], fingerprint)
        if diff:
            raise ConfigError(
                f"{out_dir} holds the state of a run with other settings ({', '.join(diff)}); "
                f"use the same settings to resume, or another out_dir"
            )
    elif config.resume:
        log.info("no training state in %s: starting from scratch", state_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    class_names = [n for n, _ in config.classes]
    k = len(class_names)
    table = ColourTable.from_hex(c for _, c in config.classes)
    load_kw: dict[str, Any] = {
        "colour_table": table,
        "num_classes": k,
        "unknown": config.unknown_colours,
        "ignore_index": config.ignore_index,
    }
    images, masks, pairs = load_folders(config.train_dirs, **load_kw)
    val_images, val_masks, val_pairs = load_folders(config.val_dirs, **load_kw) if config.val_dirs else ([], [], [])
    if images[0].shape[0] != len(config.bands):
        raise ConfigError(
            f"expected {len(config.bands)} bands ({', '.join(config.bands)}) in the images, "
            f"got {images[0].shape[0]} in {pairs[0].image}"
        )
    if config.mean is None or config.std is None:
        mean, std = band_statistics(images)
    else:
        mean, std = config.mean, config.std
    counts = pixel_counts(masks, k)
    weights = (
        class_weights(counts, config.class_weighting, exclude=config.ignore_classes)
        if config.class_weighting != "none"
        else None
    )
    log.info(
        "training on %d pairs (%d Mpx) from %d folders, validating on %d pairs; mean %s std %s; class weights %s",
        len(pairs),
        int(counts.sum() // 1_000_000),
        len(config.train_dirs),
        len(val_pairs),
        np.round(mean, 2).tolist(),
        np.round(std, 2).tolist(),
        None if weights is None else np.round(weights, 3).tolist(),
    )

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        retain_freed_memory()
    # channels-last activations: oneDNN's convolutions (CPU) and cuDNN's (GPU) run faster on them; on 2 EPYC
    # cores an fp32 step of the default model (8 tiles of 256 px) takes 1.72 s instead of 2.17 s, and 3.51 s
    # with neither this nor the malloc setting above (benchmarks/bench_train_step.py). Saved tensors are made
    # contiguous again.
    model = build_model(config.architecture, config.arguments)
    # torch's stubs for Module.to omit the memory_format keyword that it accepts
    model = model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    size_multiple = int(getattr(model, "size_multiple", 1))
    if config.tile_size % size_multiple:
        raise ConfigError(
            f"expected tile_size to be a multiple of {size_multiple} for {config.architecture} "
            f"{dict(config.arguments)}, got {config.tile_size}"
        )
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay), lr=config.lr)
    total_steps = config.epochs * config.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup_steps, total_steps, config.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device),
        ignore_index=config.ignore_index,
    )
    ignored_ids = torch.tensor(config.ignore_classes, dtype=torch.int64, device=device)
    average: nn.Module | None = None
    if config.ema_decay:
        average = copy.deepcopy(model).requires_grad_(False)  # no new initialisation: the RNG stream is unchanged
    kept = average if average is not None else model  # the weights validated, kept and shipped

    history: list[EpochRecord] = []
    best_epoch, best_miou, best_iou = 0, -math.inf, {}
    previous_seconds = previous_cpu = 0.0
    start_epoch = 0
    if saved is not None:
        tensors, data = saved
        _restore(tensors, data, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, average=average)
        start_epoch = int(data["epoch"])
        history = [_record_from_json(r) for r in data["history"]]
        best_epoch = int(data["best_epoch"])
        best_miou = -math.inf if data["best_miou"] is None else float(data["best_miou"])
        best_iou = dict(data["best_iou"])
        previous_seconds = float(data["train_seconds"])
        previous_cpu = float(data["cpu_seconds"])
        if start_epoch > 0 and not best_path.exists():
            raise ModelError(
                f"{best_path} is missing but {state_dir} says epoch {start_epoch} is done; "
                f"delete {out_dir} to start over"
            )
        log.info("resuming after epoch %d of %d from %s", start_epoch, config.epochs, state_dir)

    dataset = TileDataset(
        images,
        masks,
        tile_size=config.tile_size,
        mean=mean,
        std=std,
        length=config.steps_per_epoch * config.batch_size,
        seed=config.seed,
        ignore_index=config.ignore_index,
        weight_by_area=config.sample_by_area,
        colour_jitter=config.colour_jitter,
        scale_jitter=config.scale_jitter,
        saturation_jitter=config.saturation_jitter,
    )
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=False,
        drop_last=True,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )

    def elapsed() -> tuple[float, float]:
        return (
            previous_seconds + time.perf_counter() - started,
            previous_cpu + time.process_time() - cpu_started,
        )

    def metadata(epoch: int, result: EvaluationResult | None) -> ModelMetadata:
        seconds, cpu_seconds = elapsed()
        provenance = {
            "trained": True,
            "data": [str(p) for p in config.train_dirs],
            "validation_data": [str(p) for p in config.val_dirs],
            "train_pairs": len(pairs),
            "epochs": epoch,
            "epochs_planned": config.epochs,
            "steps_per_epoch": config.steps_per_epoch,
            "batch_size": config.batch_size,
            "tile_size": config.tile_size,
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "class_weighting": config.class_weighting,
            "sample_by_area": config.sample_by_area,
            "colour_jitter": config.colour_jitter,
            "scale_jitter": config.scale_jitter,
            "saturation_jitter": config.saturation_jitter,
            "dice_weight": config.dice_weight,
            "lovasz_weight": config.lovasz_weight,
            "ema_decay": config.ema_decay,
            "class_weights": None if weights is None else [round(float(w), 6) for w in weights],
            "ignore_classes": [class_names[i] for i in config.ignore_classes],
            "seed": config.seed,
            "val_iou": {} if result is None else result.per_class_iou(),
            "val_miou": None if result is None else _clean(result.miou),
            "train_seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "torch_version": torch.__version__,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "precision": "fp32" if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
            "num_threads": torch.get_num_threads(),
        }
        return ModelMetadata(
            architecture=config.architecture,
            arguments=dict(config.arguments),
            classes=tuple(ClassInfo(n, c.upper()) for n, c in config.classes),
            bands=config.bands,
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            tile_size=config.inference_tile_size,
            halo=config.halo,
            size_multiple=size_multiple,
            provenance=provenance,
        )

    def validate_weights(net: nn.Module) -> EvaluationResult:
        return validate(
            net,
            val_images,
            val_masks,
            mean=mean,
            std=std,
            class_names=class_names,
            ignore_index=config.ignore_index,
            ignore_classes=config.ignore_classes,
            size_multiple=size_multiple,
            window=config.val_tile_size,
            halo=config.halo,
            device=device,
            autocast_dtype=autocast_dtype,
        )

    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        dataset.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        steps = 0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not config.progress,
            leave=False,
            mininterval=5.0,
            dynamic_ncols=True,
        )
        for x, y in bar:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            if ignored_ids.numel():
                y = torch.where(torch.isin(y, ignored_ids), config.ignore_index, y)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            if config.dice_weight:
                loss = loss + config.dice_weight * soft_dice_loss(
                    logits, y, ignore_index=config.ignore_index, exclude=config.ignore_classes
                )
            if config.lovasz_weight:
                loss = loss + config.lovasz_weight * lovasz_softmax_loss(
                    logits, y, ignore_index=config.ignore_index, exclude=config.ignore_classes
                )
            if not torch.isfinite(loss):
                raise ModelError(
                    f"loss is {loss.item()} at epoch {epoch + 1} step {steps + 1}; lower lr "
                    f"(now {config.lr}) or use precision='fp32'"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if average is not None:
                ema_update(average, model, config.ema_decay, epoch * config.steps_per_epoch + steps)
            loss_sum += loss.detach().to("cpu", torch.float64)
            steps += 1
            if steps % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}")
        bar.close()
        train_loss = loss_sum.item() / max(steps, 1)
        train_time = time.perf_counter() - epoch_started
        result: EvaluationResult | None = None
        raw_miou: float | None = None
        val_started = time.perf_counter()
        if val_images:
            result = validate_weights(kept)
            if average is not None:
                raw_miou = _clean(validate_weights(model).miou)
        val_time = time.perf_counter() - val_started
        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=train_loss,
            lr=float(optimizer.param_groups[0]["lr"]),
            seconds=round(train_time, 2),
            val_miou=None if result is None else _clean(result.miou),
            val_iou={} if result is None else result.per_class_iou(),
            val_seconds=round(val_time, 2),
            raw_val_miou=raw_miou,
        )
        history.append(record)
        val_score = record.val_miou if record.val_miou is not None else -math.inf
        score = float(epoch) if result is None else val_score
        if result is None or best_epoch == 0 or score > best_miou:
            best_epoch, best_miou, best_iou = epoch + 1, score, dict(record.val_iou)
            save_checkpoint(kept, metadata(epoch + 1, result), best_path)
        info = {
            "config": fingerprint,
            "epoch": epoch + 1,
            "history": [dataclasses.asdict(r) for r in history],
            "best_epoch": best_epoch,
            "best_miou": None if result is None else _clean(best_miou),
            "best_iou": best_iou,
            "train_seconds": elapsed()[0],
            "cpu_seconds": elapsed()[1],
            "mean": list(mean),
            "std": list(std),
        }
        _save_state(
            state_dir, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, info=info, average=average
        )
        iou_text = " ".join(f"{n} {v:.3f}" if v is not None else f"{n} -" for n, v in record.val_iou.items())
        log.info(
            "epoch %d/%d loss %.4f lr %.2e %.0f s%s%s%s",
            epoch + 1,
            config.epochs,
            train_loss,
            record.lr,
            train_time,
            "" if result is None else f" | val mIoU {record.val_miou:.4f} ({iou_text}) {val_time:.0f} s",
            "" if raw_miou is None else f" | trained weights {raw_miou:.4f}",
            " *best*" if best_epoch == epoch + 1 else "",
        )
        if on_epoch_end is not None:
            on_epoch_end(record)

    total_seconds, total_cpu = elapsed() if start_epoch < config.epochs else (previous_seconds, previous_cpu)
    return TrainResult(
        checkpoint=best_path,
        state=state_dir / "last.safetensors",
        best_epoch=best_epoch,
        best_miou=None if not val_images or best_miou == -math.inf else best_miou,
        per_class_iou=best_iou,
        history=tuple(history),
        train_seconds=round(total_seconds, 1),
        cpu_seconds=round(total_cpu, 1),
    )
