"""Where a run's and a night's files go, by name: pure functions of the output's path (a local path or an object URL;
:class:`~segpipe.core.location.Location`), shared by the stages that write them and the tools that find them again."""

from __future__ import annotations

from pathlib import Path

from segpipe.core.location import Location


def summary_path(output: str) -> str:
    """Where the summary of a run writing ``output`` goes: ``<output stem>.summary.json`` beside it (the stem of
    ``mask.ome.tif`` is ``mask``)."""
    out = Location(output)
    return str(out.beside(_stem(out.name) + ".summary.json"))


def _stem(name: str) -> str:
    stem = Path(name).stem
    return stem[:-4] if name.lower().endswith((".ome.tif", ".ome.tiff")) else stem


def mask_path(output_dir: str, scene_id: str, *, slide: bool = False) -> str:
    """Where a scene's mask goes in a data set's output folder: ``<output_dir>/<scene id>.mask.tif`` (a COG), or for
    a whole-slide image ``<scene id>.mask.ome.tif`` (a pyramidal OME-TIFF, what slide viewers open); its summary
    beside it as ``<scene id>.mask.summary.json``."""
    return str(Location(output_dir).child(f"{scene_id}.mask.ome.tif" if slide else f"{scene_id}.mask.tif"))


def vector_path(output_dir: str, scene_id: str, suffix: str) -> str:
    """Where a scene's polygons go: ``<output_dir>/<scene id>.polygons<suffix>``."""
    return str(Location(output_dir).child(f"{scene_id}.polygons{suffix}"))
