"""Validate a run before any work starts and resolve its settings into a :class:`RunPlan`.

Everything a user can get wrong is checked here, in about a second: the options, the scene, the model and its fit
to the scene, tile size and halo, and the outputs (each sink checks its own path). The stages then run on a plan
that is known to be sound; the model is loaded once for it.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.core import objects
from segpipe.core.cog import parse_cog_options
from segpipe.core.errors import ConfigError, OutputError, SegpipeError
from segpipe.core.objects import ObjectUrl, is_object_url
from segpipe.core.pixels import PixelMap
from segpipe.core.runtime import available_cores, local_gpus
from segpipe.core.tiles import TileGrid, fit_fixed_input, validate_tiling
from segpipe.pipeline import store as ws
from segpipe.pipeline.export import Sink, sink_for
from segpipe.pipeline.fit import SceneFit, fit_scene
from segpipe.pipeline.incremental import OutputKey, output_key
from segpipe.pipeline.ingest import reads_in_place
from segpipe.pipeline.merge import merger_type
from segpipe.pipeline.polygons import VECTOR  # registers the vector sinks
from segpipe.pipeline.read import SceneInfo, describe_scene
from segpipe.pipeline.settings import RunOptions, RunSettings

if TYPE_CHECKING:
    from segpipe.models.checkpoint import LoadedModel
    from segpipe.models.metadata import ModelMetadata

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


@dataclass(frozen=True)
class RunPlan:
    """A validated, fully resolved run.

    Attributes:
        settings: What was asked for.
        scene: The scene's description.
        model: The model's summary (its file and checksum: segmenters load it themselves).
        tile_size: Core side in pixels.
        halo: Halo in pixels.
        batch_size: Tiles per forward pass.
        grid: The tile grid over the scene.
        sinks: The outputs, mask first.
        fit: How the scene feeds the model (bands, nodata, scaling; :mod:`segpipe.pipeline.fit`).
        in_place: The segmenters read tiles from the scene itself, not from a copy in the work store (``--ingest``;
            the results are the same either way, so no key holds it).
    """

    settings: RunSettings
    scene: SceneInfo
    model: ModelSummary
    tile_size: int
    halo: int
    batch_size: int
    grid: TileGrid
    sinks: tuple[Sink, ...] = ()
    fit: SceneFit | None = None
    in_place: bool = False

    @property
    def pixel_map(self) -> PixelMap | None:
        return self.fit.pixel_map if self.fit is not None else None

    @property
    def summary_path(self) -> str:
        """``<output stem>.summary.json`` next to the output (a path or an object URL)."""
        return summary_path(self.settings.output)

    @property
    def output_key(self) -> OutputKey:
        """What the run's outputs are made from (recorded in the summary; see :mod:`segpipe.pipeline.incremental`)."""
        return output_key(
            scene_fingerprint=self.scene.fingerprint,
            model_checksum=self.model.identity or self.model.checksum,
            tile_size=self.tile_size,
            halo=self.halo,
            blend=self.settings.blend,
            batch_size=self.batch_size,
            probabilities=bool(self.settings.probabilities),
            scaling=self.fit.scaling if self.fit is not None else None,
            vector=vector_key(self.settings),
            cog=parse_cog_options(self.settings.cog_options),
        )

    @property
    def run_key(self) -> str:
        """The work store's key of this run's inference results: what changes them (see
        :func:`segpipe.pipeline.store.run_key`)."""
        return ws.run_key(
            model=self.model.identity or self.model.checksum,
            scaling=self.fit.scaling if self.fit is not None else None,
            tile_size=self.tile_size,
            halo=self.halo,
            blend=self.settings.blend,
            batch_size=self.batch_size,
            probabilities=bool(self.settings.probabilities),
            fingerprint=self.scene.fingerprint,
        )


def summary_path(output: str) -> str:
    """Where the summary of a run writing ``output`` goes: ``<output stem>.summary.json`` beside it (the stem of
    ``mask.ome.tif`` is ``mask``)."""
    if is_object_url(output):
        parsed = ObjectUrl.parse(output)
        return str(parsed.parent.child(_stem(parsed.name) + ".summary.json"))
    out = Path(output)
    return str(out.with_name(_stem(out.name) + ".summary.json"))


def _stem(name: str) -> str:
    stem = Path(name).stem
    return stem[:-4] if name.lower().endswith((".ome.tif", ".ome.tiff")) else stem


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


def _check_beside(path: str, what: str, output: str) -> None:
    """Refuse an object URL that is not in the OUTPUT's folder (prefix) of the same bucket."""
    parent = ObjectUrl.parse(output).parent
    if not is_object_url(path) or ObjectUrl.parse(path).parent != parent or "/../" in f"/{path}/":
        raise OutputError(f"{what} {path!r} is not beside OUTPUT ({parent}/); write it next to OUTPUT")


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


def _same_file(a: str, b: str) -> bool:
    if is_object_url(a) or is_object_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def left_by_unfinished_run(output: str) -> bool:
    """Whether ``output`` is the mask of a run that ended before writing its summary (killed, or its machine lost):
    a mask segpipe wrote (its ``SOFTWARE=segpipe`` tag) with no summary beside it. A run writes its outputs first
    and its summary last, so the next run of the same command replaces such a mask, and the probabilities and
    polygons beside it, without ``--overwrite`` (a data set redoes such a scene too: ``incomplete``)."""
    from segpipe.core.raster import open_raster

    summary = summary_path(output)
    if is_object_url(output):
        if objects.head(output) is None or objects.head(summary) is not None:
            return False
    elif not Path(output).is_file() or Path(summary).exists():
        return False
    try:
        with open_raster(output, role="output") as src:
            return src.tags().get("SOFTWARE") == "segpipe"
    except SegpipeError:  # not a raster: not segpipe's
        return False


def _check_outputs(settings: RunSettings) -> tuple[Sink, ...]:
    creation = tuple(parse_cog_options(settings.cog_options).items())
    if creation and settings.output.lower().endswith((".ome.tif", ".ome.tiff")):
        raise ConfigError("--co sets COG creation options; an OME-TIFF mask is not a COG: leave --co out")
    sinks = [sink_for(ws.MASK, settings.output, creation=creation)]
    overwrite = settings.overwrite or left_by_unfinished_run(settings.output)
    sinks[0].check(overwrite=overwrite)
    remote = is_object_url(settings.output)
    out_dir = Path(settings.output).absolute().parent.resolve()
    if not remote:
        _check_inside(summary_path(settings.output), "the summary", out_dir)
    if settings.probabilities:
        if remote:
            _check_beside(settings.probabilities, "--probabilities", settings.output)
        else:
            _check_inside(settings.probabilities, "--probabilities", out_dir)
        sinks.append(sink_for(ws.PROBABILITIES, settings.probabilities, creation=creation))
        sinks[-1].check(overwrite=overwrite)
        if _same_file(settings.probabilities, settings.output):
            raise ConfigError("--probabilities must be a different file from OUTPUT")
    if settings.vector:
        if remote:
            _check_beside(settings.vector, "--vector", settings.output)
        else:
            _check_inside(settings.vector, "--vector", out_dir)
        sinks.append(
            sink_for(
                VECTOR,
                settings.vector,
                mask=settings.output,
                simplify=settings.vector_simplify,
                min_area=settings.vector_min_area,
            )
        )
        sinks[-1].check(overwrite=overwrite)
        for other, name in ((settings.output, "OUTPUT"), (settings.probabilities, "--probabilities")):
            if other and _same_file(settings.vector, other):
                raise ConfigError(f"--vector must be a different file from {name}")
    if _same_file(settings.input, settings.output):
        raise ConfigError("OUTPUT must not be the INPUT file; choose another output path")
    if settings.work_dir and is_object_url(settings.work_dir):
        probe = str(ObjectUrl.parse(settings.work_dir).child(f".segpipe-write-test-{uuid.uuid4().hex[:12]}"))
        try:
            objects.write_bytes(probe, b"")
        except OutputError as exc:
            raise OutputError(f"cannot write to --work-dir {settings.work_dir!r}: {exc}") from None
        objects.delete(probe)
    elif settings.work_dir:
        work = Path(settings.work_dir)
        if work.exists() and not work.is_dir():
            raise OutputError(f"--work-dir {settings.work_dir!r} is a file, not a directory")
        if not work.exists() and not work.parent.is_dir():
            raise OutputError(f"the parent of --work-dir {settings.work_dir!r} does not exist; create it first")
    return tuple(sinks)


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
    from segpipe.models.checkpoint import load_model

    if settings.device == "cuda" and not settings.ray_address and not local_gpus():
        raise ConfigError("--device cuda was asked for but this machine has no CUDA GPU; use --device cpu or auto")
    if settings.workers and settings.executor != "local" and not settings.ray_address:
        _check_local_workers(settings.workers, settings.device)
    sinks = _check_outputs(settings)

    file = describe_scene(settings.input, mpp=settings.mpp)
    loaded = loaded or load_model(settings.model, device="cpu", metadata=settings.model_metadata)
    meta = loaded.metadata
    fit = _fit(settings, file, meta)
    for line in fit.warnings:
        log.warning("%s: %s", settings.input, line)
    scene = fit.scene
    tile_size, halo, batch_size = resolve_tiling(settings, meta)
    summary = ModelSummary(
        name=settings.model,
        path=loaded.path,
        checksum=loaded.checksum,
        ref=model_ref(settings.model, loaded.path),
        architecture=meta.architecture,
        classes=tuple(c.name for c in meta.classes),
        colours=tuple(c.colour for c in meta.classes),
        bands=tuple(meta.bands),
        provenance=dict(meta.provenance),
        identity=loaded.identity,
        metadata=settings.model_metadata,
    )
    grid = TileGrid(scene.width, scene.height, tile_size, halo)
    in_place = reads_in_place(scene, grid.input_size) if settings.ingest == "auto" else settings.ingest == "never"
    in_place = in_place and not merger_type(settings.blend).tile_probabilities
    return RunPlan(settings, scene, summary, tile_size, halo, batch_size, grid, sinks, fit, in_place)


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


def scene_output_key(settings: RunOptions, file: SceneInfo, loaded: LoadedModel) -> OutputKey:
    """The key the outputs of ``file`` would be made with under ``settings`` (what :attr:`RunPlan.output_key`
    gives once planned), without reading the scene's pixels: a data set decides from it what to segment.

    Raises:
        SegpipeError: the scene cannot be fitted to the model, or the tiling is wrong.
    """
    meta = loaded.metadata
    fit = _fit(settings, file, meta, compute=False)
    tile_size, halo, batch_size = resolve_tiling(settings, meta)
    return output_key(
        scene_fingerprint=fit.scene.fingerprint,
        model_checksum=loaded.identity,
        tile_size=tile_size,
        halo=halo,
        blend=settings.blend,
        batch_size=batch_size,
        probabilities=isinstance(settings, RunSettings) and bool(settings.probabilities),
        scaling=fit.scaling,
        vector=vector_key(settings),
        cog=parse_cog_options(settings.cog_options),
    )


def model_ref(asked: str, path: str) -> str:
    """What a segmenter, on any machine, loads: the URL or packaged name as asked, else the resolved local path."""
    from segpipe.models.checkpoint import WEIGHTS_DIR

    if is_object_url(asked) or Path(path).parent == WEIGHTS_DIR.resolve():
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
