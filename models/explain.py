"""``segpipe explain``: one tile's image, predicted mask and attention maps, as a PNG for people to look at.

Maps shown:

- attention gates (``gateN``, (B, 1, H, W) in [0, 1]): how much of each skip connection the decoder lets
  through;
- CBAM spatial maps (``*.cbam.spatial``): where a block looks;
- self-attention at the bottleneck: attention *received* per position (mean over heads and queries), so bright
  positions are those the others attend to; for local attention each window is normalised on its own;
- channel attention (SE / CBAM channel weights): one row per layer, channels along x.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.checkpoint import LoadedModel, load_model
from segpipe.errors import ConfigError


def received_attention(weights: Tensor, grid_hw: tuple[int, int], window: int | None) -> np.ndarray:
    """Attention received per position, as an (H, W) map.

    Args:
        weights: Global (B, heads, N, N) or local (B * windows, heads, w*w, w*w) row-stochastic weights of one
            image (B = 1).
        grid_hw: (H, W) of the feature map attention ran on (padded to a multiple of ``window`` when local).
        window: Window side for local attention, None for global.
    """
    received = weights.float().mean(dim=(1, 2))  # (B*windows, keys)
    h, w = grid_hw
    if window is None:
        return received[0].reshape(h, w).numpy()
    nh, nw = math.ceil(h / window), math.ceil(w / window)
    blocks = received.reshape(nh, nw, window, window).permute(0, 2, 1, 3).reshape(nh * window, nw * window)
    return blocks[:h, :w].numpy()


def stretch(image: np.ndarray) -> np.ndarray:
    """(bands, H, W) -> (H, W, 3) float in [0, 1]: per-band 2-98 % stretch of the first 3 bands (or grey)."""
    bands = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    out = np.empty(bands.shape, dtype=np.float32)
    for i, band in enumerate(bands.astype(np.float32)):
        lo, hi = np.percentile(band, (2, 98))
        out[i] = np.clip((band - lo) / max(hi - lo, 1e-6), 0, 1)
    return out.transpose(1, 2, 0)


def colourise(mask: np.ndarray, colours: list[str], nodata: int = 255) -> np.ndarray:
    """Class ids (H, W) -> RGB (H, W, 3) uint8 with the classes' colours; nodata is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        value = colour.lstrip("#")
        lut[i] = [int(value[k : k + 2], 16) for k in (0, 2, 4)]
    lut[nodata] = 0
    return lut[mask]


def read_tile(
    path: str, loaded: LoadedModel, x: int | None, y: int | None, size: int
) -> tuple[np.ndarray, int, int]:
    """Read a ``size`` x ``size`` window (pixels) at column ``x``, row ``y`` (default: the scene's centre),
    mirror-padded where it leaves the scene. Returns (pixels (bands, size, size), x, y)."""
    from rasterio.windows import Window

    from pipeline.read import open_scene

    with open_scene(path) as src:
        if src.count != len(loaded.metadata.bands):
            raise ConfigError(
                f"model takes {len(loaded.metadata.bands)} bands but {path!r} has {src.count}; "
                "choose a matching model"
            )
        x = (src.width - size) // 2 if x is None else x
        y = (src.height - size) // 2 if y is None else y
        x, y = max(0, min(x, src.width - 1)), max(0, min(y, src.height - 1))
        width, height = min(size, src.width - x), min(size, src.height - y)
        data = src.read(window=Window(x, y, width, height))
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
        raise ConfigError(
            f"--size {size} must be a multiple of {meta.size_multiple}, which the model requires"
        )
    pixels, x, y = read_tile(path, loaded, x, y, size)
    mean = np.asarray(meta.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(meta.std, dtype=np.float32)[:, None, None]
    batch = torch.from_numpy((pixels.astype(np.float32) - mean) / std)[None]
    with torch.inference_mode():
        result = (
            loaded.module(batch, return_attention=True) if _takes_attention(loaded) else loaded.module(batch)
        )
    logits, maps = result if isinstance(result, tuple) else (result, {})
    mask = torch.argmax(logits, dim=1)[0].numpy().astype(np.uint8)
    panels = _spatial_panels(maps, loaded, size)
    channel_rows = [
        (k, v.flatten().numpy()) for k, v in maps.items() if v.dim() == 4 and v.shape[2:] == (1, 1)
    ]

    count = 2 + len(panels) + (1 if channel_rows else 0)
    cols = min(5, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    flat = list(axes.ravel())
    flat[0].imshow(stretch(pixels))
    flat[0].set_title(f"image ({x}, {y}) {size} px")
    colours = [c.colour for c in meta.classes]
    flat[1].imshow(colourise(mask, colours), interpolation="nearest")
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
    if channel_rows:
        ax = flat[2 + len(panels)]
        width = max(len(v) for _, v in channel_rows)
        table = np.full((len(channel_rows), width), np.nan, dtype=np.float32)
        for i, (_, values) in enumerate(channel_rows):
            table[i, : len(values)] = values
        ax.imshow(table, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
        ax.set_yticks(
            range(len(channel_rows)), [k.removesuffix(".channel") for k, _ in channel_rows], fontsize=5
        )
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


def _takes_attention(loaded: LoadedModel) -> bool:
    import inspect

    try:
        return "return_attention" in inspect.signature(loaded.module.forward).parameters
    except (TypeError, ValueError):
        return False


def _spatial_panels(maps: dict[str, Tensor], loaded: LoadedModel, size: int) -> list[tuple[str, np.ndarray]]:
    panels: list[tuple[str, np.ndarray]] = []
    module: Any = loaded.module
    depth = int(getattr(module, "depth", 0))
    bottleneck_step = int(getattr(module, "size_multiple", 2**depth))  # input pixels per bottleneck pixel
    window = getattr(module, "window", None) if getattr(module, "self_attention", "") == "local" else None
    for name, value in maps.items():
        if name.endswith("self_attention"):
            side = size // bottleneck_step if depth else int(math.sqrt(value.shape[-1]))
            padded = -(-side // window) * window if window else side
            panels.append(
                (f"{name} (received)", received_attention(value, (padded, padded), window)[:side, :side])
            )
        elif (
            value.dim() == 4
            and value.shape[1] == 1
            and value.shape[2] > 1
            and (name.startswith("gate") or name in ("enc1.cbam.spatial", "dec1.cbam.spatial"))
        ):
            panels.append((name, value[0, 0].float().numpy()))
    return sorted(panels, key=lambda p: p[0])
