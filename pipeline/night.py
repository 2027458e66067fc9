"""A night: every scene of a data set, decided by key and segmented when new, changed or incomplete.

:func:`plan_night` names each scene's outputs in the output folder (:mod:`segpipe.pipeline.names`) and
decides, from the key its outputs would be made with (:func:`segpipe.pipeline.plan.scene_output_key`) and the key
in its summary (:func:`segpipe.pipeline.incremental.decide`), whether to segment it and why. :func:`run_night`
segments the scenes to do, some at once, each through the caller's ``segment`` (the Prefect flow
:func:`segpipe.flows.dataset.segment_dataset` passes a task with retries; a plain call passes
:func:`segment_job`), and keeps going when one fails. :func:`night_report` is what the night did, one row per
scene. Nothing here knows Prefect.

A whole-slide image's mask is a pyramidal OME-TIFF (``<scene>.mask.ome.tif``), every other scene's a COG
(``<scene>.mask.tif``); polygons go beside it (``<scene>.polygons.<format>``), and its STAC Item last
(:func:`segpipe.pipeline.stac.write_item`): a scene without its Item is done again.
"""

from __future__ import annotations

import contextvars
import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from segpipe.core.errors import SegpipeError
from segpipe.core.location import Location
from segpipe.core.options import values_of
from segpipe.models.checkpoint import LoadedModel
from segpipe.pipeline import stac
from segpipe.pipeline.catalog import SceneRef
from segpipe.pipeline.incremental import Decision, decide
from segpipe.pipeline.names import mask_path, summary_path, vector_path
from segpipe.pipeline.plan import make_plan, scene_output_key
from segpipe.pipeline.read import describe_scene
from segpipe.pipeline.run import Stage, run_scene
from segpipe.pipeline.session import Session
from segpipe.pipeline.settings import DatasetOptions, RunOptions, RunSettings

#: The night's resolved options, written beside its outputs; ``--config`` reads it back.
OPTIONS_FILE = "segpipe-options.json"


@dataclass(frozen=True)
class SceneJob:
    """One scene of a night: where it comes from, its run settings (outputs in the output folder) and whether to
    segment it, with the reason."""

    ref: SceneRef
    settings: RunSettings
    decision: Decision


def resolved_options(options: RunOptions, dataset: DatasetOptions) -> dict[str, Any]:
    """Every run and data-set option of a night, defaults included, as ``--config`` reads them (tables ``run`` and
    ``dataset``); ``notify`` left out, since a webhook URL often carries a secret."""
    chosen = values_of(dataset)
    chosen.pop("notify", None)
    return {"run": values_of(options), "dataset": chosen}


def prepare_folders(output_dir: str, options: RunOptions, dataset: DatasetOptions) -> None:
    """Create the output folder and the work directory when missing, and write the night's resolved options
    (:data:`OPTIONS_FILE`) into the output folder."""
    folder = Location(output_dir)
    folder.make_folder()
    if options.work_dir:
        Location(options.work_dir).make_folder()
    folder.child(OPTIONS_FILE).write_json(resolved_options(options, dataset))


def scene_settings(
    ref: SceneRef, output_dir: str, options: RunOptions, dataset: DatasetOptions, *, slide: bool = False
) -> RunSettings:
    """The run settings of one scene of the night: its outputs named in the output folder, a work store of its own
    in the work directory (``<work_dir>/<scene id>``), and its outputs replaced (the key decided that)."""
    folder = Location(output_dir)
    suffix = dataset.vector_suffix(slide=slide)
    settings = RunSettings.for_scene(
        options,
        input=ref.href,
        output=mask_path(output_dir, ref.id, slide=slide),
        probabilities=str(folder.child(f"{ref.id}.probabilities.tif")) if dataset.write_probabilities else None,
        vector=vector_path(output_dir, ref.id, suffix) if suffix else None,
    )
    work = str(Location(options.work_dir).child(ref.id)) if options.work_dir else None
    return dataclasses.replace(settings, work_dir=work, overwrite=True)


def _outputs_exist(ref: SceneRef, settings: RunSettings, output_dir: str, summary: Any) -> bool:
    """Whether every output the scene's summary speaks of is there: the mask, the probabilities and polygons asked
    for, and the STAC Item (written last: a night killed before it left the scene undone). Polygons asked for now
    but not when the summary was written are not looked for: the key tells that change (``changed settings
    (vector)``)."""
    recorded = summary.get("key", {}).get("settings", {}) if isinstance(summary, dict) else {}
    had_vector = isinstance(recorded, dict) and bool(recorded.get("vector"))
    wanted = [settings.output, settings.probabilities, settings.vector if had_vector else None]
    return all(Location(path).exists() for path in [*wanted, stac.item_path(output_dir, ref.id)] if path)


def plan_night(
    refs: Sequence[SceneRef], output_dir: str, options: RunOptions, dataset: DatasetOptions, loaded: LoadedModel
) -> list[SceneJob]:
    """Each scene with its settings and the decision whether to segment it, by key (a scene that cannot be read
    is to be done: its run then fails with the reason)."""
    jobs = []
    for ref in refs:
        try:
            file = describe_scene(ref.href, mpp=options.mpp)
            settings = scene_settings(ref, output_dir, options, dataset, slide=file.pyramid is not None)
            current = scene_output_key(settings, file, loaded)
        except SegpipeError as exc:
            settings = scene_settings(ref, output_dir, options, dataset)
            jobs.append(SceneJob(ref, settings, Decision(True, f"cannot be read: {exc}")))
            continue
        recorded = Location(summary_path(settings.output)).read_json()
        exist = _outputs_exist(ref, settings, output_dir, recorded)
        jobs.append(SceneJob(ref, settings, decide(current, recorded, outputs_exist=exist, force=options.overwrite)))
    return jobs


def segment_job(
    job: SceneJob, output_dir: str, session: Session, loaded: LoadedModel, *, wrap: Callable[[Stage], Stage]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Segment one scene of the night on the night's session and write its STAC Item; returns its row of the
    night's report and its run summary (``wrap``: what runs each stage, see :func:`segpipe.pipeline.run.run_scene`)."""
    started = time.perf_counter()
    settings = job.settings
    plan = make_plan(settings, loaded=loaded)
    summary = run_scene(settings, plan=plan, wrap=wrap, session=session)
    item = stac.scene_item(
        summary,
        scene=plan.scene.to_attrs(),
        item_id=job.ref.id,
        folder=output_dir,
        mask=settings.output,
        probabilities=settings.probabilities,
        vector=settings.vector,
        classes=plan.model.classes,
        colours=plan.model.colours,
        source=job.ref.source,
        source_item=job.ref.item,
    )
    stac.write_item(output_dir, job.ref.id, item)
    return row(job.ref, "done", job.decision.reason, summary, time.perf_counter() - started), summary


def run_night(
    jobs: Sequence[SceneJob], segment: Callable[[SceneJob], dict[str, Any]], *, at_once: int
) -> list[dict[str, Any]]:
    """Segment the jobs to do, ``at_once`` at a time (threads sharing the caller's context, so a Prefect flow's
    tasks stay its own), each through ``segment`` (which returns the scene's row); the rest are skipped rows.
    A scene that fails is a failed row and the night goes on. Rows in the order of ``jobs``."""
    rows = {job.ref.id: row(job.ref, "skipped", job.decision.reason, None, 0.0) for job in jobs if not job.decision.run}
    todo = [job for job in jobs if job.decision.run]
    with ThreadPoolExecutor(max_workers=max(1, at_once), thread_name_prefix="scene") as threads:
        pending: dict[Future[dict[str, Any]], SceneJob] = {
            threads.submit(contextvars.copy_context().run, segment, job): job for job in todo
        }
        for future in as_completed(pending):
            ref = pending[future].ref
            try:
                rows[ref.id] = future.result()
            except SegpipeError as exc:
                rows[ref.id] = row(ref, "failed", str(exc), None, 0.0)
            except Exception as exc:  # an internal failure after the retries: reported, the night goes on
                rows[ref.id] = row(ref, "failed", f"internal error: {type(exc).__name__}: {exc}", None, 0.0)
    return [rows[job.ref.id] for job in jobs]


def row(ref: SceneRef, status: str, reason: str, summary: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    """One scene's row of the night's report: status (``done``, ``skipped``, ``failed``), reason, megapixels,
    seconds and class shares (percent)."""
    shares = {}
    if summary:
        total = sum(summary["class_histogram"].values()) or 1
        shares = {k: round(100 * v / total, 1) for k, v in summary["class_histogram"].items()}
    return {
        "scene": ref.id,
        "status": status,
        "reason": reason,
        "megapixels": summary["scene"]["megapixels"] if summary else None,
        "seconds": round(seconds, 2),
        "megapixels_per_second": summary["megapixels_per_second"] if summary else None,
        "class_shares_percent": shares,
    }


def night_report(rows: Sequence[dict[str, Any]], source: str, output_dir: str, seconds: float) -> dict[str, Any]:
    """The night's report: ``done``, ``skipped`` and ``failed`` scenes (``{id: reason}`` for the failed), and the
    rows."""
    return {
        "source": source,
        "output_dir": output_dir,
        "done": [r["scene"] for r in rows if r["status"] == "done"],
        "skipped": [r["scene"] for r in rows if r["status"] == "skipped"],
        "failed": {r["scene"]: r["reason"] for r in rows if r["status"] == "failed"},
        "scenes": list(rows),
        "seconds": round(seconds, 2),
    }


def rebuild_collection(output_dir: str, source: str) -> None:
    """The output folder's STAC Collection, rebuilt from every Item in it, whenever it holds one (also when no scene
    was done this night: the night before may have been killed before its Collection)."""
    items = stac.read_items(output_dir)
    if items:
        stac.write_collection(output_dir, items, description=f"segpipe masks of {source}")
