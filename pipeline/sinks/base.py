"""Sinks: the seam through which a run's results leave the work store.

A :class:`Sink` is one output of a run (the mask COG, the probabilities COG, a slide's OME-TIFF mask, the polygons):
it checks its path before any work starts and writes itself from the work store after inference, atomically, to a
local path or an object-storage URL (:class:`~segpipe.core.location.Location`). The sinks are registered in
:data:`segpipe.pipeline.sinks.SINKS` by kind and file suffix; a new output format is one module in this package and
one entry there, and the run does not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from segpipe.core.files import temporary_folder
from segpipe.core.location import Location
from segpipe.core.runtime import available_cores
from segpipe.pipeline import store as ws

#: The kind of the polygon output (``--vector``); the other kinds are the store arrays they write
#: (:data:`segpipe.pipeline.store.MASK`, :data:`segpipe.pipeline.store.PROBABILITIES`).
VECTOR = "vector"


@dataclass(frozen=True)
class ExportResult:
    path: str
    seconds: float
    histogram: dict[int, int]
    bytes: int


@runtime_checkable
class Sink(Protocol):
    """One output of a run, written from the work store after inference."""

    #: What it holds: ``mask`` or ``probabilities``.
    kind: ClassVar[str]

    @property
    def path(self) -> str:
        """Where it goes."""
        ...

    def check(self, *, overwrite: bool) -> None:
        """Raise a SegpipeError now, before any work, if the output cannot be written."""
        ...

    def write(
        self,
        store: ws.WorkStore,
        *,
        class_names: Sequence[str],
        colours: Sequence[str],
        scratch_dir: Path,
        workers: int,
        progress: Callable[[int], Any] | None = None,
    ) -> ExportResult:
        """Write the output from ``store``, atomically."""
        ...


def check_output(path: str, what: str, *, overwrite: bool) -> None:
    """Refuse ``path`` (named ``what`` in messages) before any work when it exists and ``overwrite`` is off, or
    when it cannot be written (:meth:`segpipe.core.location.Location.check_writable_file`)."""
    Location(path).check_writable_file(what, overwrite=overwrite)


def remove_output(path: str) -> None:
    """Remove an output a failed run wrote (a local file or an object); nothing happens when it is not there."""
    Location(path).remove()


def build_and_deliver(path: str, scratch: Path, build: Callable[[Path], ExportResult]) -> ExportResult:
    """``build(target)`` writes a complete output file at ``target``; it appears at ``path`` only when complete
    (:meth:`segpipe.core.location.Location.upload_when_complete`)."""
    with Location(path).upload_when_complete(scratch) as target:
        result = build(target)
    return dataclasses.replace(result, path=path)


def write_sink(sink: Sink, store_url: str, class_names: Sequence[str], colours: Sequence[str]) -> ExportResult:
    """Write one output from the work store at ``store_url`` on this machine, with a local scratch folder of its
    own: an export task run by a cluster's worker. (Here, beside the sinks, so that a task worker imports the
    sinks and the store, not the planner and torch: 0.4 s instead of 1.5 s in a fresh worker.)"""
    with temporary_folder("work") as scratch:
        return sink.write(
            ws.WorkStore(store_url, mode="r"),
            class_names=class_names,
            colours=colours,
            scratch_dir=scratch,
            workers=available_cores(),
        )
