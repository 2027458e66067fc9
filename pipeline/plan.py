"""Validate a run before any work starts and resolve its settings into a :class:`RunPlan`.

Everything a user can get wrong is checked here, in about a second: the options, the scene, the model and its fit
to the scene, tile size and halo, and the outputs (each sink checks its own path). The stages then run on a plan
that is known to be sound; the model is loaded once for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.core.cog import parse_cog_options
from segpipe.core.errors import ConfigError, SegpipeError
from segpipe.core.location import Location
from segpipe.core.raster import open_raster
from segpipe.core.runtime import available_cores, local_gpus
from segpipe.core.tiles import TileGrid, fit_fixed_input, validate_tiling
from segpipe.models.checkpoint import WEIGHTS_DIR, LoadedModel, load_model
from segpipe.models.metadata import ModelMetadata
from segpipe.pipeline import store as ws
from segpipe.pipeline.fit import SceneFit, fit_scene
from segpipe.pipeline.incremental import OutputKey, output_key
from segpipe.pipeline.infer import ModelSpec
from segpipe.pipeline.ingest import reads_in_place
from segpipe.pipeline.merge import merger_type
from segpipe.pipeline.names import summary_path
from segpipe.pipeline.read import describe_scene
from segpipe.pipeline.recipe import Recipe
from segpipe.pipeline.scene import SceneInfo
from segpipe.pipeline.settings import RunOptions, RunSettings
from segpipe.pipeline.sinks import sink_for
from segpipe.pipeline.sinks.base import VECTOR, Sink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSummary:
    """The part of a model's metadata the pipeline needs (JSON-friendly)."""

    name: str
    path: str
    checksum: str
    ref: str
    architecture: str
    classes: tuple[str, ...]
    colours: tuple[str, ...]
    bands: tuple[str, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    identity: str = ""
    metadata: str | None = None


    def spec(self, device: str, threads: int) -> ModelSpec:
        """What a segmenter of this model holds on ``device`` with ``threads`` torch threads."""
        return ModelSpec(self.ref, self.checksum, device, threads, self.metadata)


@dataclass(frozen=True)
class RunPlan:
    """A validated, fully resolved run.

    Attributes:
        settings: What was asked for.
        scene: The scene's description (what the run reads of it).
        model: The model's summary (its file and checksum: segmenters load it themselves).
        recipe: How the pixels are made (tile size, halo, blend, batch size, what is read, scaling).
        grid: The tile grid over the scene.
        sinks: The outputs, mask first.
        fit: How the scene feeds the model (bands, nodata, scaling; :mod:`segpipe.pipeline.fit`).
        in_place: The segmenters read tiles from the scene itself, not from a copy in the work store (``--ingest``;
            the results are the same either way, so no key holds it).
    """

    settings: RunSettings
    scene: SceneInfo
    model: ModelSummary
    recipe: Recipe
    grid: TileGrid
    sinks: tuple[Sink, ...] = ()
    fit: SceneFit | None = None
    in_place: bool = False

    @property
    def summary_path(self) -> str:
        """``<output stem>.summary.json`` next to the output (a path or an object URL)."""
        return summary_path(self.settings.output)

    @property
    def output_key(self) -> OutputKey:
        """What the run's outputs are made from (recorded in the summary; see :mod:`segpipe.pipeline.incremental`)."""
        return _output_key(self.recipe, self.scene, self.settings)


def _output_key(recipe: Recipe, scene: SceneInfo, options: RunOptions) -> OutputKey:
    return output_key(
        recipe, scene=scene.fingerprint, vector=vector_key(options), cog=parse_cog_options(options.cog_options)
    )


def vector_key(settings: RunOptions) -> dict[str, Any] | None:
    """How the polygons of ``--vector`` are made (format, simplification, minimum area), for the output key; None
    when none are written."""
    vector = getattr(settings, "vector", None)
    if not vector:
        return None
    return {
        "format": Path(vector).suffix.lower().lstrip("."),
        "simplify": settings.vector_simplify,
        "min_area": settings.vector_min_area,
    }


def _check_local_workers(workers: int, device: str) -> None:
    """Each segmenter of a local Ray instance claims a GPU, or on CPU at least one core; more than there are would
    wait for resources forever."""
    gpus = local_gpus() if device != "cpu" else 0
    if gpus and workers > gpus:
        raise ConfigError(
            f"--workers {workers} is more than the {gpus} GPU(s) of this machine (one segmenter per GPU); "
            f"use --workers {gpus} or fewer"
        )
    cores = available_cores()
    if not gpus and workers > cores:
        raise ConfigError(
            f"--workers {workers} is more than the {cores} CPU cores of this machine (a segmenter needs at least "
            f"one); use --workers {cores} or fewer"
        )


def left_by_unfinished_run(output: str) -> bool:
    """Whether ``output`` is the mask of a run that ended before writing its summary (killed, or its machine lost):
    a mask segpipe wrote (its ``SOFTWARE=segpipe`` tag) with no summary beside it. A run writes its outputs first
    and its summary last, so the next run of the same command replaces such a mask, and the probabilities and
    polygons beside it, without ``--overwrite`` (a data set redoes such a scene too: ``incomplete``)."""
    if not Location(output).exists() or Location(summary_path(output)).exists():
        return False
    try:
        with open_raster(output, role="output") as src:
            return src.tags().get("SOFTWARE") == "segpipe"
    except SegpipeError:  # not a raster: not segpipe's
        return False


def _check_outputs(settings: RunSettings) -> tuple[Sink, ...]:
    """The run's sinks, mask first, each checked (its path can be written; nothing there without ``--overwrite``),
    the files beside OUTPUT and apart from each other and from INPUT, and the work directory usable.

    Raises:
        SegpipeError: what is wrong and how to fix it.
    """
    creation = tuple(parse_cog_options(settings.cog_options).items())
    if creation and settings.output.lower().endswith((".ome.tif", ".ome.tiff")):
        raise ConfigError("--co sets COG creation options; an OME-TIFF mask is not a COG: leave --co out")
    output = Location(settings.output)
    overwrite = settings.overwrite or left_by_unfinished_run(settings.output)
    sinks = [sink_for(ws.MASK, settings.output, creation=creation)]
    sinks[-1].check(overwrite=overwrite)
    if output.is_local:
        Location(summary_path(settings.output)).check_beside(output, "the summary")
    if settings.probabilities:
        Location(settings.probabilities).check_beside(output, "--probabilities")
        sinks.append(sink_for(ws.PROBABILITIES, settings.probabilities, creation=creation))
        sinks[-1].check(overwrite=overwrite)
    if settings.vector:
        Location(settings.vector).check_beside(output, "--vector")
        options = {"simplify": settings.vector_simplify, "min_area": settings.vector_min_area}
        sinks.append(sink_for(VECTOR, settings.vector, mask=settings.output, **options))
        sinks[-1].check(overwrite=overwrite)
    _check_apart(settings)
    if settings.work_dir:
        Location(settings.work_dir).check_folder("--work-dir")
    return tuple(sinks)


def _check_apart(settings: RunSettings) -> None:
    """Refuse two of INPUT, OUTPUT, ``--probabilities`` and ``--vector`` naming the same file."""
    named = [("OUTPUT", settings.output), ("--probabilities", settings.probabilities), ("--vector", settings.vector)]
    given = [(name, Location(path)) for name, path in named if path]
    for k, (name, path) in enumerate(given):
        for other, earlier in given[:k]:
            if path.same_as(earlier):
                raise ConfigError(f"{name} must be a different file from {other}")
    if Location(settings.input).same_as(Location(settings.output)):
        raise ConfigError("OUTPUT must not be the INPUT file; choose another output path")


def resolve_tiling(settings: RunOptions, meta: ModelMetadata) -> tuple[int, int, int]:
    """(tile size, halo, batch size) of a run: the options where given, else the model's and the device's defaults;
    for a model with a fixed input size, the tile and halo that fill it (:func:`segpipe.core.tiles.fit_fixed_input`).

    Raises:
        ConfigError: a tile size and halo the model cannot take.
    """
    tile_size = settings.tile_size if settings.tile_size is not None else meta.tile_size
    halo = settings.halo if settings.halo is not None else meta.halo
    if meta.input_size is not None:
        tile_size, halo = fit_fixed_input(meta.input_size, settings.tile_size, halo)
    validate_tiling(tile_size, halo, size_multiple=meta.size_multiple, input_size=meta.input_size)
    batch_size = settings.batch_size or default_batch_size(tile_size + 2 * halo, gpu=_expects_gpu(settings))
    return tile_size, halo, batch_size


def make_plan(settings: RunSettings, *, loaded: LoadedModel | None = None) -> RunPlan:
    """Validate ``settings`` and resolve defaults.

    Args:
        settings: What to run.
        loaded: ``settings.model``, loaded already (a data set's scenes share one model); None: loaded here.

    Raises:
        SegpipeError: (a subclass) saying what is wrong and how to fix it.
    """
    if settings.device == "cuda" and not settings.ray_address and not local_gpus():
        raise ConfigError("--device cuda was asked for but this machine has no CUDA GPU; use --device cpu or auto")
    if settings.workers and settings.executor != "local" and not settings.ray_address:
        _check_local_workers(settings.workers, settings.device)
    sinks = _check_outputs(settings)
    file = describe_scene(settings.input, mpp=settings.mpp)
    loaded = loaded or load_model(settings.model, device="cpu", metadata=settings.model_metadata)
    fit = _fit(settings, file, loaded.metadata)
    for line in fit.warnings:
        log.warning("%s: %s", settings.input, line)
    scene = fit.scene
    recipe = make_recipe(settings, fit, loaded, probabilities=bool(settings.probabilities))
    grid = TileGrid(scene.width, scene.height, recipe.tile_size, recipe.halo)
    in_place = reads_in_place(scene, grid.input_size) if settings.ingest == "auto" else settings.ingest == "never"
    in_place = in_place and not merger_type(recipe.blend).tile_probabilities
    model = model_summary(settings, loaded)
    return RunPlan(settings, scene, model, recipe, grid, sinks, fit, in_place)


def model_summary(options: RunOptions, loaded: LoadedModel) -> ModelSummary:
    """What the pipeline keeps of the run's model (``options.model``, loaded)."""
    meta = loaded.metadata
    return ModelSummary(
        name=options.model,
        path=loaded.path,
        checksum=loaded.checksum,
        ref=model_ref(options.model, loaded.path),
        architecture=meta.architecture,
        classes=tuple(c.name for c in meta.classes),
        colours=tuple(c.colour for c in meta.classes),
        bands=tuple(meta.bands),
        provenance=dict(meta.provenance),
        identity=loaded.identity,
        metadata=options.model_metadata,
    )


def make_recipe(options: RunOptions, fit: SceneFit, loaded: LoadedModel, *, probabilities: bool) -> Recipe:
    """The recipe of a run of ``options`` on a scene fitted to the model (``fit``; its pixel map is None when it
    was fitted without reading pixels), with or without per-class ``probabilities``.

    Raises:
        ConfigError: a tile size and halo the model cannot take.
    """
    tile_size, halo, batch_size = resolve_tiling(options, loaded.metadata)
    return Recipe(
        model=loaded.identity,
        tile_size=tile_size,
        halo=halo,
        blend=options.blend,
        batch_size=batch_size,
        probabilities=probabilities,
        selection=fit.scene.selection,
        scaling=fit.scaling,
        pixel_map=fit.pixel_map,
    )


def _fit(settings: RunOptions, file: SceneInfo, meta: ModelMetadata, *, compute: bool = True) -> SceneFit:
    """:func:`fit_scene` with the run options that choose what is read of the scene and how it is scaled."""
    return fit_scene(
        file,
        meta,
        bands=settings.bands,
        nodata=settings.nodata,
        scaling=settings.scaling,
        resolution=settings.resolution,
        tissue=settings.tissue,
        mpp=settings.mpp,
        compute=compute,
    )


def scene_output_key(
    options: RunOptions, file: SceneInfo, loaded: LoadedModel, *, probabilities: bool = False
) -> OutputKey:
    """The key the outputs of ``file`` would be made with under ``options`` (what :attr:`RunPlan.output_key`
    gives once planned: the same recipe, made without reading the scene's pixels): a data set decides from it
    what to segment. ``options`` may be a :class:`RunSettings`: its ``--probabilities`` then count.

    Raises:
        SegpipeError: the scene cannot be fitted to the model, or the tiling is wrong.
    """
    fit = _fit(options, file, loaded.metadata, compute=False)
    asked = probabilities or bool(getattr(options, "probabilities", None))
    return _output_key(make_recipe(options, fit, loaded, probabilities=asked), fit.scene, options)


def model_ref(asked: str, path: str) -> str:
    """What a segmenter, on any machine, loads: the URL or packaged name as asked, else the resolved local path."""
    if not Location(asked).is_local or Path(path).parent == WEIGHTS_DIR.resolve():
        return asked
    return path


def _expects_gpu(settings: RunOptions) -> bool:
    """Whether inference will run on CUDA: asked for, or ``auto`` with a local GPU or on a cluster (unknown)."""
    if settings.device != "auto":
        return settings.device == "cuda"
    return bool(settings.ray_address) or local_gpus() > 0


def default_batch_size(input_size: int, *, gpu: bool = True) -> int:
    """Tiles per forward pass when ``--batch-size`` is not given: about 4 megapixels of input per batch on a GPU,
    to keep it busy; about a quarter megapixel on a CPU, where larger batches compute no faster and cost memory
    (see ``benchmarks/README.md``). Between 1 and 16."""
    budget = 2048 * 2048 if gpu else 512 * 512
    return max(1, min(16, budget // (input_size * input_size)))
