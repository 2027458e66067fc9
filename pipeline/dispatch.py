"""Infer stage, driver side: plan the tiles, hand them to the session's segmenters, record progress.

Which tiles need compute is the tile stage's (:mod:`segpipe.pipeline.tile`); which arrays the store needs is the
merger's (:mod:`segpipe.pipeline.merge`); where the segmenters run, and how they are kept between scenes, is the
session's (:mod:`segpipe.pipeline.session`). Only tile indices go out and small stats come back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from segpipe.core.tiles import TileGrid
from segpipe.pipeline import store as ws
from segpipe.pipeline.infer import ModelSpec
from segpipe.pipeline.merge import merger_type
from segpipe.pipeline.recipe import Recipe
from segpipe.pipeline.session import Session
from segpipe.pipeline.tile import TilePlan, plan_tiles, work_units

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


def recheck_done(store: ws.WorkStore, grid: TileGrid, recipe: Recipe) -> list[tuple[int, int]]:
    """On resume, check every tile flagged done against its checksum (:meth:`Merger.damaged`): a chunk of its
    results missing, truncated or corrupt clears its flag, so the tile is computed again instead of exporting
    garbage. Returns those tiles (row, col)."""
    done = np.asarray(store.array(ws.DONE)[...]).astype(bool)
    merger = merger_type(recipe.blend)(store, grid, probabilities=recipe.probabilities)
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
    recipe: Recipe,
    model: ModelSpec,
    *,
    classes: int,
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
        recipe: How the pixels are made; its digest keys the results (others are discarded).
        model: The model to load; its ``device`` may be ``auto`` (resolved where the work runs) and its
            ``threads`` are those of a segmenter in this process (Ray segmenters get theirs from the session).
        classes: Number of output classes of the model.
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
                store, grid, recipe, model, classes=classes, session=own, workers=workers, progress=progress
            )
    start = time.perf_counter()
    plan, damaged = _resume(store, grid, recipe, classes, session, progress)
    device = session.device(model.device)
    n_workers, threads, resources = session.plan_pool(device, workers)
    spec = replace(model, device=device, threads=threads if session.uses_ray else model.threads)
    stats = _run_units(session, spec, store.url, recipe, plan.batches, n_workers, resources, progress)
    store.finish_run(recipe.digest())
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


def _resume(
    store: ws.WorkStore,
    grid: TileGrid,
    recipe: Recipe,
    classes: int,
    session: Session,
    progress: Callable[[int], Any] | None,
) -> tuple[TilePlan, list[tuple[int, int]]]:
    """Prepare the store for the recipe's results (earlier ones kept when they were made by the same recipe of the
    same scene, then checked), and plan the batches of the tiles still to compute; returns the plan and the tiles
    found damaged."""
    reusable = store.prepare_run(
        recipe.digest(),
        grid,
        classes,
        probabilities=recipe.probabilities,
        tile_probabilities=merger_type(recipe.blend).tile_probabilities,
    )
    damaged = recheck_done(store, grid, recipe) if reusable else []
    plan = plan_tiles(store, grid, recipe.batch_size)
    session.driver_bytes += 9 * len(grid)  # the driver read valid_pixels (int64) and done (uint8) per tile
    if progress:
        progress(plan.skipped_nodata + plan.reused)
    if reusable and not plan.batches:
        log.info("all tiles already done in %s", store.url)
    return plan, damaged


def _run_units(
    session: Session,
    spec: ModelSpec,
    store_url: str,
    recipe: Recipe,
    batches: Sequence[list[int]],
    workers: int,
    resources: dict[str, float],
    progress: Callable[[int], Any] | None,
) -> list[dict[str, Any]]:
    """Hand the batches, as work units, to the session's Ray segmenters of ``spec`` (started on first use), or to
    its segmenter in this process; returns each unit's stats."""

    def done(result: dict[str, Any]) -> None:
        if progress:
            progress(result["tiles"])

    if not batches:
        return []
    if session.uses_ray:
        pool = session.segmenters(spec, workers, resources)
        units = work_units(batches, len(pool.actors))
        return session.run_units(pool, lambda actor, unit: actor.process.remote(store_url, recipe, unit), units, done)
    stats = []
    with session.local_lock:
        segmenter = session.local_segmenter(spec)
        for unit in work_units(batches, 1):
            stats.append(segmenter.process(store_url, recipe, unit))
            done(stats[-1])
    return stats
