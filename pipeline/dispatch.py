"""Infer stage, driver side: plan the tiles, start a pool of segmenters, hand out work, record progress.

Executors:

- ``ray`` (default): one Ray actor per GPU (``num_gpus=1``), or on CPU ``workers`` actors that share the cores
  (``workers x threads = cores``). Actors restart after a crash and Ray retries their in-flight call
  (``max_restarts``/``max_task_retries``); a retried call skips the batches that were already written.
  A local Ray instance is started on demand (loopback only, no dashboard) and shut down afterwards; with an
  address (``auto``, ``ray://host:10001``) the pool runs on that cluster.
- ``local``: one :class:`~pipeline.infer.TileSegmenter` in this process (tests, debugging, tiny scenes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from pipeline import store as ws
from pipeline.infer import InferOptions, TileSegmenter
from pipeline.tile import TileGrid

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


def prepare_outputs(group: zarr.Group, grid: TileGrid, options: InferOptions, classes: int, key: str) -> bool:
    """Create the inference arrays unless the store already holds them for the same run key.

    Returns:
        True when earlier results are reused (same key), False when the arrays were (re)created.
    """
    run = ws.attrs(group).get("run", {})
    if run.get("key") == key and ws.DONE in group:
        return True
    t = grid.tile_size
    group.create_array(
        ws.DONE, shape=(grid.rows, grid.cols), chunks=(1, 1), dtype="uint8", fill_value=0, overwrite=True
    )
    group.create_array(
        ws.MASK,
        shape=(grid.height, grid.width),
        chunks=(t, t),
        dtype="uint8",
        fill_value=ws.MASK_NODATA,
        compressors=ws.compressor(typesize=1),
        dimension_names=("y", "x"),
        overwrite=True,
    )
    for name in (ws.PROBABILITIES, ws.TILE_PROBABILITIES):
        if name in group:
            del group[name]
    if options.probabilities:
        group.create_array(
            ws.PROBABILITIES,
            shape=(classes, grid.height, grid.width),
            chunks=(classes, t, t),
            dtype="uint8",
            fill_value=ws.PROBABILITY_NODATA,
            compressors=ws.compressor(typesize=1),
            dimension_names=("class", "y", "x"),
            overwrite=True,
        )
    if options.blend != "crop":
        s = grid.input_size
        group.create_array(
            ws.TILE_PROBABILITIES,
            shape=(grid.rows, grid.cols, classes, s, s),
            chunks=(1, 1, classes, s, s),
            dtype="float16",
            fill_value=0,
            compressors=ws.compressor(typesize=2),
            overwrite=True,
        )
    group.attrs["run"] = {"key": key, "complete": False}
    return False


def plan_groups(group: zarr.Group, grid: TileGrid, batch_size: int) -> tuple[list[list[int]], int, int]:
    """Fixed batches of tile indices to compute, in raster order.

    Tiles whose core holds no valid pixel are skipped. Batches are formed from all tiles that need compute,
    before looking at what is done, so a resumed run forms exactly the same batches; batches already fully
    done are dropped.

    Returns:
        ``(groups, skipped_nodata, reused)``.
    """
    counts = np.asarray(ws.array(group, ws.VALID_PIXELS)[...])
    if counts.shape != (grid.rows, grid.cols):
        raise ValueError(f"valid_pixels has shape {counts.shape}, expected {(grid.rows, grid.cols)}")
    needed = [int(i) for i in np.flatnonzero(counts.ravel() > 0)]
    skipped = len(grid) - len(needed)
    done = np.asarray(ws.array(group, ws.DONE)[...]).ravel()
    groups = [needed[k : k + batch_size] for k in range(0, len(needed), batch_size)]
    todo = [g for g in groups if not all(done[i] for i in g)]
    reused = sum(len(g) for g in groups) - sum(len(g) for g in todo)
    return todo, skipped, reused


def work_units(groups: Sequence[list[int]], workers: int, max_groups: int = 4) -> list[list[list[int]]]:
    """Cut the batches into calls of a few batches each: enough per call to overlap I/O with compute, small
    enough that every worker gets several calls (load balance) and a crash recomputes little."""
    per_call = max(1, min(max_groups, len(groups) // max(1, workers * 4)))
    return [list(groups[k : k + per_call]) for k in range(0, len(groups), per_call)]


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[Any]:
    """Connect to Ray at ``address``, or start a local instance on loopback that is shut down afterwards.

    Without ``address`` the local instance is always a new one (``address="local"``): ``ray.init()`` alone would
    join any Ray already running on the machine (found through ``/tmp/ray``) and then refuse ``num_cpus``, so a
    user's own ``ray start --head`` would break every run. Set ``--ray-address`` (or ``RAY_ADDRESS``, which
    ``auto`` reads) to use such a cluster on purpose.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = logging.WARNING if log.isEnabledFor(logging.INFO) else logging.ERROR
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=quiet)
    else:
        with _loopback_only():
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=quiet,
                _node_ip_address="127.0.0.1",
            )
    try:
        yield ray
    finally:
        ray.shutdown()


#: Ray's switch for its single-machine mode; "0" makes a local instance use loopback for every server.
RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Make the local Ray instance started in this block bind its servers to 127.0.0.1 only.

    On Linux, Ray replaces a node address of 127.0.0.1 by the machine's routable address and binds GCS, raylet,
    workers and agents there or on all interfaces (seen with Ray 2.60). In single-machine mode (Ray's default on
    macOS and Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) it uses loopback for everything. The started
    processes inherit the variable; this process reads Ray's constant, which is set here and restored after, so
    a later connection to a real cluster is unaffected. A user who sets the variable keeps their choice.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(RAY_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ.setdefault(RAY_CLUSTER_ENV, "0")
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[RAY_CLUSTER_ENV].lower() in ("1", "true")
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(RAY_CLUSTER_ENV, None)


def _resolve_pool(ray: Any, device: str, workers: int | None) -> tuple[str, int, int, dict[str, float]]:
    """(device, workers, threads per worker, actor resources) from the cluster's resources."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", os.cpu_count() or 1)))
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda":
        n = workers or gpus
        return "cuda", n, max(1, cpus // max(1, n) - 1), {"num_gpus": 1, "num_cpus": 1}
    n = workers or 1
    threads = max(1, cpus // n)
    return "cpu", n, threads, {"num_cpus": threads}


def run_inference(
    store_path: str,
    group: zarr.Group,
    grid: TileGrid,
    options: InferOptions,
    *,
    classes: int,
    key: str,
    executor: str = "ray",
    workers: int | None = None,
    ray_address: str | None = None,
    progress: Callable[[int], Any] | None = None,
) -> InferResult:
    """Run inference over every tile of the store that needs it.

    Args:
        store_path: Path or URL of the work store (the workers open it themselves).
        group: The same store, opened by the driver.
        grid: The tile grid.
        options: Inference settings; ``options.device`` may be ``auto`` with the ray executor.
        classes: Number of output classes of the model.
        key: Run key (see :func:`pipeline.store.run_key`); results stored under another key are discarded.
        executor: ``ray`` or ``local``.
        workers: Number of segmenters (default: one per GPU, or one on CPU).
        ray_address: A Ray cluster to use instead of a local instance.
        progress: Called with the number of tiles finished (computed, reused or skipped).
    """
    start = time.perf_counter()
    reusable = prepare_outputs(group, grid, options, classes, key)
    groups, skipped, reused = plan_groups(group, grid, options.batch_size)
    if progress:
        progress(skipped + reused)
    if reusable and not groups:
        log.info("all tiles already done in %s", store_path)
    stats: list[dict[str, Any]] = []
    if executor == "local":
        device = options.device if options.device != "auto" else _local_device()
        local_options = InferOptions(**{**options.__dict__, "device": device})
        n_workers = 1
        if groups:
            segmenter = TileSegmenter(store_path, local_options)
            for unit in work_units(groups, 1):
                stats.append(segmenter.process(unit))
                if progress:
                    progress(stats[-1]["tiles"])
    elif executor == "ray":
        with ray_session(ray_address, os.cpu_count() or 1) as ray:
            device, n_workers, threads, resources = _resolve_pool(ray, options.device, workers)
            if groups:
                stats = _run_ray_pool(
                    ray, store_path, options, device, n_workers, threads, resources, groups, progress
                )
    else:
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    computed = sum(s["tiles"] for s in stats)
    group.attrs["run"] = {"key": key, "complete": True}
    return InferResult(
        tiles_total=len(grid),
        tiles_skipped_nodata=skipped,
        tiles_reused=reused,
        tiles_computed=computed,
        seconds=time.perf_counter() - start,
        workers=n_workers,
        device=device,
        worker_stats=stats,
    )


def _local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_ray_pool(
    ray: Any,
    store_path: str,
    options: InferOptions,
    device: str,
    n_workers: int,
    threads: int,
    resources: dict[str, float],
    groups: list[list[int]],
    progress: Callable[[int], Any] | None,
) -> list[dict[str, Any]]:
    from ray.util import ActorPool

    actor_options = InferOptions(**{**options.__dict__, "device": device, "threads": threads})
    remote_cls = ray.remote(max_restarts=3, max_task_retries=3, **resources)(TileSegmenter)
    actors = [remote_cls.remote(store_path, actor_options) for _ in range(n_workers)]
    try:
        log.info("segmenters ready on %s", ray.get([a.ping.remote() for a in actors]))
        pool = ActorPool(actors)
        stats = []
        for result in pool.map_unordered(
            lambda actor, unit: actor.process.remote(unit), work_units(groups, n_workers)
        ):
            stats.append(result)
            if progress:
                progress(result["tiles"])
        return stats
    finally:
        for actor in actors:
            ray.kill(actor)
