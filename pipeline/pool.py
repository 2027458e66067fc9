"""Segmenter pools: the Ray actors that hold one model each, started once per session and fed work units.

:class:`Segmenters` keeps one :class:`Pool` per :class:`~segpipe.pipeline.infer.ModelSpec` (model, checksum,
device, threads): a data set, or a nightly deployment, loads each model once per worker, not once per scene. A
pool for another model lets the previous ones go when the cluster lacks the resources for both.

Segmenters on GPUs claim one GPU each (``num_gpus=1``), on every node; on CPUs, ``actors x threads = cores``. A
segmenter that dies while it starts (killed, out of memory, its node lost) is replaced after a backoff, on any
node; one that dies while it works is dropped and its work unit goes to the others, a new one being started only
when none is left. Ray's own restarts are off (``max_restarts=0``): they wait for resources a lost node took with
it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from segpipe.core.errors import ConfigError, SegpipeError
from segpipe.pipeline.infer import ModelSpec, TileSegmenter

log = logging.getLogger(__name__)

#: Tries to start each segmenter whose process dies while it starts, and the first backoff between them (doubled
#: after each try).
START_TRIES = 3
START_BACKOFF_S = 1.0
#: Seconds between checks, while segmenters start, that a live node can still hold one.
START_CHECK_S = 5.0


@dataclass
class Pool:
    """The segmenters of one :class:`~segpipe.pipeline.infer.ModelSpec`, and the Ray resources each claims."""

    spec: ModelSpec
    actors: list[Any]
    resources: dict[str, float] = field(default_factory=dict)


class Segmenters:
    """The Ray segmenters of one session (see the module docstring); Ray must be initialised."""

    def __init__(self) -> None:
        self.pools: dict[ModelSpec, Pool] = {}
        #: Held while pools are started or let go (scenes may run on threads).
        self.lock = threading.Lock()

    def pool(self, spec: ModelSpec, workers: int, resources: dict[str, float]) -> Pool:
        """The pool of ``spec`` (``workers`` segmenters claiming ``resources`` each: Ray's ``num_cpus`` and
        ``num_gpus``), started on first use.

        Raises:
            ConfigError: the cluster has fewer resources than the pool needs.
        """
        with self.lock:
            if spec not in self.pools:
                self._make_room(workers, resources)
                started = time.perf_counter()
                actors = start_segmenters(spec, workers, resources)
                log.info("%d segmenter(s) ready in %.1f s", len(actors), time.perf_counter() - started)
                self.pools[spec] = Pool(spec, actors, dict(resources))
            return self.pools[spec]

    def _make_room(self, workers: int, resources: dict[str, float]) -> None:
        """Refuse a pool the cluster cannot hold; let the other pools go when it cannot hold them beside it."""
        need = {"CPU": resources.get("num_cpus", 0) * workers, "GPU": resources.get("num_gpus", 0) * workers}
        total = ray.cluster_resources()
        short = [f"{v:g} {k}" for k, v in need.items() if v and total.get(k, 0.0) < v]
        if short:
            raise ConfigError(
                f"{workers} segmenter(s) need {' and '.join(short)} but the Ray cluster has "
                f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU; use fewer --workers"
            )
        free = ray.available_resources()
        if any(free.get(k, 0.0) < v for k, v in need.items() if v):
            for other in list(self.pools):
                kill(self.pools.pop(other).actors)

    def run_units(
        self, pool: Pool, call: Callable[[Any, Any], Any], units: Sequence[Any], progress: Callable[[Any], Any]
    ) -> list[Any]:
        """Run every unit on the pool's segmenters (``call(actor, unit)`` returns an object ref); returns the
        results in the order they came back.

        A segmenter that dies is dropped and its unit handed to another; when none is left a new one is started.
        An error raised by the work itself (bad input found late) is raised here, as it was raised there.
        """
        queue = deque(units)
        idle = list(pool.actors)
        pending: dict[Any, tuple[Any, Any]] = {}
        results = []
        while queue or pending:
            while queue and idle:
                actor, unit = idle.pop(), queue.popleft()
                pending[call(actor, unit)] = (actor, unit)
            if not pending:
                raise SegpipeError("no segmenter is left to run the remaining tiles")
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor, unit = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError as exc:
                log.warning("a segmenter died (%s); its tiles go to the others", str(exc).splitlines()[0][:200])
                queue.appendleft(unit)
                idle.extend(self._replace(pool, actor))
                continue
            except RayTaskError as exc:
                raise raised_there(exc) from None
            results.append(result)
            idle.append(actor)
            progress(result)
        return results

    def _replace(self, pool: Pool, dead: Any) -> list[Any]:
        """Drop a dead segmenter from its pool; returns a new one when the pool is left empty, else nothing."""
        pool.actors.remove(dead)
        kill([dead])
        if pool.actors:
            return []
        pool.actors.extend(start_segmenters(pool.spec, 1, pool.resources))
        return list(pool.actors)

    def close(self) -> None:
        """Let every segmenter go."""
        for pool in self.pools.values():
            kill(pool.actors)
        self.pools.clear()


def start_segmenters(spec: ModelSpec, workers: int, resources: dict[str, float]) -> list[Any]:
    """Start ``workers`` segmenters and wait until each has loaded its model.

    A segmenter whose process dies while it starts (killed, out of memory, its node lost) is replaced after a
    backoff, on any node (Ray's SPREAD), up to :data:`START_TRIES` times per segmenter; then the start fails with
    one line naming the last cause. A model that cannot be loaded (its error, raised by ``ping``) is not retried:
    that error is raised as it was raised there.
    """
    options: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0, **resources}
    remote: Any = ray.remote(**options)(TileSegmenter)
    pending: dict[Any, tuple[int, Any]] = {}

    def launch(attempt: int) -> None:
        actor = remote.options(scheduling_strategy="SPREAD").remote(spec) if attempt else remote.remote(spec)
        pending[actor.ping.remote()] = (attempt, actor)

    for _ in range(workers):
        launch(0)
    ready: list[Any] = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=START_CHECK_S)
            if not done:
                check_room(resources)
                continue
            attempt, actor = pending.pop(done[0])
            if _started(done[0], actor, attempt, resources):
                ready.append(actor)
            else:
                launch(attempt + 1)
    except BaseException:
        kill(ready + [actor for _, actor in pending.values()])
        raise
    return ready


def _started(ping: Any, actor: Any, attempt: int, resources: dict[str, float]) -> bool:
    """Whether the segmenter answered its ping; False after waiting out the backoff when its process died (it is
    to be started again). Raises the model's error, or one line after :data:`START_TRIES` deaths."""
    try:
        ray.get(ping)
        return True
    except RayTaskError as exc:
        raise raised_there(exc) from None
    except RayActorError as exc:
        kill([actor])
        cause = start_failure(exc)
        if attempt + 1 >= START_TRIES:
            raise RuntimeError(f"a segmenter died while starting, {START_TRIES} times; last: {cause}") from None
        log.warning("a segmenter died while starting (%s); starting another", cause)
        time.sleep(START_BACKOFF_S * 2**attempt)
        check_room(resources, cause)
        return False


def check_room(resources: dict[str, float], cause: str = "") -> None:
    """Raise when no live Ray node is big enough for one segmenter (``resources``: Ray's ``num_cpus`` and
    ``num_gpus``), so that a start waits for nothing that cannot come: the only node lost, say."""
    need = {"CPU": resources.get("num_cpus", 0), "GPU": resources.get("num_gpus", 0)}
    for node in ray.nodes():
        have = node.get("Resources", {})
        if node.get("Alive") and all(have.get(k, 0.0) >= v for k, v in need.items() if v):
            return
    why = f" ({cause})" if cause else ""
    raise RuntimeError(f"no live Ray node can start a segmenter{why}; check the cluster, then re-run to resume")


def kill(actors: Sequence[Any]) -> None:
    """End segmenters (already dead ones included) without restarting them."""
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)


def raised_there(error: RayTaskError) -> BaseException:
    """The error that a Ray task or actor method raised (``error``, Ray's ``RayTaskError``), to raise here: a
    segpipe error as it was raised there, with its own one-line message (Ray's wrapper puts the worker's traceback
    in front of it); any other error as Ray wraps it (an instance of both, its traceback kept)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, SegpipeError) else error.as_instanceof_cause()


def start_failure(error: Exception) -> str:
    """One line for why a segmenter's process died: out of memory, its node lost, or Ray's first line."""
    text = str(error)
    lowered = text.lower()
    if "out of memory" in lowered or "oom" in lowered.split() or "memory monitor" in lowered:
        return "out of memory"
    if "node" in lowered and ("died" in lowered or "dead" in lowered or "lost" in lowered):
        return "its node was lost"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return first[:200]
