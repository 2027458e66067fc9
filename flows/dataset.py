"""The ``segment_dataset`` flow: every scene of a folder, in one warm session.

A run processes what is new: a scene whose mask and summary already exist is skipped unless ``overwrite``. One
session (:class:`~segpipe.pipeline.session.Session`: a Ray connection and its segmenters, or in-process
segmenters) serves all scenes of a run, so start-up and model loading stay out of the per-scene path. A scene that
fails is reported and the others go on; the flow fails at the end, naming the failed scenes. Its nightly
deployment is :mod:`segpipe.flows.deploy`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from prefect import flow

from segpipe.core.errors import ConfigError, SegpipeError
from segpipe.flows.segment import segment_scene
from segpipe.pipeline.session import Session, auto_uses_ray
from segpipe.pipeline.settings import RunOptions, RunSettings

log = logging.getLogger(__name__)

RASTER_PATTERNS = ("*.tif", "*.tiff", "*.jp2", "*.vrt")


def scenes_in(input_dir: str, patterns: tuple[str, ...] = RASTER_PATTERNS) -> list[Path]:
    """The rasters of a folder (not recursive), sorted by name."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise ConfigError(f"input folder {input_dir!r} does not exist or is not a folder")
    found = {p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def mask_path(output_dir: str, scene: Path) -> Path:
    """Where a scene's mask goes: ``<output_dir>/<scene stem>.mask.tif``."""
    return Path(output_dir) / f"{scene.stem}.mask.tif"


def probabilities_path(output_dir: str, scene: Path) -> Path:
    """Where a scene's probabilities go: ``<output_dir>/<scene stem>.probabilities.tif``."""
    return Path(output_dir) / f"{scene.stem}.probabilities.tif"


@flow(name="segment_dataset", persist_result=False)
def segment_dataset(
    input_dir: str,
    output_dir: str,
    options: RunOptions | None = None,
    probabilities: bool = False,
) -> dict[str, Any]:
    """Segment every raster in ``input_dir`` into ``output_dir`` (one COG mask and summary per scene).

    Args:
        input_dir: Folder of scenes (see :data:`RASTER_PATTERNS`).
        output_dir: Folder for the outputs (created if missing).
        options: The run options of every scene (default: all defaults). ``work_dir`` holds one folder per scene;
            ``overwrite`` redoes scenes that already have a mask.
        probabilities: Also write per-class probabilities for every scene.

    Returns:
        ``{"done": [...], "skipped": [...], "failed": {scene: error}}`` with scene paths.
    """
    options = options or RunOptions()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    skipped: list[str] = []
    failed: dict[str, str] = {}
    uses_ray = auto_uses_ray(
        address=options.ray_address, executor=options.executor, device=options.device, workers=options.workers, tiles=0
    )
    with Session(address=options.ray_address, ray=uses_ray, connect_timeout=options.ray_connect_timeout) as session:
        for scene in scenes_in(input_dir):
            output = mask_path(output_dir, scene)
            summary = output.with_name(output.stem + ".summary.json")
            if output.exists() and summary.exists() and not options.overwrite:
                skipped.append(str(scene))
                continue
            settings = dataclasses.replace(
                RunSettings.for_scene(
                    options,
                    input=str(scene),
                    output=str(output),
                    probabilities=str(probabilities_path(output_dir, scene)) if probabilities else None,
                ),
                work_dir=str(Path(options.work_dir) / scene.stem) if options.work_dir else None,
                overwrite=True,  # only reached when the scene has no complete outputs, or with overwrite
            )
            try:
                segment_scene.with_options(flow_run_name=scene.name)(settings, session=session)
                done.append(str(scene))
            except SegpipeError as exc:
                log.error("%s: %s", scene, exc)
                failed[str(scene)] = str(exc)
    result = {"done": done, "skipped": skipped, "failed": failed}
    if failed:
        reasons = "; ".join(f"{Path(k).name}: {v}" for k, v in failed.items())
        raise SegpipeError(f"{len(failed)} of {len(done) + len(failed)} scenes failed: {reasons}")
    return result
