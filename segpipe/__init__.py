"""segpipe: segment huge images with attention models (CLI, errors, run summary)."""

from segpipe.errors import SegpipeError

__all__ = ["SegpipeError"]
__version__ = "0.1.0"
