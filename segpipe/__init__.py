"""segpipe: segment huge images (satellite scenes, whole-slide images) with attention models.

The import namespace, from the ground up (each layer imports only the layers listed before it):

- :mod:`segpipe.core`: errors, tile geometry, blend weights, metrics, colours, pixels, atomic files, raster
  opening, runtime and device;
- :mod:`segpipe.models`: attention networks, checkpoints, training (folder ``models/``);
- :mod:`segpipe.pipeline`: the stages and their seams (folder ``pipeline/``);
- :mod:`segpipe.flows`: Prefect flows and deployments (folder ``flows/``);
- :mod:`segpipe.cli`: the ``segpipe`` command.
"""

from segpipe.core.errors import ConfigError, InputError, ModelError, OutputError, SegpipeError

__all__ = ["ConfigError", "InputError", "ModelError", "OutputError", "SegpipeError"]
__version__ = "0.1.0"
