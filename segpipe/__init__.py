"""segpipe: segment huge images (satellite scenes, whole-slide images) with attention models.

The import namespace, from the ground up (each layer imports only the layers listed before it):

- :mod:`segpipe.core`: errors, tile geometry, blend weights, metrics, colours, pixels, atomic files, raster
  opening, runtime and device;
- :mod:`segpipe.models`: attention networks, checkpoints, training (folder ``models/``);
- :mod:`segpipe.pipeline`: the stages and their seams (folder ``pipeline/``);
- :mod:`segpipe.flows`: Prefect flows and deployments (folder ``flows/``);
- :mod:`segpipe.cli`: the ``segpipe`` command.
"""

from typing import Any

from segpipe.core.errors import ConfigError, InputError, ModelError, OutputError, SegpipeError
from segpipe.core.version import VERSION

__all__ = [
    "ConfigError",
    "InputError",
    "ModelError",
    "OutputError",
    "SegpipeError",
    "Session",
    "open_mask",
    "segment",
    "segment_dataset",
]
__version__ = VERSION

#: The Python API (:mod:`segpipe.api`; :func:`open_mask` from :mod:`segpipe.pipeline.masks`), imported when first
#: used: a Ray worker or the CLI importing ``segpipe.core`` must not load the pipeline, torch and xarray for it.
_API = ("Session", "open_mask", "segment", "segment_dataset")


def __getattr__(name: str) -> Any:
    if name == "open_mask":
        from segpipe.pipeline.masks import open_mask  # lazy: the root imports nothing of the pipeline (see _API)

        return open_mask
    if name in _API:
        from segpipe import api  # lazy: the API loads the stages and torch (2.5 s); segpipe.core users need none

        return getattr(api, name)
    raise AttributeError(f"module 'segpipe' has no attribute {name!r}")
