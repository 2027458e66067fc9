"""Multi-head self-attention over the positions of a feature map: global, or within local windows."""

from __future__ import annotations

from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.models._checks import divisible, positive_int


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, need_weights: bool
) -> tuple[Tensor, Tensor | None]:
    """``softmax(q k^T / sqrt(d)) v`` for (batch, heads, positions, dim) tensors.

    Without ``need_weights`` this is :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels
    on GPU, no (L, L) matrix kept). With it, the weights are computed explicitly and returned, which costs
    O(batch * heads * L^2) memory.

    Args:
        q: Queries (N, heads, L, d).
        k: Keys (N, heads, L, d).
        v: Values (N, heads, L, dv).
        mask: Optional boolean (N, 1, 1, L): False marks keys no query may attend to.
        need_weights: Also return the (N, heads, L, L) row-stochastic weights.
    """
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return torch.matmul(weights, v), weights


class _MultiHeadProjections(nn.Module):
    """Query/key/value/output 1x1 convolutions and the residual gate shared by both attention blocks."""

    def __init__(self, owner: str, channels: int, heads: int, key_channels: int | None) -> None:
        super().__init__()
        positive_int(owner, "channels", channels)
        positive_int(owner, "heads", heads)
        key_channels = channels if key_channels is None else positive_int(owner, "key_channels", key_channels)
        divisible(owner, "channels", channels, "heads", heads)
        divisible(owner, "key_channels", key_channels, "heads", heads)
        self.channels = channels
        self.heads = heads
        self.key_channels = key_channels
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv2d(channels, key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        # y = x + gamma * attention(x): gamma starts at 0, so a fresh block is the identity and training
        # lets the network decide how much non-local context to mix in (Zhang et al., SAGAN, 2019).
        self.gamma = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, key_channels={self.key_channels}"


class SelfAttention2d(_MultiHeadProjections):
    """Global multi-head self-attention over all H*W positions, with a zero-initialised residual gate.

    ``y = x + gamma * W_o(softmax(Q K^T / sqrt(d)) V)``, where Q, K, V are 1x1 convolutions of ``x`` split
    into ``heads`` heads (d = key_channels / heads), computed with ``scaled_dot_product_attention``.

    Layout: input and output (B, C, H, W); the map is (B, heads, N, N) with N = H * W, positions in row-major
    order, each row a probability distribution over the positions attended to.

    Every output pixel sees every input pixel: the block is not translation-local, so tiled inference equals
    whole-image inference only approximately. Use it on small (coarse) feature maps.

    Cost: O(B * N^2 * (key_channels + C)) time; with fused kernels O(B * N * C) memory, but the explicit map
    (``return_attention=True``, or the math fallback on CPU) holds B * heads * N^2 floats. Parameters:
    2 * C * key_channels + 2 * C^2 + biases + 1.

    Args:
        channels: C, input and output channels; a multiple of ``heads``.
        heads: Number of attention heads.
        key_channels: Total query/key channels over all heads (default C: equal head widths for Q, K and V,
            which lets GPUs use flash attention); a multiple of ``heads``.
    """

    def __init__(self, channels: int, heads: int = 4, key_channels: int | None = None) -> None:
        super().__init__("SelfAttention2d", channels, heads, key_channels)

    @overload
    def forward(self, x: Tensor, return_attention: Literal[False] = False) -> Tensor: ...
    @overload
    def forward(self, x: Tensor, return_attention: Literal[True]) -> tuple[Tensor, Tensor]: ...
    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend over all positions of ``x`` (B, C, H, W); optionally return the (B, heads, N, N) weights."""
        b, c, h, w = x.shape
        n, heads = h * w, self.heads
        q = self.query(x).reshape(b, heads, self.key_channels // heads, n).transpose(-2, -1)
        k = self.key(x).reshape(b, heads, self.key_channels // heads, n).transpose(-2, -1)
        v = self.value(x).reshape(b, heads, c // heads, n).transpose(-2, -1)
        o, weights = attend(q, k, v, None, return_attention)
        y = x + self.gamma * self.out(o.transpose(-2, -1).reshape(b, c, h, w))
        if return_attention:
            assert weights is not None
            return y, weights
        return y


def _partition(t: Tensor, heads: int, window: int) -> Tensor:
    """(B, heads*d, Hp, Wp) -> (B*windows, heads, window^2, d); windows in row-major order per image."""
    b, hd, hp, wp = t.shape
    nh, nw = hp // window, wp // window
    t = t.reshape(b, heads, hd // heads, nh, window, nw, window).permute(0, 3, 5, 1, 4, 6, 2)
    return t.reshape(b * nh * nw, heads, window * window, hd // heads)


def _merge(t: Tensor, b: int, hp: int, wp: int, window: int) -> Tensor:
    """Inverse of :func:`_partition`: (B*windows, heads, window^2, d) -> (B, heads*d, Hp, Wp)."""
    _, heads, _, d = t.shape
    nh, nw = hp // window, wp // window
    t = t.reshape(b, nh, nw, heads, window, window, d).permute(0, 3, 6, 1, 4, 2, 5)
    return t.reshape(b, heads * d, hp, wp)


class WindowSelfAttention2d(_MultiHeadProjections):
    """Local multi-head self-attention within non-overlapping ``window`` x ``window`` blocks.

    The same computation as :class:`SelfAttention2d` (1x1 Q/K/V/output convolutions, SDPA, zero-initialised
    ``gamma`` residual), but each position attends only to the positions of its own block. H and W need not be
    multiples of ``window``: Q, K, V are zero-padded at the bottom/right up to the next multiple, padded keys
    are masked out (so they never receive weight), and the output is cropped back to H x W.

    Layout: input and output (B, C, H, W); the map is (B * windows, heads, window^2, window^2), windows
    ordered row-major within each image and images in batch order, positions row-major within a window, each
    row a probability distribution (zero weight on padded positions).

    Locality: an output pixel depends only on the pixels of its block, at most ``window - 1`` pixels away.
    Blocks are anchored at the input's top-left corner, so the block is equivariant only to shifts that are
    multiples of ``window``.

    Cost: O(B * H * W * window^2 * (key_channels + C)) time and, for the explicit map, B * heads * H * W *
    window^2 floats: linear in the area. Parameters as :class:`SelfAttention2d`.

    Args:
        channels: C, input and output channels; a multiple of ``heads``.
        heads: Number of attention heads.
        window: Side of the square attention blocks, in pixels of this feature map.
        key_channels: Total query/key channels over all heads (default C); a multiple of ``heads``.
    """

    def __init__(
        self, channels: int, heads: int = 4, window: int = 8, key_channels: int | None = None
    ) -> None:
        super().__init__("WindowSelfAttention2d", channels, heads, key_channels)
        self.window = positive_int("WindowSelfAttention2d", "window", window)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"

    @overload
    def forward(self, x: Tensor, return_attention: Literal[False] = False) -> Tensor: ...
    @overload
    def forward(self, x: Tensor, return_attention: Literal[True]) -> tuple[Tensor, Tensor]: ...
    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend within windows of ``x`` (B, C, H, W); optionally return the per-window weights."""
        b, _, h, w = x.shape
        s, heads = self.window, self.heads
        pad_h, pad_w = (-h) % s, (-w) % s
        q, k, v = self.query(x), self.key(x), self.value(x)
        mask = None
        if pad_h or pad_w:
            q, k, v = (F.pad(t, (0, pad_w, 0, pad_h)) for t in (q, k, v))
            valid = F.pad(torch.ones(1, 1, h, w, dtype=torch.bool, device=x.device), (0, pad_w, 0, pad_h))
            mask = _partition(valid, 1, s).reshape(-1, 1, 1, s * s).repeat(b, 1, 1, 1)
        hp, wp = h + pad_h, w + pad_w
        o, weights = attend(
            _partition(q, heads, s), _partition(k, heads, s), _partition(v, heads, s), mask, return_attention
        )
        o = _merge(o, b, hp, wp, s)[:, :, :h, :w]
        y = x + self.gamma * self.out(o)
        if return_attention:
            assert weights is not None
            return y, weights
        return y
