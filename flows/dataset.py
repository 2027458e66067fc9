"""The ``segment_dataset`` flow: every scene of a data set, incrementally, in one warm session.

A thin Prefect wrapper over a night (:mod:`segpipe.pipeline.night`): the scenes of the source (a folder, glob, list
file, object-storage prefix, STAC catalog or STAC API search; :mod:`segpipe.pipeline.catalog`) are decided by key
(:func:`~segpipe.pipeline.night.plan_night`: new, changed or incomplete ones are segmented), then segmented up to
``scenes_at_once`` at a time, each as a Prefect task with retries for internal failures (bad input is not retried)
and its stages as tasks. Every output gets a STAC Item, and the output folder a STAC Collection. The night's report
(every scene, its decision and the reason, megapixels, seconds, class shares) is returned, published as Prefect
table and markdown artifacts, and, when a scene failed, POSTed to ``notify``; the flow then fails, naming the failed
scenes. A scene that fails does not stop the others; a night killed midway is finished by the next (finished scenes
are skipped by key, a half-done one resumes tile by tile from ``--work-dir``); two nights that overlap refuse each
other per scene (the outputs' locks).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from segpipe.core.errors import SegpipeError
from segpipe.core.notify import post_report
from segpipe.core.options import from_values
from segpipe.core.secrets import redact, redact_tree
from segpipe.flows.segment import as_task
from segpipe.models.checkpoint import LoadedModel, load_model
from segpipe.pipeline.catalog import AssetChoice, scenes_of
from segpipe.pipeline.executor import session_for
from segpipe.pipeline.night import (
    SceneJob,
    night_report,
    plan_night,
    prepare_folders,
    rebuild_collection,
    run_night,
    segment_job,
)
from segpipe.pipeline.session import Session
from segpipe.pipeline.settings import DatasetOptions, RunOptions

log = logging.getLogger(__name__)


def _no_retry_for_bad_input(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry a scene only after an internal failure: bad input fails the same way every time."""
    try:
        state.result()
    except SegpipeError:
        return False
    except BaseException:
        return True
    return False


@task(name="scene", cache_policy=NONE, retry_condition_fn=_no_retry_for_bad_input)
def segment_one(job: SceneJob, output_dir: str, session: Session, loaded: LoadedModel) -> dict[str, Any]:
    """Segment one scene of the data set (its stages as tasks) and write its STAC Item; returns its row of the
    night's report, and publishes it as an artifact."""
    row, summary = segment_job(job, output_dir, session, loaded, wrap=as_task)
    _scene_artifact(job, row, summary)
    return row


def _artifact_key(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")[:60] or "scene"


def _scene_artifact(job: SceneJob, row: dict[str, Any], summary: dict[str, Any]) -> None:
    shares = ", ".join(f"{k} {v} %" for k, v in row["class_shares_percent"].items())
    create_markdown_artifact(
        key=f"scene-{_artifact_key(job.ref.id)}",
        markdown=redact(
            f"# {job.ref.id}\n\n{row['reason']}: {summary['scene']['width']} x {summary['scene']['height']} px "
            f"({row['megapixels']} MP) in {row['seconds']} s, {row['megapixels_per_second']} MP/s; "
            f"{summary['tiles']['computed']} tiles computed, {summary['tiles']['reused']} reused.\n\n"
            f"Classes: {shares}\n\nMask: `{summary['output']}`"
        ),
        description=redact(f"segpipe: {job.ref.id}"),
    )


def _night_artifacts(report: dict[str, Any]) -> None:
    rows, source, output_dir, seconds = report["scenes"], report["source"], report["output_dir"], report["seconds"]
    table = redact_tree([{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in row.items()} for row in rows])
    create_table_artifact(key="segpipe-night", table=table, description=redact(f"segpipe: {source} -> {output_dir}"))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    megapixels = sum(r["megapixels"] or 0 for r in rows if r["status"] == "done")
    lines = [
        f"# segpipe night: {source}",
        "",
        f"{counts['done']} segmented, {counts['skipped']} skipped, {counts['failed']} failed; {megapixels:.1f} MP in "
        f"{seconds:.1f} s ({megapixels / seconds if seconds else 0:.3f} MP/s over the night). Outputs: `{output_dir}`.",
        "",
        "| scene | status | reason | MP | seconds |",
        "|---|---|---|---:|---:|",
        *[f"| {r['scene']} | {r['status']} | {r['reason']} | {r['megapixels'] or ''} | {r['seconds']} |" for r in rows],
    ]
    create_markdown_artifact(
        key="segpipe-night-report", markdown=redact("\n".join(lines)), description="segpipe: the night"
    )


@flow(name="segment_dataset", persist_result=False, validate_parameters=False)
def segment_dataset(
    source: str,
    output_dir: str,
    options: RunOptions | None = None,
    dataset: DatasetOptions | None = None,
) -> dict[str, Any]:
    """Segment the new and changed scenes of ``source`` into ``output_dir``; see the module docstring.

    Args:
        source: The data set (see :func:`segpipe.pipeline.catalog.scenes_of`).
        output_dir: A folder or object-storage prefix for ``<scene>.mask.tif`` (``<scene>.mask.ome.tif`` for a
            whole-slide image), its summary, polygons and STAC Item, and the collection (created if missing).
        options: The run options of every scene (``work_dir`` gets one folder per scene; ``overwrite`` redoes every
            scene).
        dataset: How the data set is read and run.

    Returns:
        The night's report: ``done``, ``skipped`` and ``failed`` scenes (``{id: reason}`` for the failed), and one
        row per scene.

    Raises:
        ConfigError: options that do not go together (``--vector-simplify`` without ``--vector-format``).
        SegpipeError: a scene failed (its name and reason in the message; the others were segmented).
    """
    started = time.perf_counter()
    options = from_values(RunOptions, options) or RunOptions()  # a deployment's parameters arrive as JSON values
    dataset = from_values(DatasetOptions, dataset) or DatasetOptions()
    dataset.check_with(options)
    loaded = load_model(options.model, device="cpu", metadata=options.model_metadata)
    refs = scenes_of(
        source,
        recursive=dataset.recursive,
        asset=AssetChoice(dataset.asset, dataset.asset_role, tuple(loaded.metadata.bands)),
        search=dataset.search(source),
        allow_local_assets=dataset.allow_local_assets,
    )
    prepare_folders(output_dir, options, dataset)
    jobs = plan_night(refs, output_dir, options, dataset, loaded)
    with session_for(options) as session:

        def segment(job: SceneJob) -> dict[str, Any]:
            runner = segment_one.with_options(task_run_name=job.ref.id, retries=dataset.retries)
            row: dict[str, Any] = runner(job, output_dir, session, loaded)
            return row

        rows = run_night(jobs, segment, at_once=dataset.scenes_at_once)
    rebuild_collection(output_dir, source)
    report = night_report(rows, source, output_dir, time.perf_counter() - started)
    try:
        _night_artifacts(report)
    except Exception as exc:  # no Prefect API (a plain call outside a flow run): the report is still returned
        log.info("no Prefect artifacts: %s", exc)
    _fail_on_failed(report, dataset, done=sum(job.decision.run for job in jobs))
    return report


def _fail_on_failed(report: dict[str, Any], dataset: DatasetOptions, *, done: int) -> None:
    """When a scene failed: POST the report to the webhook (``notify``, else ``$SEGPIPE_NOTIFY_URL``), then raise,
    naming the failed scenes and their reasons."""
    failed = report["failed"]
    if not failed:
        return
    hook = dataset.notify or os.environ.get("SEGPIPE_NOTIFY_URL")
    if hook:
        post_report(hook, report)
    reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
    raise SegpipeError(f"{len(failed)} of {done} scenes failed: {reasons}")
