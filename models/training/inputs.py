"""What a training run trains on, resolved from its configuration and its data before the first step.

:func:`prepare` reads the images' headers, decides the bands (:func:`plan_bands`), takes what ``--init`` fixes from
that checkpoint's metadata (:func:`apply_init`), and reads the images with their labels (masks, or polygons
rasterised onto each image's grid, :mod:`segpipe.models.labels`).

Bands. The number of input bands is the images' (or those ``--bands`` picks: numbers, or names as the files give
them), and every image of a run, training and validation, must have as many bands of the same type, with the same
names where the files name them; one :class:`~segpipe.core.errors.InputError` names the image that differs. The
model's band names are ``--band-names``, else what the files say (:func:`segpipe.core.bands.scene_band_names`: a STAC
common name from a band's description or colour interpretation, else the description itself, e.g. ``B8``), else
``red, green, blue`` for three unnamed bands (as segpipe always named them) and ``bandN`` otherwise, with a warning
that says how to name them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.core.bands import band_numbers, parse_bands, scene_band_names
from segpipe.core.colours import ColourTable
from segpipe.core.errors import ConfigError, InputError, ModelError
from segpipe.models.checkpoint import resolve_model_path
from segpipe.models.data import (
    ImageBands,
    SamplePair,
    find_images,
    find_sample_pairs,
    image_bands,
    load_pair,
    read_image,
)
from segpipe.models.labels import PolygonLabels, image_grid, rasterise_labels, read_polygon_labels
from segpipe.models.metadata import ModelMetadata, find_metadata, read_metadata
from segpipe.models.training.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BandPlan:
    """Which bands of the images a run trains on, and their names.

    Attributes:
        indexes: 1-based band numbers read from every image, in the model's input order.
        names: The model's input band names, one per index.
        known: What the files (or ``--band-names``) call each band, "" where nothing does.
        dtype: numpy dtype name of the images' values.
    """

    indexes: tuple[int, ...]
    names: tuple[str, ...]
    known: tuple[str, ...]
    dtype: str

    def reads_all(self, count: int) -> bool:
        """Whether the plan reads all ``count`` bands of an image in file order."""
        return self.indexes == tuple(range(1, count + 1))


@dataclass(frozen=True)
class InitCheckpoint:
    """The checkpoint a fine-tuning run starts from: its weights file and its metadata."""

    path: Path
    metadata: ModelMetadata


@dataclass(frozen=True)
class LabelledImages:
    """Images (C, H, W) in their own dtype, their (H, W) uint8 class-id masks, and the image files, in order."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    paths: list[Path]


@dataclass(frozen=True)
class Inputs:
    """A run's resolved configuration (what its resume state is keyed by), network, bands and data."""

    config: TrainConfig
    architecture: str
    arguments: dict[str, Any]
    classes: tuple[tuple[str, str], ...]
    bands: tuple[str, ...]
    plan: BandPlan
    init: InitCheckpoint | None
    train: LabelledImages
    val: LabelledImages


def _band_listing(image: ImageBands) -> str:
    names = scene_band_names(image.descriptions, image.colour_interpretations)
    return ", ".join(f"{k + 1}={names[k] or image.descriptions[k] or 'unnamed'}" for k in range(image.count))


def _selected(image: ImageBands, select: str | None) -> tuple[int, ...]:
    """The 1-based bands of ``image`` that ``--bands`` picks (all without it)."""
    if select is None:
        return tuple(range(1, image.count + 1))
    known = scene_band_names(image.descriptions, image.colour_interpretations)
    described = [d.strip().lower() for d in image.descriptions]
    return band_numbers(
        parse_bands(select), known, described, asked=select, where=str(image.path), have=_band_listing(image)
    )


def _file_names(image: ImageBands, indexes: Sequence[int]) -> list[str]:
    """What the file calls each of ``indexes``: a common name, else its description, else ""."""
    known = scene_band_names(image.descriptions, image.colour_interpretations)
    return [known[i - 1] or image.descriptions[i - 1].strip() for i in indexes]


def plan_bands(images: Sequence[ImageBands], *, select: str | None, names: Sequence[str] | None) -> BandPlan:
    """The bands a run trains on (see the module docstring); ``images`` are all of its images, validation included.

    Raises:
        InputError: an image has another number or type of bands than the first, or names a band otherwise.
        ConfigError: ``--bands`` names a band an image lacks, or ``--band-names`` has another count.
    """
    first = images[0]
    indexes = _selected(first, select)
    known = _file_names(first, indexes)
    for image in images[1:]:
        if (image.count, image.dtype) != (first.count, first.dtype):
            raise InputError(
                f"{image.path} has {image.count} {image.dtype} band(s) but {first.path} has {first.count} "
                f"{first.dtype}; all images of a run must have the same bands (convert it, or leave it out)"
            )
        mine = _selected(image, select)
        if mine != indexes:
            raise InputError(
                f"--bands {select}: {image.path} has these bands as {mine} but {first.path} as {indexes}; all images "
                "of a run must have their bands in the same order"
            )
        for k, name in enumerate(_file_names(image, mine)):
            if name and known[k] and name.lower() != known[k].lower():
                raise InputError(
                    f"band {indexes[k]} of {image.path} is {name!r} but that of {first.path} is {known[k]!r}; all "
                    "images of a run must have the same bands in the same order (--bands picks them by name)"
                )
            known[k] = known[k] or name
    if names is not None:
        if len(names) != len(indexes):
            raise ConfigError(
                f"--band-names gives {len(names)} name(s) but the run trains on {len(indexes)} band(s) of the images "
                f"({first.path}: {_band_listing(first)}); give one name per band"
            )
        return BandPlan(indexes, tuple(names), tuple(names), first.dtype)
    return BandPlan(indexes, _fallback_names(known, indexes, first), tuple(known), first.dtype)


def _fallback_names(known: Sequence[str], indexes: Sequence[int], first: ImageBands) -> tuple[str, ...]:
    """The model's band names from the files' names, with ``red, green, blue`` or ``bandN`` where they say none."""
    if not any(known) and len(known) == 3:
        log.warning("the images do not name their bands; naming them red, green, blue (--band-names to name them)")
        return ("red", "green", "blue")
    names = tuple(name or f"band{i}" for name, i in zip(known, indexes, strict=True))
    if not all(known):
        log.warning("the images do not name every band; named %s (--band-names to name them)", ", ".join(names))
    lowered = [n.lower() for n in names]
    twice = sorted({n for n in names if lowered.count(n.lower()) > 1})
    if twice:
        raise InputError(
            f"{first.path} names two bands {twice[0]!r} ({_band_listing(first)}); name the bands with --band-names"
        )
    return names


def read_init(path: Path) -> InitCheckpoint:
    """The checkpoint of ``--init`` (a path, a folder holding one, or a packaged name such as ``default``).

    Raises:
        ModelError: it does not exist or its metadata is missing or invalid.
        ConfigError: it is an ONNX or TorchScript file (not built from segpipe's registry).
    """
    weights = resolve_model_path(str(path))
    if weights.suffix.lower() != ".safetensors":
        raise ConfigError(
            f"--init {path}: {weights.name} is not a segpipe checkpoint (.safetensors with its .json); fine-tuning "
            "starts from weights that segpipe train or save_checkpoint wrote"
        )
    return InitCheckpoint(weights, read_metadata(find_metadata(weights)))


def _check_init_network(config: TrainConfig, init: InitCheckpoint) -> None:
    """Refuse an ``--architecture`` or width that contradicts the checkpoint's."""
    meta = init.metadata
    if config.architecture is not None and config.architecture != meta.architecture:
        raise ConfigError(
            f"--init {init.path} is a {meta.architecture} but --architecture is {config.architecture}; leave "
            "--architecture out (fine-tuning keeps the checkpoint's network) or train without --init"
        )
    for key, value in (config.arguments or {}).items():
        if key not in ("in_channels", "num_classes") and meta.arguments.get(key) != value:
            raise ConfigError(
                f"--init {init.path} has {key}={meta.arguments.get(key)} but the run asks for {key}={value}; leave "
                "it out (fine-tuning keeps the checkpoint's network) or train without --init"
            )


def _check_init_bands(plan: BandPlan, init: InitCheckpoint) -> tuple[str, ...]:
    """The model's band names for a fine-tuning run; refuse a checkpoint whose bands or values the data lacks."""
    meta = init.metadata
    takes = f"--init {init.path} takes {len(meta.bands)} band(s) ({', '.join(meta.bands)})"
    if int(meta.arguments.get("in_channels", len(meta.bands))) != len(plan.indexes):
        raise ModelError(
            f"{takes} but the run trains on {len(plan.indexes)} ({', '.join(plan.names)}); pick "
            f"{len(meta.bands)} bands of the images with --bands, or train without --init"
        )
    for k, name in enumerate(plan.known):
        if name and name.lower() != meta.bands[k].lower():
            raise ModelError(
                f"{takes} but input band {k + 1} is {name!r} ({', '.join(plan.names)}); pick them in the "
                f"checkpoint's order with --bands {','.join(meta.bands)}, or train without --init"
            )
    if meta.input is not None and meta.input.dtype != plan.dtype:
        raise ModelError(
            f"--init {init.path} was trained on {meta.input.dtype} values ({meta.input.range[0]:g}.."
            f"{meta.input.range[1]:g}) but the images are {plan.dtype}; its normalisation does not fit them: convert "
            "the images, or train without --init"
        )
    return tuple(meta.bands)


def apply_init(config: TrainConfig, plan: BandPlan, init: InitCheckpoint) -> TrainConfig:
    """``config`` with what the checkpoint fixes: architecture, arguments, bands, and (where the run leaves them
    out) classes, ``mean``/``std`` and resolution.

    Raises:
        ConfigError: the run's architecture or widths contradict the checkpoint's.
        ModelError: the checkpoint takes other bands (count, names or value type) than the run trains on.
    """
    _check_init_network(config, init)
    bands = _check_init_bands(plan, init)
    meta = init.metadata
    classes = config.classes or tuple((c.name, c.colour) for c in meta.classes)
    resolution = config.resolution or (str(meta.resolution) if meta.resolution is not None else None)
    return dataclasses.replace(
        config,
        architecture=meta.architecture,
        arguments={**meta.arguments, "num_classes": len(classes)},
        classes=classes,
        bands=bands,
        mean=config.mean if config.mean is not None else meta.mean,
        std=config.std if config.std is not None else meta.std,
        resolution=resolution,
    )


def resolve(config: TrainConfig, plan: BandPlan, init: InitCheckpoint | None) -> TrainConfig:
    """``config`` with its bands, ``in_channels`` and (with ``init``) the checkpoint's settings filled in.

    Raises:
        ConfigError: settings that contradict the data (``in_channels``, ``colour_jitter`` on other than 8-bit).
    """
    if config.colour_jitter and plan.dtype != "uint8":
        raise ConfigError(
            f"colour_jitter {config.colour_jitter} draws offsets in 8-bit units (0-255) but the images are "
            f"{plan.dtype}; leave colour_jitter at 0 (saturation_jitter and scale_jitter work on any values)"
        )
    if init is not None:
        return apply_init(config, plan, init)
    arguments = dict(config.arguments or {})
    n = len(plan.indexes)
    if arguments.setdefault("in_channels", n) != n:
        raise ConfigError(
            f"arguments['in_channels'] is {arguments['in_channels']} but the run trains on {n} band(s) of the images "
            f"({', '.join(plan.names)}); leave in_channels out (it follows the images) or pick bands with --bands"
        )
    return dataclasses.replace(config, arguments={"in_channels": n, **arguments}, bands=plan.names)


def _samples(folders: Sequence[Path], polygons: bool) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) of every image of ``folders``, in folder then file order."""
    found: list[tuple[Path, Path | None]] = []
    for folder in folders:
        if polygons:
            found += [(image, None) for image in find_images(folder)]
        else:
            found += [(pair.image, pair.mask) for pair in find_sample_pairs(folder)]
    return found


def read_labelled(
    samples: Sequence[tuple[Path, Path | None]],
    config: TrainConfig,
    plan: BandPlan,
    labels: PolygonLabels | None,
    classes: Sequence[tuple[str, str]],
) -> LabelledImages:
    """The pixels of the planned bands of each image and its class ids (its mask, or the polygons on its grid)."""
    table = ColourTable.from_hex(c for _, c in classes)
    out = LabelledImages([], [], [])
    for path, mask_path in samples:
        bands = plan.indexes
        if mask_path is not None:
            image, mask = load_pair(
                SamplePair(path, mask_path),
                colour_table=table,
                num_classes=len(classes),
                bands=bands,
                unknown=config.unknown_colours,
                ignore_index=config.ignore_index,
            )
        else:
            assert labels is not None  # samples without masks exist only with polygon labels
            image = read_image(path, bands=bands)
            mask = rasterise_labels(labels, image_grid(path), fill=config.label_fill, where=str(path))
        out.images.append(image)
        out.masks.append(mask)
        out.paths.append(path)
    return out


def prepare(config: TrainConfig) -> Inputs:
    """Resolve ``config`` against its data and read the data (see the module docstring)."""
    polygons = config.labels is not None
    train_samples = _samples(config.train_dirs, polygons)
    val_samples = _samples(config.val_dirs, polygons)
    headers = [image_bands(path) for path, _ in train_samples + val_samples]
    plan = plan_bands(headers, select=config.select_bands, names=config.bands)
    init = read_init(config.init) if config.init is not None else None
    config = resolve(config, plan, init)
    assert config.architecture and config.arguments is not None and config.classes and config.bands
    labels = None
    if config.labels is not None:
        labels = read_polygon_labels(
            config.labels,
            class_names=[n for n, _ in config.classes],
            field=config.label_field,
            layer=config.label_layer,
            unknown=config.unknown_colours,
            ignore_index=config.ignore_index,
        )
    return Inputs(
        config=config,
        architecture=config.architecture,
        arguments=dict(config.arguments),
        classes=config.classes,
        bands=config.bands,
        plan=plan,
        init=init,
        train=read_labelled(train_samples, config, plan, labels, config.classes),
        val=read_labelled(val_samples, config, plan, labels, config.classes),
    )
