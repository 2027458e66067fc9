"""What the picture commands take: ``segpipe explain`` (:class:`ExplainOptions`: a tile's attention maps, drawn by
:func:`segpipe.pipeline.explain.explain`) and ``segpipe quicklook`` (:class:`QuicklookOptions`: a mask beside its
scene, drawn by :func:`segpipe.pipeline.quicklook.quicklook`). Both write a PNG (``--out``), checked before any work.

The options live apart from the modules that draw, so that the command builds its flags without importing torch
or matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segpipe.core.errors import ConfigError
from segpipe.core.options import option, same_option
from segpipe.pipeline.settings import RunOptions


def png_option(default: str) -> Any:
    """The ``--out`` field of a picture command: the PNG it writes, ``default`` (a file name) unless given."""
    return option(default, help="PNG to write")


def check_png(path: str) -> None:
    """Raise ConfigError unless ``path`` ends in ``.png`` and its folder exists."""
    if Path(path).suffix.lower() != ".png":
        raise ConfigError(f"--out {path!r} must end in .png")
    if not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"the directory of --out {path!r} does not exist; create it first")


@dataclass(frozen=True, kw_only=True)
class ExplainOptions:
    """What ``segpipe explain`` takes besides the scene: the model, the tile (pixels) and the PNG."""

    model: str = same_option(RunOptions, "model")
    x: int | None = option(None, help="tile's left column in pixels (default: centred)", metavar="X")
    y: int | None = option(None, help="tile's top row in pixels (default: centred)", metavar="Y")
    size: int | None = option(None, help="tile side in pixels (default: the model's tile size)")
    out: str = png_option("explain.png")

    def __post_init__(self) -> None:
        for name in ("x", "y", "size"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name} must be a number of pixels >= 0, got {value}")
        check_png(self.out)


@dataclass(frozen=True, kw_only=True)
class QuicklookOptions:
    """What ``segpipe quicklook`` takes besides the mask: its scene, the panels' size (pixels) and the PNG."""

    scene: str | None = option(None, help="the scene it was made from, shown beside it")
    max_size: int = option(1024, help="long side of each panel in pixels")
    out: str = png_option("quicklook.png")

    def __post_init__(self) -> None:
        if self.max_size < 0:
            raise ConfigError(f"--max-size must be a number of pixels >= 0, got {self.max_size}")
        check_png(self.out)
