"""Validate a run before any work starts and resolve its settings into a :class:`RunPlan`.

Everything a user can get wrong is checked here, in about a second: the scene, the model and its fit to the
scene, tile size and halo, and the output paths. The stages then run on a plan that is known to be sound.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.blend import BLENDS
from pipeline.read import SceneInfo, describe_scene
from pipeline.tile import TileGrid, validate_tiling
from segpipe.errors import ConfigError, ModelError, OutputError

OUTPUT_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class RunSettings:
    """What the user asked for (the CLI's options); None means "use the model's or the machine's default"."""

    input: str
    output: str
    model: str = "default"
    tile_size: int | None = None
    halo: int | None = None
    blend: str = "crop"
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    work_dir: str | None = None
    probabilities: str | None = None
    ray_address: str | None = None
    overwrite: bool = False
    executor: str = "ray"


@dataclass(frozen=True)
class ModelSummary:
    """The part of a model's metadata the pipeline needs (JSON-friendly)."""

    name: str
    path: str
    checksum: str
    architecture: str
    classes: tuple[str, ...]
    colours: tuple[str, ...]
    bands: tuple[str, ...]
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunPlan:
    """A validated, fully resolved run."""

    settings: RunSettings
    scene: SceneInfo
    model: ModelSummary
    tile_size: int
    halo: int
    batch_size: int
    grid: TileGrid

    @property
    def summary_path(self) -> Path:
        out = Path(self.settings.output)
        return out.with_name(out.stem + ".summary.json")


def _check_output(path: str, what: str, overwrite: bool) -> None:
    out = Path(path)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(
            f"{what} {path!r} must end in .tif or .tiff (it is written as a Cloud Optimized GeoTIFF)"
        )
    if out.is_dir():
        raise OutputError(f"{what} {path!r} is a directory; give a file name such as {out / 'mask.tif'}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"the directory of {what} {path!r}, {parent}, is a file; give a path in a directory")
    if not parent.is_dir():
        raise OutputError(f"the directory of {what} {path!r} does not exist; create {parent} first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path!r}: directory {parent} is not writable")
    try:  # os.access says yes to root everywhere, and to read-only mounts, /proc and /sys: try for real
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".segpipe-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"cannot write {what} {path!r}: directory {parent} is not writable ({exc.strerror or exc})"
        ) from None
    if out.exists() and not overwrite:
        raise OutputError(f"{what} {path!r} already exists; pass --overwrite to replace it")


def _check_inside(path: str | Path, what: str, directory: Path) -> None:
    """Refuse a path that resolves (through ``..`` or symlinks) outside ``directory``, the OUTPUT's directory."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(directory):
        raise OutputError(
            f"{what} {str(path)!r} resolves to {resolved}, outside the directory of OUTPUT ({directory}); "
            "write it next to OUTPUT"
        )


def _check_local_workers(workers: int, device: str) -> None:
    """Each segmenter of a local Ray instance claims a GPU, or on CPU at least one core; more than there are would
    wait for resources forever."""
    import torch

    gpus = torch.cuda.device_count() if device != "cpu" else 0
    if gpus and workers > gpus:
        raise ConfigError(
            f"--workers {workers} is more than the {gpus} GPU(s) of this machine (one segmenter per GPU); "
            f"use --workers {gpus} or fewer"
        )
    cores = os.cpu_count() or 1
    if not gpus and workers > cores:
        raise ConfigError(
            f"--workers {workers} is more than the {cores} CPU cores of this machine (a segmenter needs at least "
            f"one); use --workers {cores} or fewer"
        )


def _same_file(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def make_plan(settings: RunSettings) -> RunPlan:
    """Validate ``settings`` and resolve defaults.

    Raises:
        SegpipeError: (a subclass) saying what is wrong and how to fix it.
    """
    from models.checkpoint import load_model

    if settings.blend not in BLENDS:
        raise ConfigError(f"--blend must be one of {', '.join(BLENDS)}, got {settings.blend!r}")
    if settings.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {settings.device!r}")
    for name in ("batch_size", "workers"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available() and not settings.ray_address:
            raise ConfigError(
                "--device cuda was asked for but this machine has no CUDA GPU; use --device cpu or auto"
            )
    if settings.workers and settings.executor == "ray" and not settings.ray_address:
        _check_local_workers(settings.workers, settings.device)
    _check_output(settings.output, "output", settings.overwrite)
    output = Path(settings.output)
    out_dir = output.absolute().parent.resolve()
    _check_inside(output.with_name(output.stem + ".summary.json"), "the summary", out_dir)
    if settings.probabilities:
        _check_inside(settings.probabilities, "--probabilities", out_dir)
        _check_output(settings.probabilities, "--probabilities", settings.overwrite)
        if _same_file(settings.probabilities, settings.output):
            raise ConfigError("--probabilities must be a different file from OUTPUT")
    if _same_file(settings.input, settings.output):
        raise ConfigError("OUTPUT must not be the INPUT file; choose another output path")
    if settings.work_dir:
        work = Path(settings.work_dir)
        if work.exists() and not work.is_dir():
            raise OutputError(f"--work-dir {settings.work_dir!r} is a file, not a directory")
        if not work.exists() and not work.parent.is_dir():
            raise OutputError(
                f"the parent of --work-dir {settings.work_dir!r} does not exist; create it first"
            )

    scene = describe_scene(settings.input)
    loaded = load_model(settings.model, device="cpu")
    meta = loaded.metadata
    if scene.count != len(meta.bands):
        raise ModelError(
            f"model {settings.model!r} takes {len(meta.bands)} bands ({', '.join(meta.bands)}) but the scene "
            f"{settings.input!r} has {scene.count}; choose a model trained on this imagery, or select "
            f"{len(meta.bands)} bands first (e.g. gdal_translate -b 1 -b 2 -b 3)"
        )
    tile_size = settings.tile_size if settings.tile_size is not None else meta.tile_size
    halo = settings.halo if settings.halo is not None else meta.halo
    if meta.input_size is not None and settings.tile_size is None and settings.halo is None:
        tile_size = meta.input_size - 2 * halo
    validate_tiling(tile_size, halo, size_multiple=meta.size_multiple, input_size=meta.input_size)
    batch_size = settings.batch_size or _default_batch_size(tile_size + 2 * halo, gpu=_expects_gpu(settings))
    summary = ModelSummary(
        name=settings.model,
        path=loaded.path,
        checksum=loaded.checksum,
        architecture=meta.architecture,
        classes=tuple(c.name for c in meta.classes),
        colours=tuple(c.colour for c in meta.classes),
        bands=tuple(meta.bands),
        provenance=dict(meta.provenance),
    )
    grid = TileGrid(scene.width, scene.height, tile_size, halo)
    return RunPlan(settings, scene, summary, tile_size, halo, batch_size, grid)


def _expects_gpu(settings: RunSettings) -> bool:
    """Whether inference will run on CUDA: asked for, or ``auto`` with a local GPU or on a cluster (unknown)."""
    if settings.device != "auto":
        return settings.device == "cuda"
    if settings.ray_address:
        return True
    import torch

    return bool(torch.cuda.is_available())


def _default_batch_size(input_size: int, *, gpu: bool = True) -> int:
    """Tiles per forward pass when ``--batch-size`` is not given.

    GPU: about 4 megapixels of input per batch, to keep the device busy. CPU: about a quarter megapixel (one tile
    of 512 px + 64 px halo): larger batches compute no faster there and cost memory and system time. Measured with
    the default model at 640 px inputs on 2 EPYC cores: 1.8 s of compute per megapixel at any batch size, plus
    system time to fault in fresh activation memory (0.5 s/MP at batch 1, 1.7 s/MP at batch 10), and activations
    of about 0.4 GB at batch 1 against 3.2 GB at batch 10.
    """
    budget = 2048 * 2048 if gpu else 512 * 512
    return max(1, min(16, budget // (input_size * input_size)))
