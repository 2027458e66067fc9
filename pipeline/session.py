"""Sessions: where a run's work happens, kept warm across scenes.

A :class:`Session` is either *in-process* (segmenters and stage tasks run in this process) or a *Ray* session (one
connection to a local Ray instance or to a cluster, :mod:`segpipe.pipeline.ray_start`). Either way it keeps its
segmenters (one model each) between scenes (:mod:`segpipe.pipeline.pool` on Ray): a data set, or a nightly
deployment, loads each model once per worker, not once per scene.

On a cluster (``--ray-address``), the stages' region tasks (ingest, stitch) and the export of outputs on object
storage run as Ray tasks on the workers (:meth:`Session.map`, a :class:`~segpipe.pipeline.tasks.TaskRunner`),
which open the scene, the work store and the outputs from their URLs: only URLs, tile indices and small stats
cross the driver (:attr:`Session.driver_bytes` counts what does).
"""

from __future__ import annotations

import contextlib
import pickle
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from segpipe.core.runtime import available_cores, resolve_device
from segpipe.pipeline.infer import ModelSpec, TileSegmenter
from segpipe.pipeline.tasks import map_on_threads


class Session:
    """Where work runs; see the module docstring.

    Args:
        address: A Ray cluster's address; None for a local Ray instance (when ``ray`` is true).
        ray: Use Ray; False runs everything in this process.
        connect_timeout: Seconds to wait for a cluster at ``address``.
        num_cpus: CPUs of a local Ray instance (default: this process's cores).
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        ray: bool = True,
        connect_timeout: float = 30.0,
        num_cpus: int | None = None,
    ) -> None:
        self.address = address
        self.uses_ray = ray or bool(address)
        self.local_segmenters: dict[ModelSpec, TileSegmenter] = {}
        #: Held while the in-process segmenter works: one model, all cores, one scene at a time (scenes run at once
        #: overlap their ingest and export, not their inference).
        self.local_lock = threading.Lock()
        #: Bytes of results and store data that crossed this process (the driver) for the session's work.
        self.driver_bytes = 0
        self._stack = contextlib.ExitStack()
        self.ray: Any = None
        self._ray_pools: Any = None
        if self.uses_ray:
            from segpipe.pipeline import pool, ray_start  # lazy: Ray takes 0.5 s to import; in-process runs skip it

            self.ray = self._stack.enter_context(
                ray_start.ray_session(address, num_cpus or available_cores(), connect_timeout=connect_timeout)
            )
            self._ray_pools = pool.Segmenters()
            self._stack.callback(self._ray_pools.close)

    # --- lifecycle ---------------------------------------------------------------------------------------

    def close(self) -> None:
        self.local_segmenters.clear()
        self._stack.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def driver_ip(self) -> str:
        """The address of this process's Ray node."""
        return str(self.ray.util.get_node_ip_address()) if self.uses_ray else "127.0.0.1"

    @property
    def on_cluster(self) -> bool:
        """Whether work runs on a cluster given by address (stage tasks then run there, not in the driver)."""
        return self.uses_ray and bool(self.address)

    @property
    def pools(self) -> dict[ModelSpec, Any]:
        """The Ray segmenter pools, by model (``{}`` in-process)."""
        return self._ray_pools.pools if self._ray_pools is not None else {}

    # --- resources -----------------------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """Alive Ray nodes (``[]`` in-process)."""
        if not self.uses_ray:
            return []
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def device(self, choice: str) -> str:
        """``auto``/``cpu``/``cuda`` resolved where the work runs."""
        if not self.uses_ray:
            return resolve_device(choice)
        return resolve_device(choice, gpus=int(self.ray.cluster_resources().get("GPU", 0)))

    def plan_pool(self, device: str, workers: int | None) -> tuple[int, int, dict[str, float]]:
        """(segmenters, torch threads each, Ray resources each) for ``device`` on this session's machines."""
        if not self.uses_ray:
            return 1, available_cores(), {}
        resources = self.ray.cluster_resources()
        if device == "cuda":
            gpus = int(resources.get("GPU", 0))
            n = workers or gpus
            cpus = max(1, int(resources.get("CPU", 1)))
            return n, max(1, cpus // max(1, n) - 1), {"num_gpus": 1, "num_cpus": 1}
        nodes = [n for n in self.nodes() if n.get("Resources", {}).get("CPU", 0) >= 1]
        per_node = min((int(n["Resources"]["CPU"]) for n in nodes), default=available_cores())
        if workers is None:
            # one segmenter per machine, using its cores (torch scales within a machine, Ray across them)
            return max(1, len(nodes)), max(1, per_node), {"num_cpus": max(1, per_node)}
        threads = max(1, int(resources.get("CPU", available_cores())) // workers)
        threads = min(threads, max(1, per_node))
        return workers, threads, {"num_cpus": threads}

    # --- segmenters ----------------------------------------------------------------------------------------

    def local_segmenter(self, spec: ModelSpec) -> TileSegmenter:
        """The in-process segmenter of ``spec`` (loaded once per session)."""
        if spec not in self.local_segmenters:
            self.local_segmenters.clear()  # one model in memory at a time
            self.local_segmenters[spec] = TileSegmenter(spec)
        return self.local_segmenters[spec]

    def segmenters(self, spec: ModelSpec, workers: int, resources: dict[str, float]) -> Any:
        """The Ray segmenters of ``spec`` (:class:`segpipe.pipeline.pool.Pool`: ``workers`` of them, each claiming
        ``resources``), started on first use and kept for every later scene."""
        return self._ray_pools.pool(spec, workers, resources)

    def run_units(
        self, pool: Any, call: Callable[[Any, Any], Any], units: Sequence[Any], progress: Callable[[Any], Any]
    ) -> list[Any]:
        """Run every work unit on the pool's segmenters (``call(actor, unit)`` returns an object ref; see
        :meth:`segpipe.pipeline.pool.Segmenters.run_units`); each result is counted in :attr:`driver_bytes`."""
        results: list[Any] = self._ray_pools.run_units(pool, call, units, progress)
        self.driver_bytes += sum(len(pickle.dumps(r)) for r in results)
        return results

    # --- stage tasks ---------------------------------------------------------------------------------------

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[tuple[Any, ...]],
        *,
        workers: int,
        progress: Callable[[Any], Any] | None = None,
    ) -> list[Any]:
        """``[fn(*item) for item in items]``, in parallel: Ray tasks on the cluster's workers (retried on another
        node when one is lost), or ``workers`` threads in this process. Results in item order."""
        if not self.on_cluster:
            return map_on_threads(fn, items, workers=workers, progress=progress)
        from ray.exceptions import RayTaskError  # lazy: Ray takes 0.5 s to import; in-process runs skip it

        from segpipe.pipeline.pool import raised_there  # lazy: it imports Ray (0.5 s); in-process runs skip it

        ray = self.ray
        # No CPU claim: the session's segmenters hold the cores while they live (kept warm between scenes), and stage
        # tasks run between inference passes; at most one task per core of the cluster is in flight, spread over
        # the nodes. A task lost with its node is retried on another.
        task = ray.remote(num_cpus=0, max_retries=3, scheduling_strategy="SPREAD")(fn)
        limit = max(1, int(ray.cluster_resources().get("CPU", 1)))
        out: list[Any] = [None] * len(items)
        waiting = deque(enumerate(items))
        running: dict[Any, int] = {}
        while waiting or running:
            while waiting and len(running) < limit:
                k, item = waiting.popleft()
                running[task.remote(*item)] = k
            ready, _ = ray.wait(list(running), num_returns=1)
            k = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayTaskError as exc:
                raise raised_there(exc) from None
            self.driver_bytes += len(pickle.dumps(result))
            out[k] = result
            if progress:
                progress(result)
        return out
