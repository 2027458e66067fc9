"""Stage tasks: what the region stages (ingest, stitch, export) need of wherever they run.

A stage cuts its work into independent tasks (``fn(*item)`` for each item: a region of whole chunks, a block of
tiles, one output) with small results, and hands them to a :class:`TaskRunner`: the threads of this process
(:class:`Threads`), or a :class:`~segpipe.pipeline.session.Session` that runs them as Ray tasks on a cluster's
workers. The stages depend on this protocol only, not on the session.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol


class TaskRunner(Protocol):
    """Runs a stage's tasks: ``[fn(*item) for item in items]``, in parallel, results in item order."""

    @property
    def on_cluster(self) -> bool:
        """Whether the tasks run on other machines (then they get URLs, never objects of this process)."""
        ...

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[tuple[Any, ...]],
        *,
        workers: int,
        progress: Callable[[Any], Any] | None = None,
    ) -> list[Any]:
        """Run ``fn(*item)`` for every item (``workers`` at a time, where that applies); ``progress`` gets each
        result as it arrives."""
        ...


def map_on_threads(
    fn: Callable[..., Any],
    items: Sequence[tuple[Any, ...]],
    *,
    workers: int,
    progress: Callable[[Any], Any] | None = None,
) -> list[Any]:
    """``[fn(*item) for item in items]`` on ``workers`` threads of this process (GDAL, zarr and numpy release the
    GIL); results in item order."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="stage") as threads:
        found = []
        for result in threads.map(lambda item: fn(*item), items):
            found.append(result)
            if progress:
                progress(result)
        return found


class Threads:
    """A :class:`TaskRunner` on the threads of this process."""

    on_cluster = False

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[tuple[Any, ...]],
        *,
        workers: int,
        progress: Callable[[Any], Any] | None = None,
    ) -> list[Any]:
        return map_on_threads(fn, items, workers=workers, progress=progress)
