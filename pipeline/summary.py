"""The run summary: what a run did, as JSON (written next to the mask) and as a few lines for people."""

from __future__ import annotations

from typing import Any

from rasterio.crs import CRS

from segpipe.core.location import Location
from segpipe.core.options import values_of
from segpipe.pipeline import store as ws
from segpipe.pipeline.dispatch import InferResult
from segpipe.pipeline.ingest import IngestResult
from segpipe.pipeline.plan import RunPlan
from segpipe.pipeline.scene import SceneInfo
from segpipe.pipeline.settings import RunOptions
from segpipe.pipeline.sinks.base import ExportResult
from segpipe.pipeline.sinks.vector import VectorResult


def _tiles_by_node(stats: list[dict[str, Any]]) -> dict[str, int]:
    """Tiles computed per node (Ray node id, or ``local``)."""
    found: dict[str, int] = {}
    for stat in stats:
        node = str(stat.get("node", "local"))
        found[node] = found.get(node, 0) + int(stat["tiles"])
    return found


def _absolute(path: str) -> str:
    return str(Location(path).absolute())


def _crs_name(wkt: str | None) -> str | None:
    if not wkt:
        return None
    crs = CRS.from_wkt(wkt)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def _vector_summary(vector: VectorResult, names: tuple[str, ...]) -> dict[str, Any]:
    """Where the polygons went, their format and how many there are, in all and per class."""
    return {
        "path": _absolute(vector.path),
        "format": vector.format,
        "features": vector.features,
        "features_per_class": {(names[k] if k < len(names) else str(k)): v for k, v in vector.histogram.items()},
        "bytes": vector.bytes,
    }


def build_summary(
    plan: RunPlan,
    seconds: dict[str, float],
    ingested: IngestResult,
    inferred: InferResult,
    exported: ExportResult,
    store_url: str,
    *,
    driver_bytes: int = 0,
    vector: VectorResult | None = None,
) -> dict[str, Any]:
    """Run summary (JSON-friendly): scene, model, options, tiles, seconds per stage, throughput, class histogram.

    Args:
        plan: The run's plan.
        seconds: Seconds per stage and ``total``.
        ingested: The ingest stage's result.
        inferred: The infer stage's result.
        exported: The mask's export result (its class histogram).
        store_url: The work store.
        driver_bytes: Bytes of pixels, results and store data that crossed the driver during the run.
        vector: The result of ``--vector`` (the polygons), if asked for.
    """
    s, scene, names = plan.settings, plan.scene, plan.model.classes
    total = seconds["total"]
    return {
        "input": s.input,
        "output": _absolute(s.output),
        "probabilities": _absolute(s.probabilities) if s.probabilities else None,
        "vector": _vector_summary(vector, names) if vector is not None else None,
        "work_store": store_url if s.work_dir else None,
        "settings": values_of(s, RunOptions),
        "key": plan.output_key.to_dict(),
        "scene": _scene_summary(scene),
        "fit": plan.fit.to_summary() if plan.fit is not None else None,
        "model": {
            "name": plan.model.name,
            "architecture": plan.model.architecture,
            "sha256": plan.model.checksum,
            "trained": bool(plan.model.provenance.get("trained", True)),
        },
        "tiles": _tiles_summary(plan, inferred),
        "workers": inferred.workers,
        "device": inferred.device,
        "nodes": _tiles_by_node(inferred.worker_stats),
        "segmenter_seconds": _segmenter_seconds(inferred.worker_stats),
        "ingest_reused": ingested.reused,
        "scene_copied": ingested.copied,
        "driver_bytes": driver_bytes,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "megapixels_per_second": round(scene.pixels / 1e6 / total, 3) if total > 0 else None,
        "class_histogram": _named_histogram(exported.histogram, names),
    }


def _scene_summary(scene: SceneInfo) -> dict[str, Any]:
    return {
        "width": scene.width,
        "height": scene.height,
        "bands": scene.count,
        "dtype": scene.dtype,
        "crs": _crs_name(scene.crs_wkt),
        "georeferenced": scene.georeferenced,
        "megapixels": round(scene.pixels / 1e6, 3),
    }


def _tiles_summary(plan: RunPlan, inferred: InferResult) -> dict[str, Any]:
    recipe = plan.recipe
    return {
        "total": inferred.tiles_total,
        "skipped_nodata": inferred.tiles_skipped_nodata,
        "reused": inferred.tiles_reused,
        "computed": inferred.tiles_computed,
        "damaged": inferred.tiles_damaged,
        "tile_size": recipe.tile_size,
        "halo": recipe.halo,
        "blend": recipe.blend,
        "batch_size": recipe.batch_size,
    }


def _segmenter_seconds(stats: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds the segmenters were busy, computing, and waiting for tile reads and result writes, summed."""
    return {
        name: round(sum(float(stat.get(key, 0.0)) for stat in stats), 3)
        for name, key in (
            ("busy", "seconds"),
            ("compute", "compute_s"),
            ("waiting_for_reads", "wait_read_s"),
            ("waiting_for_writes", "wait_write_s"),
        )
    }


def _named_histogram(histogram: dict[int, int], names: tuple[str, ...]) -> dict[str, int]:
    """Pixels per class name (``nodata`` for 255, the id for an id without a name)."""
    return {
        (names[k] if k < len(names) else ("nodata" if k == ws.MASK_NODATA else str(k))): v
        for k, v in sorted(histogram.items())
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines: what was done, how fast, where the output is."""
    scene, tiles, sec = summary["scene"], summary["tiles"], summary["seconds"]
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in sec.items() if k not in ("total", "wall"))
    total = sum(summary["class_histogram"].values()) or 1
    classes = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in summary["class_histogram"].items())
    lines = [
        f"segmented {scene['width']}x{scene['height']}x{scene['bands']} {scene['dtype']} "
        f"({scene['megapixels']} MP, {scene['crs'] or 'no CRS'}) in {sec['total']:.1f} s "
        f"({sec.get('wall', sec['total']):.1f} s since the command started): "
        f"{summary['megapixels_per_second']} MP/s on {summary['workers']} {summary['device']} worker(s)",
        f"tiles: {tiles['total']} total, {tiles['computed']} computed, "
        f"{tiles['skipped_nodata']} skipped (nodata), {tiles['reused']} reused; "
        f"{tiles['tile_size']} px + {tiles['halo']} px halo, {tiles['blend']} blend",
        f"stages: {stages}",
        f"classes: {classes}",
        f"mask: {summary['output']}",
    ]
    fit = summary.get("fit") or {}
    if fit.get("bands_by") == "--bands" or fit.get("scaling"):
        lines.insert(1, f"input: bands {fit['bands']}, nodata {fit['nodata']}, scaling {fit.get('scaling') or 'none'}")
    if summary.get("probabilities"):
        lines.append(f"probabilities: {summary['probabilities']}")
    if summary.get("vector"):
        vector = summary["vector"]
        lines.append(f"polygons: {vector['path']} ({vector['features']} features, {vector['format']})")
    if not summary["model"]["trained"]:
        lines.append("note: the model is untrained (fixed-seed weights); its mask is not meaningful")
    return "\n".join(lines)
