"""Fit a scene to a model's input: which bands, what is nodata, and how values are scaled, decided once per run.

:func:`fit_scene` takes the description of the whole file and the model's metadata and returns a :class:`SceneFit`:

- the bands (:func:`segpipe.core.bands.match_bands`: ``--bands``, else by the bands' names, else in order) and
  ``--nodata``, as the scene's :class:`~segpipe.pipeline.scene.Selection` (ingest then reads only those bands);
- the pixel map (:class:`~segpipe.core.pixels.PixelMap`): ``--scaling`` when given; else, when the scene's dtype
  does not fit the model's input contract (:class:`~segpipe.models.metadata.InputContract`), the contract's
  scaling, or one clear error when the contract says ``refuse``; a percentile stretch is computed here from a
  bounded sample of the scene's valid pixels (:func:`segpipe.pipeline.read.sample_scene`);
- for a whole-slide image, the pixel size it is read at (``--resolution``, else the model's ``resolution``, else
  level 0 with a warning; :mod:`segpipe.core.pyramid`), the tissue detection (``--tissue``) and the level-0 pixel
  size that replaces the file's (``--mpp``), also in the selection;
- warnings a user should see: bands taken in order because the file does not name them, values stretched, a
  border of zeros that may be nodata without the file saying so.

Nothing is classified silently: a scene that does not fit is stretched as the model says (with a warning and a
record in the summary) or refused with one line that says what was found, what the model expects and the option
that fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from segpipe.core.bands import BandMatch, match_bands, scene_band_names
from segpipe.core.errors import ConfigError, InputError, ModelError
from segpipe.core.pixels import PixelMap, Scaling, fits, pixel_map
from segpipe.core.pyramid import parse_resolution, plan_read
from segpipe.pipeline.read import open_source, sample_scene
from segpipe.pipeline.scene import SceneInfo, Selection

if TYPE_CHECKING:
    from segpipe.models.metadata import ModelMetadata

#: A share of sampled pixels that are 0 in every band, above which a scene without nodata gets a hint.
ZERO_BORDER_SHARE = 0.01


@dataclass(frozen=True)
class SceneFit:
    """How a scene feeds a model (see the module docstring).

    Attributes:
        scene: The description of what the run reads (the selected bands, the nodata).
        bands: The bands chosen and how.
        scaling: The scaling applied (text), or None (values used as they are).
        pixel_map: What the scaling gives for this scene, applied to every tile before normalisation; None
            without a scaling, or when it was not computed (``compute=False``).
        warnings: One line each.
        slide: For a whole-slide image, how it is read (level, factor, pixel size, tissue), else None.
    """

    scene: SceneInfo
    bands: BandMatch
    scaling: str | None
    pixel_map: PixelMap | None
    warnings: tuple[str, ...] = ()
    slide: dict[str, Any] | None = None

    def to_summary(self) -> dict[str, Any]:
        """The ``input`` part of the run summary."""
        return {
            "bands": list(self.bands.indexes),
            "bands_by": self.bands.how,
            "nodata": self.scene.to_attrs()["nodata"],
            "scaling": self.scaling,
            "pixel_map": self.pixel_map.to_dict() if self.pixel_map else None,
            "warnings": list(self.warnings),
            **({"slide": self.slide} if self.slide is not None else {}),
        }


def fit_scene(
    file: SceneInfo,
    meta: ModelMetadata,
    *,
    bands: str | None = None,
    nodata: float | None = None,
    scaling: str | None = None,
    resolution: str | None = None,
    tissue: str = "none",
    mpp: float | None = None,
    compute: bool = True,
) -> SceneFit:
    """Decide how ``file`` (the description of the whole file) feeds the model of ``meta``.

    Args:
        file: :func:`segpipe.pipeline.read.describe_scene` of the input, without a selection.
        meta: The model's metadata.
        bands: ``--bands``.
        nodata: ``--nodata``.
        scaling: ``--scaling`` (overrides the model's contract).
        resolution: ``--resolution`` (slides: overrides the model's ``resolution``; ``native``: level 0).
        tissue: ``--tissue`` (slides: ``otsu`` or ``none``).
        mpp: ``--mpp``: level 0's pixel size in micrometres, replacing the file's (``file`` must then be described
            with it: ``describe_scene(path, mpp=mpp)``).
        compute: Compute the pixel map (a percentile stretch reads a sample of the scene); False: only decide
            (what an output key needs: the scaling's text and the scene's fingerprint determine the map).

    Raises:
        ModelError: the scene's bands or values do not fit the model and no option says how (the message names
            the option).
        ConfigError: an option that contradicts the scene.
    """
    warnings: list[str] = []
    match, scene, slide = _select(file, meta, bands, nodata, resolution, tissue, mpp, warnings)
    if slide is not None and compute and scene.selection.tissue != "none":
        slide.update(_tissue_found(scene))
    if match.how == "order" and scene.count > 1:
        warnings.append(
            f"the scene's bands are not named; taken in file order as {', '.join(meta.bands)} (--bands to choose)"
        )
    asked = Scaling.parse(scaling) if scaling is not None else None
    chosen = asked if asked is not None else _contract_scaling(scene, meta)
    if chosen is None or (chosen.kind == "none"):
        return SceneFit(scene, match, None if chosen is None else str(chosen), None, tuple(warnings), slide)
    if chosen.kind in ("minmax", "percentile") and meta.input is None:
        raise ConfigError(
            f"--scaling {chosen}: the model states no input range to map onto (no 'input' in its metadata); use "
            "--scaling linear:SCALE,OFFSET"
        )
    if not compute:
        return SceneFit(scene, match, str(chosen), None, tuple(warnings), slide)
    mapped = _pixel_map(scene, meta, chosen, nodata, warnings)
    if asked is None and mapped is not None:
        contract = meta.input
        warnings.insert(
            0,
            f"the scene is {scene.dtype} but the model takes {contract.dtype if contract else '?'} values; scaled "
            f"by {chosen} as the model's input contract says ({_describe_map(mapped)}; --scaling to change)",
        )
    return SceneFit(scene, match, str(chosen), mapped, tuple(warnings), slide)


def _select(
    file: SceneInfo,
    meta: ModelMetadata,
    bands: str | None,
    nodata: float | None,
    resolution: str | None,
    tissue: str,
    mpp: float | None,
    warnings: list[str],
) -> tuple[BandMatch, SceneInfo, dict[str, Any] | None]:
    """The bands matched to the model's, the description of what is read (the file with its selection) and, for a
    slide, how it is read (see :func:`fit_scene`'s arguments)."""
    names = scene_band_names(file.band_descriptions, file.colour_interpretations)
    match = match_bands(
        meta.bands, names, descriptions=file.band_descriptions, asked=bands, where=f"the scene {file.path!r}"
    )
    target, slide = _slide_read(file, meta, resolution, tissue, mpp, warnings)
    selection = Selection(
        None if match.is_identity(file.count) else match.indexes,
        nodata,
        target,
        tissue if file.pyramid is not None else "none",
        mpp,  # refused by select() for a scene that is not a slide
    )
    scene = file.select(selection)
    if slide is not None:
        slide.update(width=scene.width, height=scene.height)
    return match, scene, slide


def _tissue_found(scene: SceneInfo) -> dict[str, Any]:
    """The tissue share and Otsu threshold of a slide read with tissue detection (computed once per process; ingest
    reuses it)."""
    with open_source(scene.path, source=scene.source, selection=scene.selection) as src:
        found = getattr(src, "tissue", None)
    return {} if found is None else {"tissue_share": round(found.share, 4), "tissue_threshold": found.threshold}


def _contract_scaling(scene: SceneInfo, meta: ModelMetadata) -> Scaling | None:
    """The model's contract scaling for a scene whose dtype does not fit the model's input, else None.

    Raises:
        ModelError: the contract says ``refuse`` (the message names the ``--scaling`` choices).
    """
    contract = meta.input
    if contract is None or fits(scene.dtype, contract.range, contract.dtype):
        return None
    chosen = Scaling.parse(contract.scaling)
    if chosen.kind == "refuse":
        raise ModelError(
            f"the scene is {scene.dtype} but the model takes {contract.dtype} values in "
            f"{contract.range[0]:g}..{contract.range[1]:g}; say how to scale it: --scaling percentile "
            "(a per-band stretch), --scaling minmax:MIN,MAX, --scaling linear:SCALE,OFFSET or --scaling product "
            "(the product's own scale and offset)"
        )
    return chosen


def _pixel_map(
    scene: SceneInfo, meta: ModelMetadata, chosen: Scaling, nodata: float | None, warnings: list[str]
) -> PixelMap | None:
    """What ``chosen`` gives for this scene, from a bounded sample of its pixels where the scaling needs one (or a
    hint about a zero border is due: appended to ``warnings``)."""
    contract = meta.input
    value_range = contract.range if contract is not None else (0.0, 1.0)
    sample = None
    if chosen.needs_sample or (nodata is None and scene.nodata is None):
        sample, zero_share = sample_scene(scene)
        if nodata is None and scene.nodata is None and zero_share > ZERO_BORDER_SHARE:
            warnings.append(
                f"{zero_share:.1%} of the sampled pixels are 0 in every band and the scene has no nodata value; "
                "if they are nodata (a border), pass --nodata 0"
            )
    return pixel_map(
        chosen,
        bands=scene.count,
        value_range=value_range,
        sample=sample,
        product=(scene.scales, scene.offsets) if scene.scales else None,
    )


def _describe_map(mapped: PixelMap) -> str:
    """``per band [lo..hi] -> range`` for a stretch, or the scale and offset."""
    if mapped.clip is None:
        return f"x * {mapped.scale[0]:g} + {mapped.offset[0]:g}"
    lows = [(mapped.clip[0] - b) / a for a, b in zip(mapped.scale, mapped.offset, strict=True)]
    highs = [(mapped.clip[1] - b) / a for a, b in zip(mapped.scale, mapped.offset, strict=True)]
    spans = ", ".join(f"{lo:.4g}..{hi:.4g}" for lo, hi in zip(lows, highs, strict=True))
    return f"bands {spans} -> {mapped.clip[0]:g}..{mapped.clip[1]:g}"


def _slide_read(
    file: SceneInfo, meta: ModelMetadata, resolution: str | None, tissue: str, mpp: float | None, warnings: list[str]
) -> tuple[float | None, dict[str, Any] | None]:
    """The pixel size (micrometres) a slide is read at, and how it is read (for the summary); (None, None) for a
    scene that is not a slide. ``mpp`` (``--mpp``) replaces level 0's pixel size. Appends the warnings a user
    should see.

    Raises:
        InputError: ``--resolution`` asks for a pixel size the slide cannot give (it states none).
        ConfigError: ``--resolution`` in metres for a slide.
    """
    asked = parse_resolution(resolution) if resolution is not None else None
    if file.pyramid is None:
        if asked is not None:
            warnings.append(f"--resolution {asked} applies to whole-slide images; this scene is read as it is")
        return None, None
    pyramid = file.pyramid
    stated = pyramid.mpp
    if mpp is not None:
        pyramid = replace(pyramid, mpp=(mpp, mpp))
        if stated is not None and abs(stated[0] / mpp - 1) > 1e-6:
            warnings.append(f"the slide states {stated[0]:g} um per pixel; --mpp {mpp:g} replaces it")
    if asked is not None and asked.unit != "um":
        raise ConfigError(f"--resolution {asked}: a slide's pixel size is in micrometres; give e.g. 0.5um")
    model = meta.resolution if meta.resolution is not None and meta.resolution.unit == "um" else None
    target = asked.value if asked is not None else (model.value if model is not None else None)
    if resolution is None and model is None:
        warnings.append(
            "the model states no resolution for slides (micrometres per pixel); the slide is read at level 0"
            + (f" ({pyramid.mpp[0]:g} um per pixel)" if pyramid.mpp else "")
            + "; --resolution to choose"
        )
    if target is not None and pyramid.mpp is None:
        if asked is not None:
            raise InputError(
                f"slide {file.path!r} states no pixel size (microns per pixel), so it cannot be read at "
                f"{asked}; pass --resolution native, or state it with --mpp"
            )
        warnings.append(
            f"the slide states no pixel size (microns per pixel); it is read at level 0, not at the model's {model}"
        )
        target = None
    read = plan_read(pyramid, target)
    level_mpp = pyramid.mpp[0] * pyramid.downsamples[read.level] if pyramid.mpp else None
    if target is not None and pyramid.mpp is not None and target < pyramid.mpp[0] * (1 - 0.025):
        warnings.append(
            f"the slide's finest pixel size is {pyramid.mpp[0]:g} um; it is enlarged {pyramid.mpp[0] / target:.3g}x "
            f"to {target:g} um per pixel"
        )
    return target, {
        "levels": len(pyramid.sizes),
        "level": read.level,
        "level_mpp": level_mpp,
        "target_mpp": target,
        "factor": read.factor,
        "resampled": read.resampled,
        "mpp": list(grid_mpp) if (grid_mpp := read.mpp(pyramid)) else None,
        "tissue": tissue,
        **({"mpp_option": mpp, "stated_mpp": list(stated) if stated else None} if mpp is not None else {}),
    }
