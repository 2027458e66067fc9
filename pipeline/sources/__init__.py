"""Scene sources, one module per input format, registered in one place: :data:`SOURCES`.

A source opens a path with a :class:`~segpipe.pipeline.scene.Selection`, describes what it reads and reads windows
of it (:class:`~segpipe.pipeline.scene.SceneSource`). :func:`segpipe.pipeline.read.open_source` tries the sources in
the order of :data:`SOURCES` by content (each one's ``probe``); a new input format is one module here and one entry
in :data:`SOURCES`.
"""

from __future__ import annotations

from segpipe.core.errors import InputError
from segpipe.pipeline.scene import SourceType
from segpipe.pipeline.sources.array import ArraySource
from segpipe.pipeline.sources.gdal import GdalSource
from segpipe.pipeline.sources.slide import SlideSource

#: Registered scene sources by name, tried in this order: staged arrays (by their folder's suffix), whole slides
#: (by OpenSlide's detection), then everything GDAL opens.
SOURCES: dict[str, SourceType] = {"array": ArraySource, "slide": SlideSource, "gdal": GdalSource}


def source_type(name: str) -> SourceType:
    """The registered source called ``name`` (the name a :class:`~segpipe.pipeline.scene.SceneInfo` records).

    Raises:
        InputError: no source has that name.
    """
    if name not in SOURCES:
        raise InputError(f"unknown scene source {name!r}; registered: {', '.join(SOURCES)}")
    return SOURCES[name]
