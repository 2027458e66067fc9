"""``segpipe explain``: one tile's image, predicted mask and the model's attention maps, as a PNG.

The tile is read through the scene's source (mirror-padded where it leaves the scene), normalised as the model
says, and run once; the maps are those of :mod:`segpipe.models.explain`. The command's options are
:class:`~segpipe.pipeline.figures.ExplainOptions`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from segpipe.core.colours import colourise
from segpipe.core.errors import ConfigError
from segpipe.core.pixels import normalise, stretch
from segpipe.core.tiles import Window
from segpipe.models.checkpoint import LoadedModel, load_model
from segpipe.models.explain import channel_rows, forward_with_attention, spatial_panels
from segpipe.models.metadata import ModelMetadata
from segpipe.pipeline.read import open_source

#: Panels per row of the figure, at most.
COLUMNS = 5
#: A panel's width and height in inches (the figure is saved at 110 dpi).
PANEL_INCHES = (3.2, 3.4)

Panels = list[tuple[str, np.ndarray]]


def read_tile(path: str, loaded: LoadedModel, x: int | None, y: int | None, size: int) -> tuple[np.ndarray, int, int]:
    """Read a ``size`` x ``size`` window (pixels) at column ``x``, row ``y`` (default: the scene's centre),
    mirror-padded where it leaves the scene. Returns (pixels (bands, size, size), x, y)."""
    with open_source(path) as src:
        info = src.info
        if info.count != len(loaded.metadata.bands):
            raise ConfigError(
                f"model takes {len(loaded.metadata.bands)} bands but {path!r} has {info.count}; choose a matching model"
            )
        x = (info.width - size) // 2 if x is None else x
        y = (info.height - size) // 2 if y is None else y
        x, y = max(0, min(x, info.width - 1)), max(0, min(y, info.height - 1))
        width, height = min(size, info.width - x), min(size, info.height - y)
        data, _ = src.read(Window(x, y, width, height))
    pad = ((0, 0), (0, size - height), (0, size - width))
    return np.pad(data, pad, mode="reflect"), x, y


def explain(
    path: str,
    output: str | Path,
    *,
    model: str = "default",
    x: int | None = None,
    y: int | None = None,
    size: int | None = None,
) -> Path:
    """Write a PNG of the tile's image, the predicted mask and the model's attention maps; return its path.

    Args:
        path: The scene.
        output: The PNG to write.
        model: Model name or checkpoint path.
        x: The tile's left column in pixels (default: centred).
        y: The tile's top row in pixels (default: centred).
        size: The tile's side in pixels (default: the model's tile size); a multiple of the model's size multiple.
    """
    loaded = load_model(model)
    meta = loaded.metadata
    size = size or meta.tile_size
    if size % meta.size_multiple:
        raise ConfigError(f"--size {size} must be a multiple of {meta.size_multiple}, which the model requires")
    pixels, x, y = read_tile(path, loaded, x, y, size)
    mask, panels, rows = attention_maps(loaded, pixels)
    fig = _figure(2 + len(panels) + (1 if rows else 0))
    axes = fig.axes
    _draw_tile(axes[0], axes[1], pixels, mask, meta, f"image ({x}, {y}) {size} px")
    for ax, (name, array) in zip(axes[2:], panels, strict=False):
        ax.imshow(array, cmap="magma", interpolation="nearest")
        ax.set_title(name, fontsize=9)
    if rows:
        _draw_channel_rows(axes[2 + len(panels)], rows)
    _bare(axes)
    trained = "trained" if meta.provenance.get("trained", True) else "UNTRAINED"
    fig.suptitle(f"{Path(path).name} — {meta.architecture} ({trained})", fontsize=10)
    fig.tight_layout()
    out = Path(output)
    fig.savefig(out, dpi=110)
    return out


def attention_maps(loaded: LoadedModel, pixels: np.ndarray) -> tuple[np.ndarray, Panels, Panels]:
    """Run the model once on a tile's ``pixels`` (bands, size, size), in the scene's units; return the predicted
    mask (size, size) uint8, the spatial maps worth drawing and the channel-attention rows
    (:mod:`segpipe.models.explain`)."""
    meta = loaded.metadata
    batch = torch.from_numpy(normalise(pixels, meta.mean, meta.std))[None]
    logits, maps = forward_with_attention(loaded.module, batch)
    mask = torch.argmax(logits, dim=1)[0].numpy().astype(np.uint8)
    return mask, spatial_panels(maps, loaded.module, pixels.shape[-1]), channel_rows(maps)


def _figure(count: int) -> Figure:
    """A figure of ``count`` panels, at most :data:`COLUMNS` per row, each :data:`PANEL_INCHES`."""
    cols = min(COLUMNS, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows))
    fig.subplots(rows, cols, squeeze=False)
    return fig


def _draw_tile(
    image: Axes, predicted: Axes, pixels: np.ndarray, mask: np.ndarray, meta: ModelMetadata, title: str
) -> None:
    """The tile's image (stretched) and its predicted mask in the classes' colours, with a legend."""
    image.imshow(stretch(pixels))
    image.set_title(title)
    predicted.imshow(colourise(mask, [c.colour for c in meta.classes]), interpolation="nearest")
    predicted.set_title("predicted mask")
    predicted.legend(
        handles=[Patch(color=c.colour, label=c.name) for c in meta.classes],
        fontsize=6,
        loc="lower right",
        framealpha=0.7,
    )


def _draw_channel_rows(ax: Axes, rows: Panels) -> None:
    """Channel-attention weights as a table: one row per layer, channels along x, in [0, 1]."""
    width = max(len(v) for _, v in rows)
    table = np.full((len(rows), width), np.nan, dtype=np.float32)
    for i, (_, values) in enumerate(rows):
        table[i, : len(values)] = values
    ax.imshow(table, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    ax.set_yticks(range(len(rows)), [k.removesuffix(".channel") for k, _ in rows], fontsize=5)
    ax.set_title("channel attention", fontsize=9)


def _bare(axes: list[Axes]) -> None:
    """No ticks on the image panels; no frame on the panels left empty."""
    for ax in axes:
        if ax.get_title() != "channel attention":
            ax.set_xticks([])
            ax.set_yticks([])
        if not ax.get_images():
            ax.axis("off")
