"""One root exception type for everything a user can fix.

A :class:`SegpipeError` means bad input or usage: the message says what was wrong and what to do, and the CLI
prints it as one line and exits 2. Any other exception is an internal failure (exit 1).
"""

from __future__ import annotations


class SegpipeError(Exception):
    """Root of all errors a user can act on."""


class InputError(SegpipeError, ValueError):
    """The scene (input raster) cannot be read or is not usable."""


class ModelError(SegpipeError, ValueError):
    """A model checkpoint or its metadata is missing, malformed or unsafe, or does not fit the scene."""


class ConfigError(SegpipeError, ValueError):
    """An option is out of range or options contradict each other."""


class OutputError(SegpipeError, OSError):
    """The output or work directory cannot be written, or is already in use."""
