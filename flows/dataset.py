"""The ``segment_dataset`` flow (every scene of a folder) and its nightly deployment.

A nightly run processes what is new: a scene whose mask and summary already exist is skipped unless
``overwrite``. One Ray instance serves all scenes of a run (start-up stays out of the per-scene path). A scene
that fails is reported and the others go on; the flow fails at the end, naming the failed scenes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow

from flows.segment import segment_scene
from pipeline.dispatch import ray_session
from pipeline.plan import RunSettings
from segpipe.errors import ConfigError, SegpipeError

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


@flow(name="segment_dataset", persist_result=False)
def segment_dataset(
    input_dir: str,
    output_dir: str,
    model: str = "default",
    blend: str = "crop",
    device: str = "auto",
    workers: int | None = None,
    work_dir: str | None = None,
    ray_address: str | None = None,
    overwrite: bool = False,
    executor: str = "ray",
) -> dict[str, Any]:
    """Segment every raster in ``input_dir`` into ``output_dir`` (one COG mask and summary per scene).

    Returns:
        ``{"done": [...], "skipped": [...], "failed": {scene: error}}`` with scene paths.
    """
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    skipped: list[str] = []
    failed: dict[str, str] = {}
    with ray_session(ray_address, _cores()) if executor == "ray" else contextlib.nullcontext():
        for scene in scenes_in(input_dir):
            output = mask_path(output_dir, scene)
            summary = output.with_name(output.stem + ".summary.json")
            if output.exists() and summary.exists() and not overwrite:
                skipped.append(str(scene))
                continue
            settings = RunSettings(
                input=str(scene),
                output=str(output),
                model=model,
                blend=blend,
                device=device,
                workers=workers,
                work_dir=str(Path(work_dir) / scene.stem) if work_dir else None,
                ray_address=ray_address,
                overwrite=True,
                executor=executor,
            )
            try:
                segment_scene.with_options(flow_run_name=scene.name)(settings)
                done.append(str(scene))
            except SegpipeError as exc:
                log.error("%s: %s", scene, exc)
                failed[str(scene)] = str(exc)
    result = {"done": done, "skipped": skipped, "failed": failed}
    if failed:
        reasons = "; ".join(f"{Path(k).name}: {v}" for k, v in failed.items())
        raise SegpipeError(f"{len(failed)} of {len(done) + len(failed)} scenes failed: {reasons}")
    return result


def _cores() -> int:
    return os.cpu_count() or 1


def serve_nightly(
    input_dir: str, output_dir: str, *, cron: str = "0 2 * * *", name: str = "nightly", **options: Any
) -> None:
    """Serve ``segment_dataset`` on a cron schedule (blocks; Ctrl-C stops it).

    Point ``PREFECT_API_URL`` at a Prefect server to see and manage the runs in its UI; without it the
    schedule lives in Prefect's ephemeral API for as long as this process runs.
    """
    segment_dataset.serve(
        name=name,
        cron=cron,
        parameters={"input_dir": input_dir, "output_dir": output_dir, **options},
        description=f"segment new scenes of {input_dir} into {output_dir}",
    )
