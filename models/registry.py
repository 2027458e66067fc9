"""Architecture names used in checkpoint metadata, and :func:`build_model` to construct them."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from segpipe.core.errors import ModelError
from segpipe.models.networks import ChannelAttentionKind, SelfAttentionKind, UNet


def attention_unet(
    in_channels: int,
    num_classes: int,
    base_channels: int = 16,
    depth: int = 4,
    channel_attention: ChannelAttentionKind = "cbam",
    self_attention: SelfAttentionKind = "local",
    attention_gates: bool = True,
    heads: int = 4,
    window: int = 8,
    downsample: int = 1,
) -> UNet:
    """U-Net with CBAM after every stage, local self-attention at the bottleneck and gated skips."""
    return UNet(
        in_channels,
        num_classes,
        base_channels=base_channels,
        depth=depth,
        channel_attention=channel_attention,
        self_attention=self_attention,
        attention_gates=attention_gates,
        heads=heads,
        window=window,
        downsample=downsample,
    )


def unet(in_channels: int, num_classes: int, base_channels: int = 16, depth: int = 4, downsample: int = 1) -> UNet:
    """Plain U-Net with the same channel widths (and working resolution) as :func:`attention_unet`, for ablation."""
    return UNet(in_channels, num_classes, base_channels=base_channels, depth=depth, downsample=downsample)


class Pointwise(nn.Module):
    """A 1x1 convolution from bands to classes: the null model of benchmarks (no spatial context, receptive field
    radius 0, about ``bands x classes`` multiply-adds per pixel), so a run with it measures segpipe's own cost.

    Input (B, in_channels, H, W) float32, output logits (B, num_classes, H, W); any H and W.
    """

    size_multiple = 1

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        # the convolution as one batched matrix product: torch's conv2d takes 56 ms for a 1x1 kernel on a 3-band
        # 1088 px tile on 2 EPYC cores, this 4 ms (the same sums, in another order: within 1e-6)
        b, c, h, w = x.shape
        weight = self.conv.weight[:, :, 0, 0]
        bias = self.conv.bias
        assert bias is not None
        out = torch.baddbmm(bias[None, :, None], weight.expand(b, -1, -1), x.reshape(b, c, h * w))
        return out.view(b, -1, h, w)


def pointwise(in_channels: int, num_classes: int) -> Pointwise:
    """The null model: one 1x1 convolution (see :class:`Pointwise`)."""
    return Pointwise(in_channels, num_classes)


#: Registry of architectures: the ``architecture`` field of checkpoint metadata names one of these.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "attention_unet": attention_unet,
    "unet": unet,
    "pointwise": pointwise,
}


def build_model(architecture: str, arguments: Mapping[str, Any]) -> nn.Module:
    """Construct a registered architecture with freshly initialised weights (training mode).

    Args:
        architecture: A key of :data:`ARCHITECTURES`.
        arguments: Keyword arguments for it (JSON values, as stored in checkpoint metadata).

    Raises:
        ModelError: For an unknown architecture, unknown or missing arguments, or invalid values.
    """
    known = ", ".join(sorted(ARCHITECTURES))
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {architecture!r}; known architectures: {known}")
    if not isinstance(arguments, Mapping) or not all(isinstance(key, str) for key in arguments):
        raise ModelError(
            f"arguments for {architecture!r} must be a mapping of parameter names to values, "
            f"got {arguments!r}"
        )
    factory = ARCHITECTURES[architecture]
    signature = inspect.signature(factory)
    try:
        signature.bind(**arguments)
    except TypeError as error:
        accepted = ", ".join(signature.parameters)
        raise ModelError(
            f"bad arguments for architecture {architecture!r}: {error}; accepted parameters: {accepted}"
        ) from None
    try:
        return factory(**arguments)
    except ModelError as error:
        raise ModelError(f"bad arguments for architecture {architecture!r}: {error}") from None
