"""Infer stage, driver side: plan the tiles, start a pool of segmenters, hand out work, record progress.

Executors:

- ``ray`` (default): one Ray actor per GPU (``num_gpus=1``), or on CPU ``workers`` actors that share the cores
  (``workers x threads = cores``). Actors restart after a crash and Ray retries their in-flight call
  (``max_restarts``/``max_task_retries``); a retried call skips the batches that were already written.
  A local Ray instance is started on demand (loopback only, no dashboard) and shut down afterwards; with an
  address (``auto``, ``ray://host:10001``) the pool runs on that cluster.
- ``local``: one :class:`~segpipe.pipeline.infer.TileSegmenter` in this process (tests, debugging, tiny scenes).

Which tiles need compute is the tile stage's (:mod:`segpipe.pipeline.tile`); which arrays the store needs is the
merger's (:mod:`segpipe.pipeline.merge`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from segpipe.core.runtime import available_cores, resolve_device
from segpipe.core.tiles import TileGrid
from segpipe.pipeline import store as ws
from segpipe.pipeline.infer import InferOptions, TileSegmenter
from segpipe.pipeline.merge import merger_type
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
    cpus = max(1, int(resources.get("CPU", available_cores())))
    device = resolve_device(device, gpus=gpus)
    if device == "cuda":
        n = workers or gpus
        return "cuda", n, max(1, cpus // max(1, n) - 1), {"num_gpus": 1, "num_cpus": 1}
    n = workers or 1
    threads = max(1, cpus // n)
    return "cpu", n, threads, {"num_cpus": threads}


def run_inference(
    store: ws.WorkStore,
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
        store: The work store (the workers open it themselves from ``store.url``).
        grid: The tile grid.
        options: Inference settings; ``options.device`` may be ``auto``.
        classes: Number of output classes of the model.
        key: Run key (see :func:`segpipe.pipeline.store.run_key`); results stored under another key are discarded.
        executor: ``ray`` or ``local``.
        workers: Number of segmenters (default: one per GPU, or one on CPU).
        ray_address: A Ray cluster to use instead of a local instance.
        progress: Called with the number of tiles finished (computed, reused or skipped).
    """
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    start = time.perf_counter()
    merger = merger_type(options.blend)
    reusable = store.prepare_run(
        key, grid, classes, probabilities=options.probabilities, tile_probabilities=merger.tile_probabilities
    )
    plan = plan_tiles(store, grid, options.batch_size)
    if progress:
        progress(plan.skipped_nodata + plan.reused)
    if reusable and not plan.batches:
        log.info("all tiles already done in %s", store.url)
    stats: list[dict[str, Any]] = []
    if executor == "local":
        device = resolve_device(options.device)
        n_workers = 1
        if plan.batches:
            segmenter = TileSegmenter(store.url, dataclasses.replace(options, device=device))
            for unit in work_units(plan.batches, 1):
                stats.append(segmenter.process(unit))
                if progress:
                    progress(stats[-1]["tiles"])
    else:
        with ray_session(ray_address, available_cores()) as ray:
            device, n_workers, threads, resources = _resolve_pool(ray, options.device, workers)
            if plan.batches:
                stats = _run_ray_pool(
                    ray, store.url, options, device, n_workers, threads, resources, plan.batches, progress
                )
    store.finish_run(key)
    return InferResult(
        tiles_total=len(grid),
        tiles_skipped_nodata=plan.skipped_nodata,
        tiles_reused=plan.reused,
        tiles_computed=sum(s["tiles"] for s in stats),
        seconds=time.perf_counter() - start,
        workers=n_workers,
        device=device,
        worker_stats=stats,
    )


def _run_ray_pool(
    ray: Any,
    store_url: str,
    options: InferOptions,
    device: str,
    n_workers: int,
    threads: int,
    resources: dict[str, float],
    batches: list[list[int]],
    progress: Callable[[int], Any] | None,
) -> list[dict[str, Any]]:
    from ray.util import ActorPool

    actor_options = dataclasses.replace(options, device=device, threads=threads)
    remote_cls = ray.remote(max_restarts=3, max_task_retries=3, **resources)(TileSegmenter)
    actors = [remote_cls.remote(store_url, actor_options) for _ in range(n_workers)]
    try:
        log.info("segmenters ready on %s", ray.get([a.ping.remote() for a in actors]))
        pool = ActorPool(actors)
        stats = []
        for result in pool.map_unordered(
            lambda actor, unit: actor.process.remote(unit), work_units(batches, n_workers)
        ):
            stats.append(result)
            if progress:
                progress(result["tiles"])
        return stats
    finally:
        for actor in actors:
            ray.kill(actor)
