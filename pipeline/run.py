"""Run one scene through the stages: validate -> ingest -> infer -> stitch -> export -> summary.

:func:`run_scene` is the whole job as a plain function; it takes a ``wrap`` that turns each stage into
whatever runs it (identity for a plain call, ``prefect.task`` in :mod:`flows.segment`). It holds the locks,
times the stages, shows progress bars and writes the run summary. Only paths, settings and small stats pass
between stages; pixels stay in the work store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline import store as ws
from pipeline.dispatch import InferResult, run_inference
from pipeline.export import ExportResult, atomic_output, export_cog
from pipeline.infer import InferOptions
from pipeline.ingest import IngestResult, ingest
from pipeline.plan import RunPlan, RunSettings, make_plan
from pipeline.stitch import StitchResult, stitch
from segpipe.errors import OutputError

log = logging.getLogger(__name__)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _bar(total: int, desc: str, unit: str) -> tqdm:
    scale = unit == "px"
    return tqdm(
        total=total,
        desc=f"{desc:<7}",
        unit="px" if scale else unit,
        unit_scale=scale,
        leave=False,
        disable=None,  # only on a terminal
        dynamic_ncols=True,
    )


def ingest_stage(plan: RunPlan, store_path: str) -> IngestResult:
    group = ws.open_store(store_path)
    with _bar(plan.scene.pixels, "ingest", "px") as bar:
        return ingest(plan.scene, group, chunk_size=plan.tile_size, workers=_cores(), progress=bar.update)


def infer_stage(plan: RunPlan, store_path: str) -> InferResult:
    s = plan.settings
    options = InferOptions(
        model=plan.model.path,
        tile_size=plan.tile_size,
        halo=plan.halo,
        blend=s.blend,  # type: ignore[arg-type]
        batch_size=plan.batch_size,
        device=s.device,
        threads=_cores(),
        probabilities=bool(s.probabilities),
    )
    key = ws.run_key(
        model=plan.model.checksum,
        tile_size=plan.tile_size,
        halo=plan.halo,
        blend=s.blend,
        batch_size=plan.batch_size,
        probabilities=bool(s.probabilities),
        fingerprint=plan.scene.fingerprint,
    )
    group = ws.open_store(store_path)
    with _bar(len(plan.grid), "infer", "tile") as bar:
        return run_inference(
            store_path,
            group,
            plan.grid,
            options,
            classes=len(plan.model.classes),
            key=key,
            executor=s.executor,
            workers=s.workers,
            ray_address=s.ray_address,
            progress=bar.update,
        )


def stitch_stage(plan: RunPlan, store_path: str) -> StitchResult:
    group = ws.open_store(store_path)
    with _bar(len(plan.grid), "stitch", "tile") as bar:
        return stitch(group, plan.grid, plan.settings.blend, workers=_cores(), progress=bar.update)  # type: ignore[arg-type]


def export_stage(plan: RunPlan, store_path: str, name: str, output: str) -> ExportResult:
    group = ws.open_store(store_path)
    with _bar(plan.scene.pixels, "export", "px") as bar:
        return export_cog(
            group,
            name,
            output,
            scratch_dir=Path(store_path).parent,
            class_names=plan.model.classes,
            colours=plan.model.colours,
            workers=_cores(),
            progress=bar.update,
        )


@contextlib.contextmanager
def work_directory(work_dir: str | None) -> Iterator[Path]:
    """The given work directory (kept, so a re-run resumes), or a temporary one removed afterwards."""
    if work_dir:
        path = Path(work_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    _remove_abandoned_work_dirs()
    # locked before it gets the name the sweep looks for, so a live run's directory is never taken for abandoned
    tmp = Path(tempfile.mkdtemp(prefix="segpipe-new-"))
    handle = open(tmp / RUN_LOCK, "w")  # noqa: SIM115 - held open for the lock's lifetime
    fcntl.flock(handle, fcntl.LOCK_EX)
    path = tmp.with_name("segpipe-work-" + tmp.name.removeprefix("segpipe-new-"))
    os.rename(tmp, path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        handle.close()


RUN_LOCK = ".segpipe-run.lock"


def _remove_abandoned_work_dirs() -> None:
    """Remove the temporary work directories of killed runs (SIGKILL, OOM, power loss skip ``finally``).

    A live run holds the flock on its directory's lock file; the kernel drops it when the run dies. Only this
    user's ``segpipe-work-*`` directories with a lock file nobody holds are removed.
    """
    for path in Path(tempfile.gettempdir()).glob("segpipe-work-*"):
        lock = path / RUN_LOCK
        try:
            if path.stat().st_uid != os.getuid() or not lock.is_file():
                continue
            with open(lock, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                log.info("removing %s, the work directory of a run that was killed", path)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # BlockingIOError: a live run holds it; or it vanished meanwhile
            continue


def _crs_name(wkt: str | None) -> str | None:
    if not wkt:
        return None
    from rasterio.crs import CRS

    crs = CRS.from_wkt(wkt)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def build_summary(
    plan: RunPlan,
    seconds: dict[str, float],
    ingested: IngestResult,
    inferred: InferResult,
    exported: ExportResult,
    store_path: str,
) -> dict[str, Any]:
    """Run summary (JSON-friendly): scene, model, tiles, seconds per stage, throughput, class histogram."""
    s, scene = plan.settings, plan.scene
    names = plan.model.classes
    histogram = {
        (names[k] if k < len(names) else ("nodata" if k == ws.MASK_NODATA else str(k))): v
        for k, v in sorted(exported.histogram.items())
    }
    total = seconds["total"]
    return {
        "input": s.input,
        "output": os.path.abspath(s.output),
        "probabilities": os.path.abspath(s.probabilities) if s.probabilities else None,
        "work_store": store_path if s.work_dir else None,
        "scene": {
            "width": scene.width,
            "height": scene.height,
            "bands": scene.count,
            "dtype": scene.dtype,
            "crs": _crs_name(scene.crs_wkt),
            "georeferenced": scene.georeferenced,
            "megapixels": round(scene.pixels / 1e6, 3),
        },
        "model": {
            "name": plan.model.name,
            "architecture": plan.model.architecture,
            "sha256": plan.model.checksum,
            "trained": bool(plan.model.provenance.get("trained", True)),
        },
        "tiles": {
            "total": inferred.tiles_total,
            "skipped_nodata": inferred.tiles_skipped_nodata,
            "reused": inferred.tiles_reused,
            "computed": inferred.tiles_computed,
            "tile_size": plan.tile_size,
            "halo": plan.halo,
            "blend": s.blend,
            "batch_size": plan.batch_size,
        },
        "workers": inferred.workers,
        "device": inferred.device,
        "segmenter_seconds": {
            name: round(sum(float(stat.get(key, 0.0)) for stat in inferred.worker_stats), 3)
            for name, key in (
                ("busy", "seconds"),
                ("compute", "compute_s"),
                ("waiting_for_reads", "wait_read_s"),
                ("waiting_for_writes", "wait_write_s"),
            )
        },
        "ingest_reused": ingested.reused,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "megapixels_per_second": round(scene.pixels / 1e6 / total, 3) if total > 0 else None,
        "class_histogram": histogram,
    }


def write_json_atomically(data: dict[str, Any], path: Path) -> None:
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"could not write {path}: {exc}; check free space and permissions") from None


Stage = Callable[..., Any]


def _identity(stage: Stage) -> Stage:
    return stage


def run_scene(settings: RunSettings, *, wrap: Callable[[Stage], Stage] = _identity) -> dict[str, Any]:
    """Segment one scene: GeoTIFF/COG (or any GDAL raster) in, georeferenced COG mask out.

    Args:
        settings: What to run (the CLI builds it from its options).
        wrap: Applied to each stage function before it is called (e.g. to make it a Prefect task).
    Returns:
        The run summary (also written next to the output as ``<name>.summary.json``).
    """
    started = time.perf_counter()
    plan = make_plan(settings)
    seconds: dict[str, float] = {"validate": time.perf_counter() - started}
    locks = [(settings.output, "output")]
    if settings.probabilities:
        locks.append((settings.probabilities, "output"))
    with contextlib.ExitStack() as stack:
        for target, what in locks:
            stack.enter_context(ws.exclusive_lock(target, what))
        work = stack.enter_context(work_directory(settings.work_dir))
        store_path = str(ws.store_path(work.resolve(), settings.input))
        stack.enter_context(ws.exclusive_lock(store_path, "work store"))
        t = time.perf_counter()
        ingested = wrap(ingest_stage)(plan, store_path)
        seconds["ingest"] = time.perf_counter() - t
        t = time.perf_counter()
        inferred = wrap(infer_stage)(plan, store_path)
        seconds["infer"] = time.perf_counter() - t
        t = time.perf_counter()
        if settings.blend != "crop":
            wrap(stitch_stage)(plan, store_path)
        seconds["stitch"] = time.perf_counter() - t
        t = time.perf_counter()
        written: list[Path] = []
        try:
            exported = wrap(export_stage)(plan, store_path, ws.MASK, settings.output)
            written.append(Path(settings.output))
            if settings.probabilities:
                wrap(export_stage)(plan, store_path, ws.PROBABILITIES, settings.probabilities)
                written.append(Path(settings.probabilities))
            seconds["export"] = time.perf_counter() - t
            seconds["total"] = time.perf_counter() - started
            summary = build_summary(plan, seconds, ingested, inferred, exported, store_path)
            write_json_atomically(summary, plan.summary_path)
        except BaseException:
            for path in written:  # a failed run leaves no OUTPUT: not the mask when the probabilities fail
                path.unlink(missing_ok=True)
            raise
    return summary
