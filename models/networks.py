"""U-Net with optional channel attention, bottleneck self-attention and attention gates (and its plain twin).

The network is fully convolutional: convolutions are zero-padded, BatchNorm uses running statistics in eval
mode, down-sampling is 2x2 max pooling and up-sampling is bilinear by 2, so in eval mode a shift of the input
by a multiple of ``size_multiple`` (= 2**depth) shifts the output by the same amount, away from the borders.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.core.errors import ModelError
from segpipe.models._checks import divisible, one_of, positive_int
from segpipe.models.attention import CBAM, AttentionGate, SelfAttention2d, SqueezeExcitation, WindowSelfAttention2d

ChannelAttentionKind = Literal["none", "se", "cbam"]
SelfAttentionKind = Literal["none", "global", "local"]

#: Kernel side of CBAM's spatial branch in every stage.
CBAM_KERNEL = 7


class Stage(nn.Module):
    """Two (3x3 conv -> BatchNorm -> ReLU) layers, then optional SE or CBAM channel attention.

    Layout: (B, C_in, H, W) -> (B, C_out, H, W). Cost: O(B * H * W * 9 * C_out * (C_in + C_out)) time,
    9 * C_out * (C_in + C_out) conv parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, channel_attention: ChannelAttentionKind) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.attention: nn.Module | None = None
        if channel_attention == "se":
            self.attention = SqueezeExcitation(out_channels)
        elif channel_attention == "cbam":
            self.attention = CBAM(out_channels, kernel_size=CBAM_KERNEL)
        self.kind = channel_attention

    def forward(self, x: Tensor, maps: dict[str, Tensor] | None = None, name: str = "") -> Tensor:
        """Apply the stage to ``x``; if ``maps`` is given, store attention maps in it under ``name.*``."""
        x = self.convs(x)
        if self.attention is None:
            return x
        if maps is None:
            out: Tensor = self.attention(x)
            return out
        x, found = self.attention(x, return_attention=True)
        if isinstance(found, dict):
            maps.update({f"{name}.{self.kind}.{key}": value for key, value in found.items()})
        else:
            maps[f"{name}.{self.kind}"] = found
        return x


class UNet(nn.Module):
    """U-Net (Ronneberger et al., 2015) with optional attention; the plain U-Net when all attention is off.

    Encoder stage l (l = 1..depth) has ``base_channels * 2**(l-1)`` channels and is followed by 2x2 max
    pooling; the bottleneck has ``base_channels * 2**depth``. Decoder stage l upsamples the level below
    bilinearly by 2, concatenates the (optionally gated) skip of encoder stage l and applies a :class:`Stage`
    back to the encoder width. A 1x1 convolution gives ``num_classes`` logits. Attention options change no
    channel width, so the plain and attention variants are directly comparable (ablation):

    - ``channel_attention``: SE or CBAM after every encoder, bottleneck and decoder stage.
    - ``self_attention``: :class:`SelfAttention2d` ("global") or :class:`WindowSelfAttention2d` ("local",
      ``window`` x ``window`` bottleneck pixels = ``window * 2**depth`` input pixels) after the bottleneck.
    - ``attention_gates``: an :class:`AttentionGate` on every skip, gated by the decoder feature one level
      down.
    - ``downsample``: d > 1 runs the whole network at 1/d of the input resolution: the input is averaged over
      d x d blocks (an anti-aliased reduction) and the logits are upsampled bilinearly by d back to the input
      grid. Cost falls by about d**2 and every receptive field grows by d, at the price of detail finer than
      d pixels (boundaries are interpolated).

    Layout: input (B, in_channels, H, W) float32, normalised; H and W multiples of ``size_multiple`` =
    ``downsample * 2**depth`` (ModelError otherwise). Output: logits (B, num_classes, H, W).

    Tiling: the plain U-Net and local attention have a bounded receptive field (see
    :func:`receptive_field_radius`), so tiles with a halo of that radius give exactly the untiled result
    provided tile origins are multiples of ``shift_multiple`` (``size_multiple``, times ``window`` with local
    attention, whose windows are anchored at the tile origin). SE/CBAM channel pooling and global
    self-attention see the whole tile, so tiled output equals untiled output only approximately; the pipeline
    blends halos.

    Cost (base 16, depth 4, 512 x 512 input): about 2.0M parameters plain and 2.3M with CBAM + local attention
    + gates; time is dominated by the 3x3 convolutions (O(H * W * base^2) per level).

    Args:
        in_channels: Input bands.
        num_classes: Output classes (logit channels).
        base_channels: Channels of the first stage; doubled at every level.
        depth: Number of 2x down-samplings.
        channel_attention: "none", "se" or "cbam".
        self_attention: "none", "global" or "local" (at the bottleneck).
        attention_gates: Gate every skip connection.
        heads: Self-attention heads; must divide ``base_channels * 2**depth``.
        window: Local attention window side, in bottleneck pixels.
        downsample: Factor by which the network's working resolution is below the input's (1: none).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 16,
        depth: int = 4,
        channel_attention: ChannelAttentionKind = "none",
        self_attention: SelfAttentionKind = "none",
        attention_gates: bool = False,
        heads: int = 4,
        window: int = 8,
        downsample: int = 1,
    ) -> None:
        super().__init__()
        self._keep_arguments(
            in_channels,
            num_classes,
            base_channels,
            depth,
            channel_attention,
            self_attention,
            attention_gates,
            heads,
            window,
            downsample,
        )
        widths = [base_channels * 2**level for level in range(depth + 1)]
        kind: ChannelAttentionKind = channel_attention
        inputs = [in_channels, *widths[:-2]]
        self.encoders = nn.ModuleList(Stage(n, width, kind) for n, width in zip(inputs, widths[:-1], strict=True))
        self.bottleneck = Stage(widths[-2], widths[-1], kind)
        self.context: SelfAttention2d | WindowSelfAttention2d | None = None
        if self_attention != "none":
            divisible("UNet", "base_channels * 2**depth", widths[-1], "heads", heads)
            if self_attention == "global":
                self.context = SelfAttention2d(widths[-1], heads=heads)
            else:
                self.context = WindowSelfAttention2d(widths[-1], heads=heads, window=window)
        self.gates = (
            nn.ModuleList(
                AttentionGate(widths[level + 1], widths[level], max(1, widths[level] // 2))
                for level in range(depth)
            )
            if attention_gates
            else None
        )
        self.decoders = nn.ModuleList(
            Stage(widths[level + 1] + widths[level], widths[level], kind) for level in range(depth)
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def _keep_arguments(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int,
        depth: int,
        channel_attention: ChannelAttentionKind,
        self_attention: SelfAttentionKind,
        attention_gates: bool,
        heads: int,
        window: int,
        downsample: int,
    ) -> None:
        """Check the arguments and keep them as attributes.

        Raises:
            ModelError: a width or count that is not a positive whole number, a depth or downsampling above 8, an
                unknown kind of attention.
        """
        owner = "UNet"
        self.in_channels = positive_int(owner, "in_channels", in_channels)
        self.num_classes = positive_int(owner, "num_classes", num_classes)
        self.base_channels = positive_int(owner, "base_channels", base_channels)
        self.depth = positive_int(owner, "depth", depth)
        if depth > 8:
            raise ModelError(
                f"UNet: 'depth' must be at most 8, got {depth}; inputs would need sides of 2**depth"
            )
        self.channel_attention = one_of(owner, "channel_attention", channel_attention, ("none", "se", "cbam"))
        self.self_attention = one_of(owner, "self_attention", self_attention, ("none", "global", "local"))
        if not isinstance(attention_gates, bool):
            raise ModelError(f"UNet: 'attention_gates' must be true or false, got {attention_gates!r}")
        self.attention_gates = attention_gates
        self.heads = positive_int(owner, "heads", heads)
        self.window = positive_int(owner, "window", window)
        self.downsample = positive_int(owner, "downsample", downsample)
        if downsample > 8:
            raise ModelError(f"UNet: 'downsample' must be at most 8, got {downsample}")

    @property
    def size_multiple(self) -> int:
        """Input H and W must be multiples of this (``downsample * 2**depth``)."""
        return int(self.downsample * 2**self.depth)

    @property
    def shift_multiple(self) -> int:
        """Input shifts (tile origins) by multiples of this shift the output exactly, away from borders."""
        return self.size_multiple * (self.window if self.self_attention == "local" else 1)

    def check_input(self, x: Tensor) -> None:
        """Raise ModelError unless ``x`` is (B, in_channels, H, W), H and W multiples of ``size_multiple``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ModelError(
                f"UNet: expected input (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}; "
                f"pass a batch of {self.in_channels}-band images"
            )
        h, w = int(x.shape[2]), int(x.shape[3])
        m = self.size_multiple
        if h % m or w % m:
            raise ModelError(
                f"UNet: input height and width must be multiples of {m} "
                f"({'downsample * ' if self.downsample > 1 else ''}2**depth), got {h} x {w}; "
                f"pad the tile to {-(-h // m) * m} x {-(-w // m) * m}"
            )

    @overload
    def forward(self, x: Tensor, return_attention: Literal[False] = False) -> Tensor: ...
    @overload
    def forward(self, x: Tensor, return_attention: Literal[True]) -> tuple[Tensor, dict[str, Tensor]]: ...
    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Logits (B, num_classes, H, W) for ``x`` (B, in_channels, H, W).

        With ``return_attention`` also a dict of named maps: ``"enc{l}.se"``, ``"enc{l}.cbam.channel"``,
        ``"enc{l}.cbam.spatial"``, the same for ``"bottleneck"`` and ``"dec{l}"``,
        ``"bottleneck.self_attention"`` and ``"gate{l}"`` (levels l = 1..depth, 1 = full resolution).
        """
        self.check_input(x)
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        maps: dict[str, Tensor] | None = {} if return_attention else None
        skips: list[Tensor] = []
        for level, encoder in enumerate(self.encoders, start=1):
            x = encoder(x, maps, f"enc{level}")
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x, maps, "bottleneck")
        if self.context is not None:
            if maps is None:
                x = self.context(x)
            else:
                x, maps["bottleneck.self_attention"] = self.context(x, return_attention=True)
        for level in range(self.depth, 0, -1):
            skip = skips[level - 1]
            if self.gates is not None:
                gate = self.gates[level - 1]
                if maps is None:
                    skip = gate(skip, x)
                else:
                    skip, maps[f"gate{level}"] = gate(skip, x, return_attention=True)
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.decoders[level - 1](torch.cat([x, skip], dim=1), maps, f"dec{level}")
        logits: Tensor = self.head(x)
        if self.downsample > 1:
            logits = F.interpolate(logits, scale_factor=float(self.downsample), mode="bilinear", align_corners=False)
        if maps is None:
            return logits
        return logits, maps


def receptive_field_radius(model: nn.Module) -> int:
    """Upper bound, in input pixels, on how far an output pixel's inputs lie from it along either axis.

    Conv arithmetic of the main path, computed analytically from the architecture. At level l (pixel spacing
    2**l) a 3x3 convolution adds 2**l, CBAM's 7x7 spatial convolution 3 * 2**l, a 2x2 max pool 2**l (one side,
    counted on both), bilinear up-sampling from level l + 1 one coarse pixel, 2**(l + 1), and local attention
    at the bottleneck ``(window - 1) * 2**depth``. Walking encoder, bottleneck and decoder:

        r = sum_{l<depth} (c * 2**l + 2**l)   +   c * 2**depth + [(window - 1) * 2**depth]
            + sum_{l<depth} (2**(l+1) + c * 2**l)

    with c = 2 (two 3x3 convolutions per stage, plus 3 with CBAM). Gates do not widen it (their coarse input
    is the decoder feature that is up-sampled anyway). Plain U-Net, depth 4: 137 pixels. With ``downsample``
    d > 1 the network runs on a grid of spacing d, so r is multiplied by d, and the d x d input averaging
    (d - 1) and the final bilinear up-sampling (d) are added. Not counted: SE/CBAM
    global channel pooling and global self-attention, which see the whole tile (their influence on far pixels
    is damped, not cut off), and zero padding at tile borders. The *effective* receptive field, where the
    weights actually matter, is typically much smaller than this bound.

    Args:
        model: A :class:`UNet` (also a registry model built from it).

    Raises:
        ModelError: If ``model`` is not a UNet.
    """
    if not isinstance(model, UNet):
        raise ModelError(
            f"receptive_field_radius: expected a UNet, got {type(model).__name__}; for external models "
            "(ONNX, TorchScript) take the halo from the model's metadata"
        )
    c = 2 + (CBAM_KERNEL // 2 if model.channel_attention == "cbam" else 0)
    radius = 0
    for level in range(model.depth):
        radius += c * 2**level + 2**level  # encoder stage, then 2x2 max pool
    radius += c * 2**model.depth  # bottleneck stage
    if model.self_attention == "local":
        radius += (model.window - 1) * 2**model.depth
    for level in range(model.depth):
        radius += 2 ** (level + 1) + c * 2**level  # bilinear up-sampling, then decoder stage
    d = model.downsample
    return radius if d == 1 else radius * d + (d - 1) + d
