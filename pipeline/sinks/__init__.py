"""The outputs of a run, registered in one place: :data:`SINKS` maps each kind (``mask``, ``probabilities``,
``vector``) and file suffix to the sink that writes it (:mod:`segpipe.pipeline.sinks.base` for what a sink is).

A new output format is one module in this package and one entry here: :func:`sink_for` then picks it by the path's
suffix, and the run (validate, export) does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from segpipe.core.errors import ConfigError
from segpipe.pipeline import store as ws
from segpipe.pipeline.sinks.base import VECTOR, Sink
from segpipe.pipeline.sinks.cog import CogSink, ProbabilitiesCogSink
from segpipe.pipeline.sinks.ometiff import OmeTiffSink
from segpipe.pipeline.sinks.vector import FORMATS, VectorSink

#: Registered sinks: kind -> file suffix -> sink class (constructed with the path and the sink's own options).
SINKS: dict[str, dict[str, Callable[..., Sink]]] = {
    ws.MASK: {".tif": CogSink, ".tiff": CogSink, ".ome.tif": OmeTiffSink, ".ome.tiff": OmeTiffSink},
    ws.PROBABILITIES: {".tif": ProbabilitiesCogSink, ".tiff": ProbabilitiesCogSink},
    VECTOR: dict.fromkeys(FORMATS, VectorSink),
}


def sink_for(kind: str, path: str, **options: Any) -> Sink:
    """The sink that writes ``kind`` to ``path``, chosen by the path's suffix; ``options`` go to its constructor.

    Raises:
        ConfigError: no sink writes that suffix.
    """
    by_suffix = SINKS[kind]
    name = Path(path).name.lower()  # the longest registered suffix that matches: .ome.tif before .tif
    suffix = max((s for s in by_suffix if name.endswith(s)), key=len, default=Path(path).suffix.lower())
    if suffix not in by_suffix:
        what = "output" if kind == ws.MASK else f"--{kind}"
        first = next(iter(by_suffix.values()))
        written = getattr(first, "written_as", "it is written as a Cloud Optimized GeoTIFF")
        raise ConfigError(f"{what} {path!r} must end in {' or '.join(by_suffix)} ({written})")
    return by_suffix[suffix](path, **options)
