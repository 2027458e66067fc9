"""Attention maps of a network for people to look at: what each attention block of a model computed on one input.

Maps (from a model's ``forward(x, return_attention=True)``):

- attention gates (``gateN``, (B, 1, H, W) in [0, 1]): how much of each skip connection the decoder lets
  through;
- CBAM spatial maps (``*.cbam.spatial``): where a block looks;
- self-attention at the bottleneck: attention *received* per position (mean over heads and queries), so bright
  positions are those the others attend to; for local attention each window is normalised on its own;
- channel attention (SE / CBAM channel weights): one row per layer, channels along x.

Reading a scene and drawing the figure is :mod:`segpipe.pipeline.explain`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


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


def takes_attention(module: nn.Module) -> bool:
    """Whether ``module.forward`` accepts ``return_attention`` (segpipe's networks; not ONNX or TorchScript)."""
    try:
        return "return_attention" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_with_attention(module: nn.Module, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits (B, classes, H, W) of a normalised batch (B, bands, H, W), and the attention maps by name (none for
    a network without ``return_attention``)."""
    with torch.inference_mode():
        result = module(batch, return_attention=True) if takes_attention(module) else module(batch)
    if isinstance(result, tuple):
        return result[0], dict(result[1])
    return result, {}


def spatial_panels(maps: dict[str, Tensor], module: nn.Module, size: int) -> list[tuple[str, np.ndarray]]:
    """The maps worth drawing as images, (name, (H, W) array), sorted by name, for an input of ``size`` pixels."""
    panels: list[tuple[str, np.ndarray]] = []
    net: Any = module
    depth = int(getattr(net, "depth", 0))
    bottleneck_step = int(getattr(net, "size_multiple", 2**depth))  # input pixels per bottleneck pixel
    window = getattr(net, "window", None) if getattr(net, "self_attention", "") == "local" else None
    for name, value in maps.items():
        if name.endswith("self_attention"):
            side = size // bottleneck_step if depth else int(math.sqrt(value.shape[-1]))
            padded = -(-side // window) * window if window else side
            panels.append((f"{name} (received)", received_attention(value, (padded, padded), window)[:side, :side]))
        elif (
            value.dim() == 4
            and value.shape[1] == 1
            and value.shape[2] > 1
            and (name.startswith("gate") or name in ("enc1.cbam.spatial", "dec1.cbam.spatial"))
        ):
            panels.append((name, value[0, 0].float().numpy()))
    return sorted(panels, key=lambda p: p[0])


def channel_rows(maps: dict[str, Tensor]) -> list[tuple[str, np.ndarray]]:
    """Channel-attention weights, (layer name, (channels,) array), one row per layer."""
    return [(k, v.flatten().numpy()) for k, v in maps.items() if v.dim() == 4 and v.shape[2:] == (1, 1)]
