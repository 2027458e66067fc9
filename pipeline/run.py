"""Run one scene through the stages: validate -> ingest -> infer -> stitch -> export -> summary.

:func:`run_scene` is the whole job as a plain function; it takes a ``wrap`` that turns each stage into
whatever runs it (identity for a plain call, ``prefect.task`` in :mod:`segpipe.flows.segment`). It holds the
locks, times the stages, shows progress bars and writes the run summary. Only URLs, the plan and small stats pass
between stages; pixels stay in the work store.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from segpipe.core.errors import ConfigError
from segpipe.core.files import full_disk_named, temporary_folder
from segpipe.core.location import Location
from segpipe.core.runtime import available_cores, process_started_at
from segpipe.pipeline import store as ws
from segpipe.pipeline.dispatch import InferResult, run_inference
from segpipe.pipeline.executor import session_for
from segpipe.pipeline.ingest import IngestResult, index_scene, ingest
from segpipe.pipeline.merge import merger_type
from segpipe.pipeline.plan import RunPlan, make_plan
from segpipe.pipeline.reach import cluster_paths_problem
from segpipe.pipeline.session import Session
from segpipe.pipeline.settings import RunSettings
from segpipe.pipeline.sinks.base import VECTOR, ExportResult, remove_output, write_sink
from segpipe.pipeline.sinks.vector import VectorResult
from segpipe.pipeline.summary import build_summary

log = logging.getLogger(__name__)


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


def ingest_stage(plan: RunPlan, store_url: str, session: Session) -> IngestResult:
    """Copy the scene into the work store, or, for a scene the segmenters read in place (:attr:`RunPlan.in_place`),
    record it and its valid pixels per tile."""
    store = ws.WorkStore(store_url)
    with _bar(plan.scene.pixels, "ingest", "px") as bar:
        return (index_scene if plan.in_place else ingest)(
            plan.scene,
            store,
            chunk_size=plan.recipe.tile_size,
            workers=available_cores(),
            progress=bar.update,
            session=session,
        )


def infer_stage(plan: RunPlan, store_url: str, session: Session) -> InferResult:
    with _bar(len(plan.grid), "infer", "tile") as bar:
        return run_inference(
            ws.WorkStore(store_url),
            plan.grid,
            plan.recipe,
            plan.model.spec(plan.settings.device, available_cores()),
            classes=len(plan.model.classes),
            session=session,
            workers=plan.settings.workers,
            progress=bar.update,
        )


def stitch_stage(plan: RunPlan, store_url: str, session: Session) -> bool:
    """The merger's finalize step (blending overlapping tiles; nothing for ``crop``); returns whether there was
    work."""
    merger = merger_type(plan.recipe.blend)(ws.WorkStore(store_url), plan.grid, probabilities=plan.recipe.probabilities)
    with _bar(len(plan.grid), "stitch", "tile") as bar:
        return merger.finalize(workers=available_cores(), progress=bar.update, session=session)


def write_summary(path: str, summary: dict[str, Any]) -> None:
    """Write the run summary, the run's last file (a run killed before it left an unfinished run's outputs)."""
    Location(path).write_json(summary)


def export_stage(plan: RunPlan, store_url: str, scratch_dir: str, session: Session) -> list[ExportResult]:
    """Write every sink of the plan, mask first (the polygons of ``--vector`` are read back from it); a failure
    removes the outputs already written. On a cluster an output on object storage is written by a worker; a local
    output by this process (its pixels then cross it)."""
    store = ws.WorkStore(store_url)
    results: list[ExportResult] = []
    try:
        for sink in plan.sinks:
            if session.on_cluster and not Location(sink.path).is_local:
                task = (sink, store_url, plan.model.classes, plan.model.colours)
                results.append(session.map(write_sink, [task], workers=1)[0])
                continue
            with _bar(plan.scene.pixels, "export", "px") as bar:
                results.append(
                    sink.write(
                        store,
                        class_names=plan.model.classes,
                        colours=plan.model.colours,
                        scratch_dir=Path(scratch_dir),
                        workers=available_cores(),
                        progress=bar.update,
                    )
                )
            # the polygons read the mask back from its COG: its pixels cross this process once more
            session.driver_bytes += int(store.array(ws.MASK if sink.kind == VECTOR else sink.kind).nbytes)
    except BaseException:
        for done in results:  # a failed run leaves no OUTPUT: not the mask when the probabilities fail
            remove_output(done.path)
        raise
    return results


Stage = Callable[..., Any]


def _identity(stage: Stage) -> Stage:
    return stage


def run_scene(
    settings: RunSettings,
    *,
    plan: RunPlan | None = None,
    wrap: Callable[[Stage], Stage] = _identity,
    session: Session | None = None,
    started: float | None = None,
    plan_seconds: float = 0.0,
) -> dict[str, Any]:
    """Segment one scene: GeoTIFF/COG (or any GDAL raster) in, georeferenced COG mask out.

    Args:
        settings: What to run (the CLI builds it from its options).
        plan: ``make_plan(settings)`` when the caller has validated already (the model is then not loaded twice).
        wrap: Applied to each stage function before it is called (e.g. to make it a Prefect task).
        session: Where the work runs, kept by the caller across scenes; None: one for this run (Ray only where it
            pays, see :func:`segpipe.pipeline.executor.auto_uses_ray`), closed at the end.
        started: ``time.time()`` when the caller started (the summary's ``wall`` seconds count from it); default:
            when this process started.
        plan_seconds: Seconds the caller spent making ``plan`` (the summary's ``validate`` and part of ``total``).
    Returns:
        The run summary (also written next to the output as ``<name>.summary.json``).
    """
    started_run = time.perf_counter() - (plan_seconds if plan is not None else 0.0)
    plan = plan if plan is not None else make_plan(settings)
    seconds: dict[str, float] = {"validate": time.perf_counter() - started_run}
    with contextlib.ExitStack() as stack:
        local, store_url = _hold(plan, stack)
        with _timed(seconds, "session"):
            session = session or stack.enter_context(session_for(settings, tiles=len(plan.grid)))
            _check_reach(plan, session)
        driver_bytes = session.driver_bytes
        work = ("the work directory", settings.work_dir) if settings.work_dir else ("the temporary folder", str(local))
        with full_disk_named(*work):
            ingested, inferred = _compute(plan, store_url, session, wrap, seconds)
        with _timed(seconds, "export"):
            exported = wrap(export_stage)(plan, store_url, str(local), session)
        try:
            seconds["total"] = time.perf_counter() - started_run
            seconds["wall"] = time.time() - (started if started is not None else process_started_at())
            vector = next((r for r in exported if isinstance(r, VectorResult)), None)
            moved = session.driver_bytes - driver_bytes
            summary = build_summary(
                plan, seconds, ingested, inferred, exported[0], store_url, driver_bytes=moved, vector=vector
            )
            write_summary(plan.summary_path, summary)
        except BaseException:
            for result in exported:
                remove_output(result.path)
            raise
    return summary


def _hold(plan: RunPlan, stack: contextlib.ExitStack) -> tuple[Path, str]:
    """Take the outputs' locks, the run's local folder (export scratch files, and the work store unless
    ``--work-dir`` keeps it elsewhere) and the work store's lock for the run; returns the folder and the store."""
    for sink in plan.sinks:
        stack.enter_context(Location(sink.path).lock("output"))
    local = stack.enter_context(temporary_folder("work"))
    store_url = ws.store_url(ws.work_area(plan.settings.work_dir, local), plan.settings.input)
    stack.enter_context(ws.lock(store_url))
    return local, store_url


def _check_reach(plan: RunPlan, session: Session) -> None:
    """On a cluster, refuse before any work what only this machine sees (:mod:`segpipe.pipeline.reach`)."""
    if session.on_cluster:
        slide = plan.scene.pyramid is not None
        problem = cluster_paths_problem(plan.settings, session.nodes(), session.driver_ip(), slide=slide)
        if problem:
            raise ConfigError(problem)


def _compute(
    plan: RunPlan, store_url: str, session: Session, wrap: Callable[[Stage], Stage], seconds: dict[str, float]
) -> tuple[IngestResult, InferResult]:
    """Ingest, infer and stitch (a blending merger's finalize), each timed into ``seconds``."""
    with _timed(seconds, "ingest"):
        ingested = wrap(ingest_stage)(plan, store_url, session)
    with _timed(seconds, "infer"):
        inferred = wrap(infer_stage)(plan, store_url, session)
    with _timed(seconds, "stitch"):
        if merger_type(plan.recipe.blend).tile_probabilities:
            wrap(stitch_stage)(plan, store_url, session)
    return ingested, inferred


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the block's wall time in ``seconds[name]`` when it succeeds."""
    t = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t
