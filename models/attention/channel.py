"""Channel attention: per-channel weights from globally pooled statistics (SE, CBAM)."""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor, nn

from segpipe.models._checks import positive_int
from segpipe.models.attention.spatial import SpatialAttention


def hidden_width(channels: int, reduction: int) -> int:
    """Width of the bottleneck MLP: ``channels // reduction``, but at least 4 (or ``channels`` if fewer).

    The floor of 4 keeps narrow layers (16 channels with reduction 16) from squeezing through one unit.
    """
    return min(channels, max(4, channels // reduction))


def _mlp(channels: int, reduction: int) -> nn.Sequential:
    hidden = hidden_width(channels, reduction)
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 1),
    )


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018): ``x * sigmoid(MLP(mean_hw(x)))``.

    Layout: input and output (B, C, H, W); the map is (B, C, 1, 1) in [0, 1], one weight per channel.
    The global average pool sees the whole input, so the output at a pixel depends on every pixel of the tile
    (not translation-local; tiled inference matches whole-image inference only approximately).

    Cost: O(B * C * H * W) time for the pool and the rescale, O(C^2 / reduction) parameters, no extra
    activation memory beyond the output.

    Args:
        channels: C, the number of input (and output) channels.
        reduction: Bottleneck ratio of the MLP (hidden width ``max(4, C // reduction)``, at most C).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        positive_int(type(self).__name__, "channels", channels)
        positive_int(type(self).__name__, "reduction", reduction)
        self.channels = channels
        self.mlp = _mlp(channels, reduction)

    def attention_map(self, x: Tensor) -> Tensor:
        """The (B, C, 1, 1) channel weights in [0, 1] for ``x`` (B, C, H, W)."""
        return torch.sigmoid(self.mlp(x.mean(dim=(2, 3), keepdim=True)))

    @overload
    def forward(self, x: Tensor, return_attention: Literal[False] = False) -> Tensor: ...
    @overload
    def forward(self, x: Tensor, return_attention: Literal[True]) -> tuple[Tensor, Tensor]: ...
    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Rescale the channels of ``x`` (B, C, H, W); optionally also return the (B, C, 1, 1) weights."""
        weights = self.attention_map(x)
        out = x * weights
        return (out, weights) if return_attention else out


class ChannelAttention(SqueezeExcitation):
    """CBAM channel branch: ``x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with one shared MLP.

    Layout: input and output (B, C, H, W); the map is (B, C, 1, 1) in [0, 1]. Like SE, the global pools see
    the whole tile, so the block is not translation-local.

    Cost: O(B * C * H * W) time (two pools and the rescale), O(C^2 / reduction) parameters.

    Args:
        channels: C, the number of input (and output) channels.
        reduction: Bottleneck ratio of the shared MLP (hidden width ``max(4, C // reduction)``, at most C).
    """

    def attention_map(self, x: Tensor) -> Tensor:
        """The (B, C, 1, 1) channel weights in [0, 1] for ``x`` (B, C, H, W)."""
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        peak = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + peak)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., 2018): channel attention, then spatial attention.

    Layout: input and output (B, C, H, W). With ``return_attention`` the maps come back as a dict:
    ``{"channel": (B, C, 1, 1), "spatial": (B, 1, H, W)}``, both in [0, 1].

    Cost: the sum of :class:`ChannelAttention` and :class:`SpatialAttention`: O(B * H * W * (C + k^2)) time,
    O(C^2 / reduction + 2 k^2) parameters.

    Args:
        channels: C, the number of input (and output) channels.
        reduction: Bottleneck ratio of the channel MLP.
        kernel_size: Odd kernel side of the spatial branch, in pixels.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    @overload
    def forward(self, x: Tensor, return_attention: Literal[False] = False) -> Tensor: ...
    @overload
    def forward(self, x: Tensor, return_attention: Literal[True]) -> tuple[Tensor, dict[str, Tensor]]: ...
    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Refine ``x`` (B, C, H, W); optionally also return ``{"channel": ..., "spatial": ...}`` maps."""
        if not return_attention:
            return self.spatial(self.channel(x))
        x, channel_map = self.channel(x, return_attention=True)
        x, spatial_map = self.spatial(x, return_attention=True)
        return x, {"channel": channel_map, "spatial": spatial_map}
