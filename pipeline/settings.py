"""What a user asks of a run: :class:`RunOptions` (every per-scene option, stated once), :class:`RunSettings`
(one scene: input, outputs and those options) and :class:`DatasetOptions` (how a data set is read and run).

Each field is declared with :func:`segpipe.core.options.option`: its default and help live here and nowhere
else. The ``segpipe run``, ``dataset`` and ``serve`` commands build their flags from these fields, the Prefect
flows take these objects as parameters, and the run summary records them. Values are checked on construction
(``ConfigError`` naming the flag); what needs the scene or the model is checked by
:func:`segpipe.pipeline.plan.make_plan`. ``None`` means "the model's or the machine's default".
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from typing import Any

from segpipe.core.bands import parse_bands
from segpipe.core.cog import parse_cog_options
from segpipe.core.errors import ConfigError
from segpipe.core.options import option
from segpipe.core.pixels import Scaling
from segpipe.core.pyramid import MAX_SLIDE_MPP, parse_resolution
from segpipe.core.runtime import DEVICES
from segpipe.pipeline.merge import MERGERS

EXECUTORS = ("auto", "ray", "local")
#: ``--ingest``: whether a scene is copied into the work store before inference (see
#: :func:`segpipe.pipeline.ingest.reads_in_place`).
INGEST_CHOICES = ("auto", "always", "never")
TISSUE_METHODS = ("otsu", "none")
#: ``--vector-format`` of a data set: ``auto`` is QuPath's GeoJSON for a slide, GeoPackage for other scenes.
VECTOR_FORMATS = ("auto", "gpkg", "geojson", "parquet")


#: The prefix that marks a data-set source as a STAC API (``stac-api+https://...``).
STAC_API_PREFIX = "stac-api+"


@dataclass(frozen=True)
class StacSearch:
    """A STAC API item search: the API's root URL, and what narrows the search."""

    url: str
    collections: tuple[str, ...] = ()
    bbox: tuple[float, float, float, float] | None = None
    datetime: str | None = None
    query: dict[str, Any] | None = None
    max_items: int | None = None


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The options of a run that apply to every scene (see the module docstring)."""

    model: str = option("default", help="model name or checkpoint path (default: the shipped model)")
    model_metadata: str | None = option(
        None,
        help="the model's segpipe metadata (default: <model>.segpipe.json beside the model, else <model>.json)",
        metavar="PATH",
    )
    bands: str | None = option(
        None,
        help="the scene bands that feed the model, by number (4,3,2) or name (red,green,blue), in the model's order "
        "(default: by the bands' names, else all in order)",
        metavar="LIST",
    )
    nodata: float | None = option(
        None, help="the value that marks nodata in every band (replaces the file's; e.g. 0 or nan)", metavar="V"
    )
    scaling: str | None = option(
        None,
        help="how scene values map to the model's input: none, linear:SCALE,OFFSET, product, minmax:MIN,MAX or "
        "percentile[:LOW,HIGH] (default: the model's contract, for scenes that do not fit it)",
        metavar="KIND",
    )
    resolution: str | None = option(
        None,
        help="slides: the pixel size to segment at, e.g. 0.5um, or native (level 0); default: the model's",
        metavar="SIZE",
    )
    tissue: str = option(
        "otsu",
        help="slides: otsu (default): only tissue is segmented (Otsu on saturation), background is nodata; none",
        choices=TISSUE_METHODS,
    )
    mpp: float | None = option(
        None,
        help="the scene's level-0 pixel size in micrometres, for a microscopy image that does not state it or "
        "states it wrongly (a plain RGB TIFF, PNG or JPEG is then read as a slide)",
        metavar="UM",
    )
    tile_size: int | None = option(None, help="tile core size in pixels (default: the model's)", metavar="N")
    halo: int | None = option(
        None, help="context margin around each tile in pixels (default: the model's)", metavar="N"
    )
    blend: str = option(
        "crop",
        help="crop (default): each tile's core, written directly; cosine/gaussian: blend overlapping tiles",
        choices=tuple(MERGERS),
    )
    batch_size: int | None = option(None, help="tiles per forward pass (default: by device and tile size)", metavar="N")
    workers: int | None = option(None, help="segmenter actors (default: one per GPU, or one on CPU)", metavar="N")
    device: str = option("auto", help="where the model runs (default: auto, a GPU when there is one)", choices=DEVICES)
    work_dir: str | None = option(
        None, help="keep zarr work stores here (created if missing); a re-run with it resumes", metavar="DIR"
    )
    ray_address: str | None = option(
        None, help="an existing Ray cluster (auto, ray://host:10001); default: a local instance", metavar="ADDR"
    )
    ray_connect_timeout: float = option(
        30.0, help="seconds to wait for the Ray cluster of --ray-address to answer", metavar="S"
    )
    overwrite: bool = option(False, help="replace existing outputs")
    vector_simplify: float = option(
        0.0,
        help="--vector: simplify each polygon, keeping its topology, with this tolerance in CRS units (level-0 "
        "pixels for a slide); 0 keeps every pixel corner",
        metavar="TOL",
    )
    vector_min_area: float = option(
        0.0,
        help="--vector: drop polygons smaller than this, in CRS units² (level-0 pixels² for a slide)",
        metavar="AREA",
    )
    cog_options: tuple[str, ...] = option(
        (),
        help="a creation option of the COG outputs, NAME=VALUE as rio takes them (repeatable): COMPRESS "
        "(DEFLATE, ZSTD, LZMA, LZW, PACKBITS, NONE; lossless only), LEVEL, PREDICTOR, BLOCKSIZE, BIGTIFF",
        flag="--co",
        metavar="NAME=VALUE",
        repeatable=True,
    )
    ingest: str = option(
        "auto",
        help="auto (default): the segmenters read a tiled GeoTIFF or COG (local or remote) window by window, other "
        "scenes are copied into the work store first; always: copy every scene; never: read every scene in place "
        "(crop blend only)",
        choices=INGEST_CHOICES,
    )
    executor: str = option(
        "auto",
        help="auto (default): Ray where it pays (several workers or GPUs, more than a few tiles, a cluster); ray; "
        "local: in this process, without Ray",
        choices=EXECUTORS,
    )

    def __post_init__(self) -> None:
        if self.blend not in MERGERS:
            raise ConfigError(f"--blend must be one of {', '.join(MERGERS)}, got {self.blend!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {self.device!r}")
        if self.ingest not in INGEST_CHOICES:
            raise ConfigError(f"--ingest must be one of {', '.join(INGEST_CHOICES)}, got {self.ingest!r}")
        if self.ingest == "never" and MERGERS[self.blend].tile_probabilities:
            raise ConfigError(
                f"--ingest never reads tiles in place, and --blend {self.blend} needs the work store's copy of the "
                "scene to blend; use --blend crop, or --ingest auto"
            )
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        for name in ("batch_size", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("vector_simplify", "vector_min_area"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if not self.ray_connect_timeout > 0:
            raise ConfigError(f"--ray-connect-timeout must be > 0 seconds, got {self.ray_connect_timeout}")
        for name in ("tile_size", "halo"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.scaling is not None:
            Scaling.parse(self.scaling)  # ConfigError naming what is allowed
            if Scaling.parse(self.scaling).kind == "refuse":
                raise ConfigError("--scaling refuse is for a model's contract; give none or a mapping")
        if self.bands is not None:
            parse_bands(self.bands)
        if self.resolution is not None:
            parse_resolution(self.resolution)  # ConfigError naming what is allowed
        if self.mpp is not None and not 0 < self.mpp <= MAX_SLIDE_MPP:  # NaN too
            raise ConfigError(
                f"--mpp must be a pixel size in micrometres, > 0 and <= {MAX_SLIDE_MPP:g}, got {self.mpp}"
            )
        parse_cog_options(self.cog_options)  # ConfigError naming what is wrong
        if self.tissue not in TISSUE_METHODS:
            raise ConfigError(f"--tissue must be one of {', '.join(TISSUE_METHODS)}, got {self.tissue!r}")


@dataclass(frozen=True, kw_only=True)
class RunSettings(RunOptions):
    """One scene's run: the scene, where its outputs go, and the run's options.

    Attributes:
        input: The scene: a path, URL or GDAL path.
        output: The mask to write.
        probabilities: Also write per-class probabilities there.
        vector: Also write the mask's polygons there (``.gpkg``, ``.geojson``, ``.parquet``).
    """

    input: str
    output: str
    probabilities: str | None = None
    vector: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.vector and (self.vector_simplify or self.vector_min_area):
            raise ConfigError(
                "--vector-simplify and --vector-min-area shape the polygons of --vector PATH; give --vector or leave "
                "them out"
            )

    @classmethod
    def for_scene(
        cls,
        options: RunOptions,
        *,
        input: str,
        output: str,
        probabilities: str | None = None,
        vector: str | None = None,
    ) -> RunSettings:
        """Settings for one scene with the given options."""
        values = {name: getattr(options, name) for name in RunOptions.__dataclass_fields__}
        return cls(input=input, output=output, probabilities=probabilities, vector=vector, **values)

    @property
    def options(self) -> RunOptions:
        """The per-scene options alone."""
        return RunOptions(**{name: getattr(self, name) for name in RunOptions.__dataclass_fields__})


@dataclass(frozen=True, kw_only=True)
class ScheduleOptions:
    """When ``segpipe serve`` runs the nightly deployment, and under which name."""

    cron: str = option("0 2 * * *", help="schedule, five cron fields (default: 02:00 every night)", metavar="CRON")
    timezone: str = option("UTC", help="time zone of the schedule, e.g. Europe/Zurich", metavar="TZ")
    name: str = option("nightly", help="deployment name", metavar="NAME")

    def __post_init__(self) -> None:
        if len(self.cron.split()) != 5:
            raise ConfigError(f"--cron must have five fields (minute hour day month weekday), got {self.cron!r}")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"--timezone {self.timezone!r} is not a time zone; e.g. UTC or Europe/Zurich") from None
        if not self.name.strip():
            raise ConfigError("--name must not be empty")


@dataclass(frozen=True, kw_only=True)
class DatasetOptions:
    """How a data set is read and run (the run options of each scene are :class:`RunOptions`)."""

    recursive: bool = option(False, help="a folder: also the scenes of its subfolders")
    asset: str | None = option(None, help="STAC: the asset to segment, by key", metavar="KEY")
    asset_role: str | None = option(None, help="STAC: the first asset with this role", metavar="ROLE")
    allow_local_assets: bool = option(
        False, help="STAC: let a remote catalog or API name files of this machine as assets (refused by default)"
    )
    collections: tuple[str, ...] = option(
        (), help="STAC API: a collection to search (repeatable)", flag="--collection", metavar="ID", repeatable=True
    )
    bbox: str | None = option(None, help="STAC API: west,south,east,north in degrees", metavar="W,S,E,N")
    datetime: str | None = option(
        None, help="STAC API: an instant or interval, e.g. 2026-11-01/2026-11-30", metavar="RANGE"
    )
    scenes_at_once: int = option(1, help="scenes segmented at the same time on the session", metavar="N")
    retries: int = option(1, help="times a scene that failed for an internal reason is tried again", metavar="N")
    notify: str | None = option(
        None,
        help="URL the night's report is POSTed to (JSON) when a scene fails (default: $SEGPIPE_NOTIFY_URL, which "
        "keeps a webhook's secret out of a deployment's parameters)",
        metavar="URL",
    )
    write_probabilities: bool = option(
        False, help="also write <scene>.probabilities.tif for every scene", flag="--probabilities"
    )
    vector_format: str | None = option(
        None,
        help="also write every scene's polygons, <scene>.polygons.<format>: auto (QuPath GeoJSON for a slide, "
        "GeoPackage otherwise), gpkg, geojson or parquet",
        choices=VECTOR_FORMATS,
    )

    def __post_init__(self) -> None:
        if self.vector_format is not None and self.vector_format not in VECTOR_FORMATS:
            raise ConfigError(f"--vector-format must be one of {', '.join(VECTOR_FORMATS)}, got {self.vector_format!r}")
        if self.scenes_at_once < 1:
            raise ConfigError(f"--scenes-at-once must be >= 1, got {self.scenes_at_once}")
        if self.retries < 0:
            raise ConfigError(f"--retries must be >= 0, got {self.retries}")
        if self.asset and self.asset_role:
            raise ConfigError("give --asset or --asset-role, not both")
        if self.bbox is not None:
            parts = self.bbox.split(",")
            try:
                values = [float(v) for v in parts]
            except ValueError:
                values = []
            if len(values) != 4:
                raise ConfigError(f"--bbox must be four numbers west,south,east,north, got {self.bbox!r}")

    def check_with(self, options: RunOptions) -> None:
        """Refuse run options that need a data-set option not given (before any scene is looked at).

        Raises:
            ConfigError: ``--vector-simplify`` or ``--vector-min-area`` without ``--vector-format``.
        """
        if self.vector_format is None and (options.vector_simplify or options.vector_min_area):
            raise ConfigError(
                "--vector-simplify and --vector-min-area shape the polygons of --vector-format; give --vector-format "
                f"({', '.join(VECTOR_FORMATS)}) or leave them out"
            )

    def vector_suffix(self, *, slide: bool) -> str | None:
        """The suffix of a scene's polygon file (``.gpkg``, ``.geojson``, ``.parquet``), or None without
        ``--vector-format``; ``auto`` is ``.geojson`` (QuPath's, in level-0 pixels) for a slide, else ``.gpkg``."""
        if self.vector_format is None:
            return None
        if self.vector_format == "auto":
            return ".geojson" if slide else ".gpkg"
        return f".{self.vector_format}"

    def search(self, source: str) -> StacSearch | None:
        """The STAC API search a ``stac-api+https://...`` source asks for, narrowed by these options."""
        if not source.startswith(STAC_API_PREFIX):
            return None
        bbox = tuple(float(v) for v in self.bbox.split(",")) if self.bbox else None
        return StacSearch(source.removeprefix(STAC_API_PREFIX), self.collections, bbox, self.datetime)  # type: ignore[arg-type]
