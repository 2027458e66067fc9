"""Infer stage, driver side: plan the tiles, hand them to the session's segmenters, record progress.

Which tiles need compute is the tile stage's (:mod:`segpipe.pipeline.tile`); which arrays the store needs is the
merger's (:mod:`segpipe.pipeline.merge`); where the segmenters run, and how they are kept between scenes, is the
session's (:mod:`segpipe.pipeline.session`). Only tile indices go out and small stats come back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segpipe.core.tiles import TileGrid
from segpipe.pipeline import store as ws
from segpipe.pipeline.infer import InferJob, InferOptions
from segpipe.pipeline.merge import merger_type
from segpipe.pipeline.session import ModelSpec, Session
from segpipe.pipeline.tile import plan_tiles, work_units

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferResult:
    """What inference did: tile counts, seconds, and the pool it ran on."""

    tiles_total: int
    tiles_skipped_nodata: int
    tiles_reused: int
    tiles_computed: int
    seconds: float
    workers: int
    device: str
    worker_stats: list[dict[str, Any]] = field(default_factory=list)
    #: Tiles flagged done whose results failed their check on resume, and were computed again.
    tiles_damaged: int = 0


def recheck_done(store: ws.WorkStore, grid: TileGrid, options: InferOptions) -> list[tuple[int, int]]:
    """On resume, check every tile flagged done against its checksum (:meth:`Merger.damaged`): a chunk of its
    results missing, truncated or corrupt clears its flag, so the tile is computed again instead of exporting
    garbage. Returns those tiles (row, col)."""
    done = np.asarray(store.array(ws.DONE)[...]).astype(bool)
    merger = merger_type(options.blend)(store, grid, probabilities=options.probabilities)
    damaged = merger.damaged(done)
    for r, c in damaged:
        store.array(ws.DONE)[r, c] = 0
    if damaged:
        log.warning(
            "%d tile(s) of %s failed their check (a chunk missing or damaged), first (row %d, col %d); computing "
            "them again", len(damaged), store.url, *damaged[0],
        )  # fmt: skip
    return damaged


def run_inference(
    store: ws.WorkStore,
    grid: TileGrid,
    options: InferOptions,
    *,
    classes: int,
    key: str,
    session: Session | None = None,
    executor: str = "ray",
    workers: int | None = None,
    ray_address: str | None = None,
    progress: Callable[[int], Any] | None = None,
) -> InferResult:
    """Run inference over every tile of the store that needs it.

    Args:
        store: The work store (the segmenters open it themselves from ``store.url``).
        grid: The tile grid.
        options: Inference settings; ``options.device`` may be ``auto``.
        classes: Number of output classes of the model.
        key: Run key (see :func:`segpipe.pipeline.store.run_key`); results stored under another key are discarded.
        session: Where to run (kept by the caller across scenes); None: a session for this call, from ``executor``
            (``ray`` or ``local``) and ``ray_address``.
        workers: Number of segmenters (default: one per GPU, or one per machine on CPU).
        progress: Called with the number of tiles finished (computed, reused or skipped).
    """
    if session is None:
        if executor not in ("ray", "local"):
            raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
        with Session(address=ray_address, ray=executor == "ray") as own:
            return run_inference(
                store, grid, options, classes=classes, key=key, session=own, workers=workers, progress=progress
            )
    start = time.perf_counter()
    merger = merger_type(options.blend)
    reusable = store.prepare_run(
        key, grid, classes, probabilities=options.probabilities, tile_probabilities=merger.tile_probabilities
    )
    damaged = recheck_done(store, grid, options) if reusable else []
    plan = plan_tiles(store, grid, options.batch_size)
    session.driver_bytes += 9 * len(grid)  # the driver read valid_pixels (int64) and done (uint8) per tile
    if progress:
        progress(plan.skipped_nodata + plan.reused)
    if reusable and not plan.batches:
        log.info("all tiles already done in %s", store.url)
    device = session.device(options.device)
    n_workers, threads, resources = session.plan_pool(device, workers)
    if not session.uses_ray:
        threads = options.threads
    spec = ModelSpec(options.model, options.checksum, device, threads, options.metadata)
    job = InferJob(store.url, options.tile_size, options.halo, options.blend, options.probabilities, options.pixel_map)
    stats: list[dict[str, Any]] = []

    def done(result: dict[str, Any]) -> None:
        if progress:
            progress(result["tiles"])

    if plan.batches and session.uses_ray:
        pool = session.segmenters(spec, n_workers, resources)
        units = work_units(plan.batches, len(pool.actors))
        stats = session.run_units(pool, lambda actor, unit: actor.process.remote(job, unit), units, done)
    elif plan.batches:
        with session.local_lock:
            segmenter = session.local_segmenter(spec)
            for unit in work_units(plan.batches, 1):
                stats.append(segmenter.process(job, unit))
                done(stats[-1])
    store.finish_run(key)
    return InferResult(
        tiles_total=len(grid),
        tiles_skipped_nodata=plan.skipped_nodata,
        tiles_reused=plan.reused,
        tiles_computed=sum(s["tiles"] for s in stats),
        tiles_damaged=len(damaged),
        seconds=time.perf_counter() - start,
        workers=n_workers,
        device=device,
        worker_stats=stats,
    )
