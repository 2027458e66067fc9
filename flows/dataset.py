"""The ``segment_dataset`` flow: every scene of a data set, incrementally, in one warm session.

For each scene of the source (a folder, glob, list file, object-storage prefix, STAC catalog or STAC API search;
:mod:`segpipe.pipeline.catalog`), the flow compares the key the scene would be segmented with (scene fingerprint,
model checksum, pixel settings; :mod:`segpipe.pipeline.incremental`) with the key recorded in its outputs' summary,
and segments only the new, changed or incomplete ones, up to ``scenes_at_once`` at a time, each with Prefect
retries for internal failures (bad input is not retried). A whole-slide image is a scene like any other; its mask is
a pyramidal OME-TIFF (``<scene>.mask.ome.tif``), every other scene's a COG (``<scene>.mask.tif``); with
``vector_format`` each scene's polygons go beside it (``<scene>.polygons.<format>``). Every output gets a STAC Item,
and the output folder a STAC Collection (:mod:`segpipe.pipeline.stac`). The night's report (every scene, its
decision and the reason, megapixels, seconds, class shares) is returned, published as Prefect table and markdown
artifacts, and, when a scene failed, POSTed to ``notify``; the flow then fails, naming the failed scenes. A scene
that fails does not stop the others; a night killed midway is finished by the next (finished scenes are skipped by
key, a half-done one resumes tile by tile from ``--work-dir``); two nights that overlap refuse each other per scene
(the outputs' locks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import as_completed

from segpipe.core import objects
from segpipe.core.errors import SegpipeError
from segpipe.core.objects import ObjectUrl, is_object_url
from segpipe.core.options import from_values, values_of
from segpipe.core.secrets import host_of, redact, redact_tree
from segpipe.flows.segment import as_task
from segpipe.pipeline import stac
from segpipe.pipeline.catalog import AssetChoice, SceneRef, scenes_of
from segpipe.pipeline.incremental import Decision, decide
from segpipe.pipeline.plan import make_plan, scene_output_key, summary_path
from segpipe.pipeline.read import describe_scene
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.session import Session, auto_uses_ray
from segpipe.pipeline.settings import DatasetOptions, RunOptions, RunSettings

log = logging.getLogger(__name__)


def _beside(folder: str, name: str) -> str:
    return str(ObjectUrl.parse(folder).child(name)) if is_object_url(folder) else str(Path(folder) / name)


#: The night's resolved options, written beside its outputs; ``--config`` reads it back.
OPTIONS_FILE = "segpipe-options.json"


def resolved_options(options: RunOptions, dataset: DatasetOptions) -> dict[str, Any]:
    """Every run and data-set option of a night, defaults included, as ``--config`` reads them (tables ``run`` and
    ``dataset``); ``notify`` left out, since a webhook URL often carries a secret."""
    chosen = values_of(dataset)
    chosen.pop("notify", None)
    return {"run": values_of(options), "dataset": chosen}


def mask_path(output_dir: str, scene_id: str, *, slide: bool = False) -> str:
    """Where a scene's mask goes: ``<output_dir>/<scene id>.mask.tif`` (a COG), or for a whole-slide image
    ``<scene id>.mask.ome.tif`` (a pyramidal OME-TIFF, what slide viewers open); its summary beside it as
    ``<scene id>.mask.summary.json``."""
    return _beside(output_dir, f"{scene_id}.mask.ome.tif" if slide else f"{scene_id}.mask.tif")


def vector_path(output_dir: str, scene_id: str, suffix: str) -> str:
    """Where a scene's polygons go: ``<output_dir>/<scene id>.polygons<suffix>``."""
    return _beside(output_dir, f"{scene_id}.polygons{suffix}")


def _exists(path: str) -> bool:
    return objects.head(path) is not None if is_object_url(path) else Path(path).is_file()


def _scene_settings(
    ref: SceneRef, output_dir: str, options: RunOptions, dataset: DatasetOptions, *, slide: bool = False
) -> RunSettings:
    suffix = dataset.vector_suffix(slide=slide)
    settings = RunSettings.for_scene(
        options,
        input=ref.href,
        output=mask_path(output_dir, ref.id, slide=slide),
        probabilities=_beside(output_dir, f"{ref.id}.probabilities.tif") if dataset.probabilities else None,
        vector=vector_path(output_dir, ref.id, suffix) if suffix else None,
    )
    work = None
    if options.work_dir:
        work = (
            str(ObjectUrl.parse(options.work_dir).child(ref.id))
            if is_object_url(options.work_dir)
            else str(Path(options.work_dir) / ref.id)
        )
    return dataclasses.replace(settings, work_dir=work, overwrite=True)


def _outputs_exist(ref: SceneRef, settings: RunSettings, output_dir: str, summary: Any) -> bool:
    """Whether every output the scene's summary speaks of is there: the mask, the probabilities and polygons asked
    for, and the STAC Item (written last: a night killed before it left the scene undone). Polygons asked for now
    but not when the summary was written are not looked for: the key tells that change (``changed settings
    (vector)``)."""
    recorded = summary.get("key", {}).get("settings", {}) if isinstance(summary, dict) else {}
    had_vector = isinstance(recorded, dict) and bool(recorded.get("vector"))
    return (
        _exists(settings.output)
        and (not settings.probabilities or _exists(settings.probabilities))
        and (not settings.vector or not had_vector or _exists(settings.vector))
        and _exists(stac.item_path(output_dir, ref.id))
    )


def plan_night(
    refs: list[SceneRef], output_dir: str, options: RunOptions, dataset: DatasetOptions, loaded: Any
) -> list[tuple[SceneRef, RunSettings, Decision]]:
    """Each scene with its settings and the decision whether to segment it, by key."""
    decided = []
    for ref in refs:
        try:
            file = describe_scene(ref.href, mpp=options.mpp)
            settings = _scene_settings(ref, output_dir, options, dataset, slide=file.pyramid is not None)
            current = scene_output_key(settings, file, loaded)
        except SegpipeError as exc:
            settings = _scene_settings(ref, output_dir, options, dataset)
            decided.append((ref, settings, Decision(True, f"cannot be read: {exc}")))
            continue
        summary_file = stac.read_json(summary_path(settings.output))
        outputs = _outputs_exist(ref, settings, output_dir, summary_file)
        decided.append((ref, settings, decide(current, summary_file, outputs_exist=outputs, force=options.overwrite)))
    return decided


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
def segment_one(
    ref: SceneRef, settings: RunSettings, reason: str, output_dir: str, session: Session, loaded: Any
) -> dict[str, Any]:
    """Segment one scene of the data set and write its STAC Item; returns its row of the night's report."""
    started = time.perf_counter()
    plan = make_plan(settings, loaded=loaded)
    summary = run_scene(settings, plan=plan, wrap=as_task, session=session)
    item = stac.scene_item(
        summary,
        scene=plan.scene.to_attrs(),
        item_id=ref.id,
        folder=output_dir,
        mask=settings.output,
        probabilities=settings.probabilities,
        vector=settings.vector,
        classes=plan.model.classes,
        colours=plan.model.colours,
        source=ref.source,
        source_item=ref.item,
    )
    stac.write_json(stac.item_path(output_dir, ref.id), item)
    row = _row(ref, "done", reason, summary, time.perf_counter() - started)
    _scene_artifact(ref, row, summary)
    return row


def _row(ref: SceneRef, status: str, reason: str, summary: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
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


def _artifact_key(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")[:60] or "scene"


def _scene_artifact(ref: SceneRef, row: dict[str, Any], summary: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact

    shares = ", ".join(f"{k} {v} %" for k, v in row["class_shares_percent"].items())
    create_markdown_artifact(
        key=f"scene-{_artifact_key(ref.id)}",
        markdown=redact(
            f"# {ref.id}\n\n{row['reason']}: {summary['scene']['width']} x {summary['scene']['height']} px "
            f"({row['megapixels']} MP) in {row['seconds']} s, {row['megapixels_per_second']} MP/s; "
            f"{summary['tiles']['computed']} tiles computed, {summary['tiles']['reused']} reused.\n\n"
            f"Classes: {shares}\n\nMask: `{summary['output']}`"
        ),
        description=redact(f"segpipe: {ref.id}"),
    )


def _night_artifacts(rows: list[dict[str, Any]], source: str, output_dir: str, seconds: float) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

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


def _notify(url: str, report: dict[str, Any]) -> None:
    """POST the report as JSON (secrets redacted); a failing hook is logged, by its host only (a webhook's path is
    often its secret), never fatal."""
    request = urllib.request.Request(
        url, data=json.dumps(redact_tree(report)).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except OSError as exc:
        log.warning("could not notify %s: %s", host_of(url), redact(str(exc)).replace(url, host_of(url)))


def _all_items(output_dir: str) -> list[dict[str, Any]]:
    if is_object_url(output_dir):
        import obstore

        parsed = ObjectUrl.parse(output_dir.rstrip("/") + "/")
        store = objects.store_for(parsed)
        paths = [
            str(ObjectUrl(parsed.scheme, parsed.bucket, meta["path"]))
            for page in obstore.list(store, prefix=parsed.key.rstrip("/") or None)
            for meta in page
            if meta["path"].endswith(".item.json")
        ]
    else:
        paths = [str(p) for p in sorted(Path(output_dir).glob("*.item.json"))]
    return [item for p in paths if (item := stac.read_json(p))]


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
    from segpipe.models.checkpoint import load_model

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
    if not is_object_url(output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    if options.work_dir and not is_object_url(options.work_dir):
        Path(options.work_dir).mkdir(parents=True, exist_ok=True)
    stac.write_json(_beside(output_dir, OPTIONS_FILE), resolved_options(options, dataset))
    night = plan_night(refs, output_dir, options, dataset, loaded)
    rows: dict[str, dict[str, Any]] = {}
    for ref, _, decision in night:
        if not decision.run:
            rows[ref.id] = _row(ref, "skipped", decision.reason, None, 0.0)
    todo = [(ref, settings, decision) for ref, settings, decision in night if decision.run]
    uses_ray = auto_uses_ray(
        address=options.ray_address, executor=options.executor, device=options.device, workers=options.workers, tiles=0
    )
    with Session(address=options.ray_address, ray=uses_ray, connect_timeout=options.ray_connect_timeout) as session:
        pending: dict[Any, SceneRef] = {}
        queue = list(todo)

        def submit() -> None:
            ref, settings, decision = queue.pop(0)
            runner = segment_one.with_options(task_run_name=ref.id, retries=dataset.retries)
            pending[runner.submit(ref, settings, decision.reason, output_dir, session, loaded)] = ref

        while queue and len(pending) < dataset.scenes_at_once:
            submit()
        while pending:
            future = next(as_completed(list(pending)))
            ref = pending.pop(future)
            try:
                rows[ref.id] = future.result()
            except SegpipeError as exc:
                rows[ref.id] = _row(ref, "failed", str(exc), None, 0.0)
            except Exception as exc:  # an internal failure after the retries: reported, the night goes on
                rows[ref.id] = _row(ref, "failed", f"internal error: {type(exc).__name__}: {exc}", None, 0.0)
            if queue:
                submit()
    items = _all_items(output_dir)
    if items:  # also when no scene was done: the night before may have been killed before its collection
        stac.write_collection(output_dir, items, description=f"segpipe masks of {source}")
    ordered = [rows[ref.id] for ref in refs]
    seconds = time.perf_counter() - started
    failed = {r["scene"]: r["reason"] for r in ordered if r["status"] == "failed"}
    report: dict[str, Any] = {
        "source": source,
        "output_dir": output_dir,
        "done": [r["scene"] for r in ordered if r["status"] == "done"],
        "skipped": [r["scene"] for r in ordered if r["status"] == "skipped"],
        "failed": failed,
        "scenes": ordered,
        "seconds": round(seconds, 2),
    }
    try:
        _night_artifacts(ordered, source, output_dir, seconds)
    except Exception as exc:  # no Prefect API (a plain call outside a flow run): the report is still returned
        log.info("no Prefect artifacts: %s", exc)
    if failed:
        hook = dataset.notify or os.environ.get("SEGPIPE_NOTIFY_URL")
        if hook:
            _notify(hook, report)
        reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
        raise SegpipeError(f"{len(failed)} of {len(todo)} scenes failed: {reasons}")
    return report
