"""Read stage: open a scene with the source that reads it, describe it, sample it.

Sources (:mod:`segpipe.pipeline.sources`, registered in :data:`segpipe.pipeline.sources.SOURCES`) are tried in
order by content (their ``probe``), not by file extension: the whole-slide source (OpenSlide) takes the slides
OpenSlide recognises, and the GDAL source accepts what GDAL opens and comes last. A new input format is one module
in ``pipeline/sources/`` and one entry in that registry; the stages do not change.

Validation happens when a source opens, before any work starts, so a bad scene fails in seconds with one clear
message. Each open source is one handle: threads open their own.

``--mpp`` also chooses the source: a selection with :attr:`~segpipe.pipeline.scene.Selection.mpp` is opened by the
whole-slide source whatever the probes say (:func:`open_source`), which reads a plain, not georeferenced RGB image
(TIFF, PNG, JPEG) as a one-level slide and refuses a georeferenced scene; without it, sources are chosen by content
as above.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from segpipe.core.errors import InputError
from segpipe.core.location import Location
from segpipe.core.paths import is_remote
from segpipe.core.tiles import sample_windows
from segpipe.pipeline.scene import SceneInfo, SceneSource, Selection, is_slide_name
from segpipe.pipeline.sources import SOURCES, source_type

log = logging.getLogger(__name__)


def _remote_slide_problem(path: str) -> str | None:
    """Why a slide at a URL cannot be read, or None for a local path or a scene of another kind."""
    if (is_remote(path) or not Location(path).is_local or path.startswith("/vsi")) and is_slide_name(path):
        return (
            f"input {path!r} is a whole-slide image at a URL, but OpenSlide reads local files only; copy the slide "
            "to local disk, or on a cluster to shared storage mounted at the same path on every node, and give "
            "that path"
        )
    return None


def open_source(path: str, *, source: str | None = None, selection: Selection | None = None) -> SceneSource:
    """Open ``path`` (its ``selection``, default all bands) with the named source; else, for a selection with
    ``mpp`` (``--mpp``), with the whole-slide source (it reads a plain RGB image as a one-level slide, and says why
    when it cannot: a georeferenced scene, another kind of image); else with the first registered source whose
    ``probe`` accepts it.

    Raises:
        InputError: no source reads it, a whole-slide image is at a URL (OpenSlide reads local files only), or the
            scene is not usable (the source's message).
    """
    chosen = selection or Selection()
    problem = _remote_slide_problem(path)
    if problem:  # GDAL would read the TIFF inside some of them, labels and all, or fail with a codec error
        raise InputError(problem)
    if source is not None:
        return source_type(source)(path, chosen)
    if chosen.mpp is not None:  # a microscopy image, whatever it states: never a plain picture for GDAL
        return source_type("slide")(path, chosen)
    for name in SOURCES:
        kind = source_type(name)
        if kind.probe(path):
            return kind(path, chosen)
    raise InputError(
        f"input {path!r} is not a format segpipe reads; give a GeoTIFF, COG, JPEG, PNG or a whole-slide image"
    )


def describe_scene(path: str, selection: Selection | None = None, *, mpp: float | None = None) -> SceneInfo:
    """Open, validate and describe a scene (its ``selection``) without reading its pixels; a scene without
    georeferencing works, with one warning.

    Args:
        path: The scene.
        selection: What is read of it (None: the whole file).
        mpp: ``--mpp``: open it as a microscopy image of this level-0 pixel size (micrometres), with the
            whole-slide source (see :func:`open_source`). Without ``selection`` the description is still of the
            file as it states itself; the run's selection applies the pixel size
            (:func:`segpipe.pipeline.fit.fit_scene`).

    Raises:
        InputError: with a message saying what is wrong with the scene and what to do.
    """
    chosen = selection if mpp is None else replace(selection or Selection(), mpp=mpp)
    with open_source(path, selection=chosen) as src:
        info = src.info
        if selection is None and mpp is not None:
            info = src.file  # type: ignore[attr-defined]  # the whole-slide source's description of the file
    if not info.georeferenced and info.pyramid is None:  # a slide's grid is in microns, not a CRS
        log.warning("%s has no georeferencing (no CRS, identity transform): the mask keeps pixel coordinates", path)
    return info


def sample_scene(scene: SceneInfo, *, windows: int = 64, size: int = 128) -> tuple[np.ndarray, float]:
    """A bounded sample of a scene's pixels, for statistics (a percentile stretch, a nodata hint): ``windows``
    squares of ``size`` pixels spread evenly over the scene (:func:`segpipe.core.tiles.sample_windows`; at most
    ``windows * size**2`` pixels, 1 MP by default, whatever the scene's size).

    Returns:
        ``(values, zero_share)``: the valid pixels (bands, N) as float64, and the share of sampled pixels that are
        0 in every band and not nodata (a border that may be nodata without saying so).
    """
    parts, zeros, total = [], 0, 0
    with open_source(scene.path, source=scene.source, selection=scene.selection) as src:
        for window in sample_windows(scene.width, scene.height, count=windows, size=size):
            pixels, ok = src.read(window)
            valid = ok.astype(bool)
            zeros += int(((pixels == 0).all(axis=0) & valid).sum())
            total += valid.size
            parts.append(pixels[:, valid].astype(np.float64))
    values = np.concatenate(parts, axis=1) if parts else np.zeros((scene.count, 0))
    return values, zeros / total if total else 0.0
