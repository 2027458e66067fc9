"""Spatial attention: a per-pixel weight map saying where to look (CBAM's spatial branch)."""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor, nn

from segpipe.core.errors import ModelError
from segpipe.models._checks import positive_int


class SpatialAttention(nn.Module):
    """CBAM spatial branch: ``x * sigmoid(conv_kxk([mean_c(x), max_c(x)]))`` (Woo et al., 2018).

    Layout: input and output (B, C, H, W); the map is (B, 1, H, W) in [0, 1], one weight per pixel shared by
    all channels. The convolution is zero-padded, so the block is local: each output pixel sees the
    ``kernel_size`` x ``kernel_size`` neighbourhood of the pooled channels (radius ``kernel_size // 2``).

    Cost: O(B * H * W * (C + 2 * k^2)) time, one extra (B, 2, H, W) tensor of memory; 2 * k^2 parameters.

    Args:
        kernel_size: Odd side of the square convolution kernel, in pixels (7 in CBAM).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        positive_int("SpatialAttention", "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ModelError(
                f"SpatialAttention: 'kernel_size' must be odd so the map stays centred, got {kernel_size}; "
                "use e.g. 3 or 7"
            )
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def attention_map(self, x: Tensor) -> Tensor:
        """The (B, 1, H, W) weights in [0, 1] for input ``x`` (B, C, H, W)."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    @overload
    def forward(self, x: Tensor, return_attention: Literal[False] = False) -> Tensor: ...
    @overload
    def forward(self, x: Tensor, return_attention: Literal[True]) -> tuple[Tensor, Tensor]: ...
    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Reweight the pixels of ``x`` (B, C, H, W); optionally also return the (B, 1, H, W) map."""
        weights = self.attention_map(x)
        out = x * weights
        return (out, weights) if return_attention else out
