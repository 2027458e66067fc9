"""Quicklook: a PNG of a scene beside its mask, read at reduced resolution (from overviews), bounded memory.

Both rasters are read with ``out_shape`` at most ``max_size`` pixels on the long side, so GDAL serves the
nearest overview; the mask uses nearest-neighbour sampling and its own colour table and class names. The command's
options are :class:`~segpipe.pipeline.figures.QuicklookOptions`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from rasterio.enums import Resampling

from segpipe.core.colours import colour_lut, hex_colour
from segpipe.core.errors import InputError
from segpipe.core.pixels import stretch
from segpipe.core.raster import open_raster
from segpipe.core.tiles import Window
from segpipe.pipeline.names import summary_path
from segpipe.pipeline.read import open_source
from segpipe.pipeline.scene import Selection


def _shape(width: int, height: int, max_size: int) -> tuple[int, int]:
    scale = min(1.0, max_size / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def read_mask_preview(
    mask_path: str, max_size: int
) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int]]]]:
    """RGB (H, W, 3) uint8 of a segpipe mask, and its legend [(class name, rgb)]."""
    with open_raster(mask_path, role="mask", hint="give a mask written by segpipe run") as src:
        if src.count != 1 or src.dtypes[0] != "uint8":
            raise InputError(f"{mask_path!r} is not a segpipe mask (one uint8 band of class ids)")
        h, w = _shape(src.width, src.height, max_size)
        mask = src.read(1, out_shape=(h, w), resampling=Resampling.nearest)
        try:
            table = src.colormap(1)
        except ValueError:
            raise InputError(f"{mask_path!r} has no colour table; is it a segpipe mask?") from None
        names = src.tags().get("CLASS_NAMES", "").split(",")
    lut = colour_lut(table, nodata=None)
    legend = [(name, tuple(int(c) for c in lut[i])) for i, name in enumerate(names) if name]
    return lut[mask], legend  # type: ignore[return-value]


def read_scene_preview(scene_path: str, max_size: int, selection: Selection | None = None) -> np.ndarray:
    """RGB (H, W, 3) float in [0, 1] of a scene: first three bands (or the first, grey) of ``selection`` (the bands
    and nodata a run read), 2-98 % stretch of the valid pixels, nodata black; read through the scene's source at
    reduced resolution."""
    with open_source(scene_path, selection=selection) as src:
        info = src.info
        h, w = _shape(info.width, info.height, max_size)
        data, valid = src.read(Window(0, 0, info.width, info.height), out_shape=(h, w))
    rgb = stretch(data[:3] if data.shape[0] >= 3 else data[:1], valid)
    rgb[valid == 0] = 0
    return rgb


def _run_selection(mask_path: str) -> Selection | None:
    """The bands and nodata the run that wrote ``mask_path`` read (from its summary beside it), or None."""
    try:
        fit = json.loads(Path(summary_path(mask_path)).read_text()).get("fit") or {}
    except (OSError, ValueError):
        return None
    if not fit:
        return None
    return Selection(tuple(fit["bands"]), None if fit.get("nodata") is None else float(fit["nodata"]))


def quicklook(
    mask_path: str, output: str | Path, *, scene_path: str | None = None, max_size: int = 1024
) -> Path:
    """Write a PNG: the scene (if given) beside the mask with a legend, each panel at most ``max_size`` pixels on
    its long side. Returns the PNG's path."""
    mask, legend = read_mask_preview(mask_path, max_size)
    panels: list[tuple[str, np.ndarray]] = []
    if scene_path:
        panels.append((Path(scene_path).name, read_scene_preview(scene_path, max_size, _run_selection(mask_path))))
    panels.append((f"mask: {Path(mask_path).name}", mask))
    aspect = mask.shape[1] / mask.shape[0]
    fig = Figure(figsize=(5 * aspect * len(panels) + 0.5, 5.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, image) in zip(axes[0], panels, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(
        handles=[Patch(color=hex_colour(rgb), label=name) for name, rgb in legend],
        fontsize=7,
        loc="lower right",
        framealpha=0.8,
    )
    fig.tight_layout()
    out = Path(output)
    fig.savefig(out, dpi=100)
    return out
