"""Attention blocks for segmentation networks, each a small ``nn.Module`` on BCHW tensors.

- :class:`SqueezeExcitation`, :class:`ChannelAttention`: which channels matter (per-channel weights).
- :class:`SpatialAttention`: where to look (a per-pixel weight map).
- :class:`CBAM`: channel then spatial attention (Woo et al., 2018).
- :class:`SelfAttention2d`: global multi-head self-attention over all positions of a feature map.
- :class:`WindowSelfAttention2d`: the same within non-overlapping windows (memory linear in the area).
- :class:`AttentionGate`: Attention U-Net gate on a skip connection (Oktay et al., 2018).

Every block's ``forward`` takes ``return_attention: bool = False``; when True it returns ``(output, map)`` so
the maps can be shown. Maps cost extra memory and are only computed when asked for.
"""

from __future__ import annotations

from segpipe.models.attention.channel import CBAM, ChannelAttention, SqueezeExcitation
from segpipe.models.attention.gate import AttentionGate
from segpipe.models.attention.self_attention import SelfAttention2d, WindowSelfAttention2d
from segpipe.models.attention.spatial import SpatialAttention

__all__ = [
    "CBAM",
    "AttentionGate",
    "ChannelAttention",
    "SelfAttention2d",
    "SpatialAttention",
    "SqueezeExcitation",
    "WindowSelfAttention2d",
]
