"""``segpipe explain``: one tile's image, predicted mask and the model's attention maps, as a PNG.

The tile is read through the scene's source (mirror-padded where it leaves the scene), normalised as the model
says, and run once; the maps are those of :mod:`segpipe.models.explain`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from segpipe.core.colours import colourise
from segpipe.core.errors import ConfigError
from segpipe.core.pixels import normalise, stretch
from segpipe.core.tiles import Window
from segpipe.models.checkpoint import LoadedModel, load_model
from segpipe.models.explain import channel_rows, forward_with_attention, spatial_panels
from segpipe.pipeline.read import open_source


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
    """Write a PNG of the tile's image, the predicted mask and the model's attention maps; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    loaded = load_model(model)
    meta = loaded.metadata
    size = size or meta.tile_size
    if size % meta.size_multiple:
        raise ConfigError(f"--size {size} must be a multiple of {meta.size_multiple}, which the model requires")
    pixels, x, y = read_tile(path, loaded, x, y, size)
    batch = torch.from_numpy(normalise(pixels, meta.mean, meta.std))[None]
    logits, maps = forward_with_attention(loaded.module, batch)
    mask = torch.argmax(logits, dim=1)[0].numpy().astype(np.uint8)
    panels = spatial_panels(maps, loaded.module, size)
    rows = channel_rows(maps)

    count = 2 + len(panels) + (1 if rows else 0)
    cols = min(5, count)
    nrows = math.ceil(count / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.4 * nrows), squeeze=False)
    flat = list(axes.ravel())
    flat[0].imshow(stretch(pixels))
    flat[0].set_title(f"image ({x}, {y}) {size} px")
    flat[1].imshow(colourise(mask, [c.colour for c in meta.classes]), interpolation="nearest")
    flat[1].set_title("predicted mask")
    flat[1].legend(
        handles=[Patch(color=c.colour, label=c.name) for c in meta.classes],
        fontsize=6,
        loc="lower right",
        framealpha=0.7,
    )
    for ax, (name, array) in zip(flat[2:], panels, strict=False):
        ax.imshow(array, cmap="magma", interpolation="nearest")
        ax.set_title(name, fontsize=9)
    if rows:
        ax = flat[2 + len(panels)]
        width = max(len(v) for _, v in rows)
        table = np.full((len(rows), width), np.nan, dtype=np.float32)
        for i, (_, values) in enumerate(rows):
            table[i, : len(values)] = values
        ax.imshow(table, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
        ax.set_yticks(range(len(rows)), [k.removesuffix(".channel") for k, _ in rows], fontsize=5)
        ax.set_title("channel attention", fontsize=9)
    for ax in flat:
        if ax.get_title() != "channel attention":
            ax.set_xticks([])
            ax.set_yticks([])
        if not ax.get_images():
            ax.axis("off")
    trained = "trained" if meta.provenance.get("trained", True) else "UNTRAINED"
    fig.suptitle(f"{Path(path).name} — {meta.architecture} ({trained})", fontsize=10)
    fig.tight_layout()
    out = Path(output)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
