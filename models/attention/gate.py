"""Attention gate on a U-Net skip connection (Oktay et al., "Attention U-Net", 2018)."""

from __future__ import annotations

from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.models._checks import positive_int


class AttentionGate(nn.Module):
    """Additive attention gate: the decoder's coarser features decide which skip pixels pass.

    ``alpha = sigmoid(psi(relu(theta(skip) + phi(gate))))``, ``output = skip * resample(alpha)``, where theta,
    phi and psi are 1x1 convolutions. When the gate is coarser than the skip (the usual case: the gate is the
    decoder feature one level down), the skip is first averaged down to the gate's size (bilinear resampling,
    a 2x2 mean for a factor of 2), the coefficients are computed at the gate's resolution, and ``alpha`` is
    resampled bilinearly back to the skip's size. This is Oktay et al.'s design with the strided theta split
    into a resample and a 1x1 convolution.

    Layout: ``skip`` (B, C_skip, H, W), ``gate`` (B, C_gate, H_g, W_g); output (B, C_skip, H, W); the map is
    (B, 1, H, W) in [0, 1]. Local: bilinear resampling and 1x1 convolutions only.

    Cost: O(B * H_g * W_g * inter_channels * (C_skip + C_gate)) time plus O(B * C_skip * H * W) for the
    product; parameters (C_skip + C_gate + 1) * inter_channels + biases.

    Args:
        gate_channels: C_gate, channels of the gating signal.
        skip_channels: C_skip, channels of the skip connection being gated.
        inter_channels: Width of the intermediate (theta + phi) space; Oktay et al. use C_skip / 2.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int) -> None:
        super().__init__()
        positive_int("AttentionGate", "gate_channels", gate_channels)
        positive_int("AttentionGate", "skip_channels", skip_channels)
        positive_int("AttentionGate", "inter_channels", inter_channels)
        self.theta = nn.Conv2d(skip_channels, inter_channels, 1, bias=False)
        self.phi = nn.Conv2d(gate_channels, inter_channels, 1)
        self.psi = nn.Conv2d(inter_channels, 1, 1)

    def attention_map(self, skip: Tensor, gate: Tensor) -> Tensor:
        """The (B, 1, H, W) gate coefficients in [0, 1] for ``skip`` (B, C_skip, H, W) and ``gate``."""
        size = skip.shape[-2:]
        small = gate.shape[-2:]
        if small != size:
            skip = F.interpolate(skip, size=small, mode="bilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(self.theta(skip) + self.phi(gate))))
        if small != size:
            alpha = F.interpolate(alpha, size=size, mode="bilinear", align_corners=False)
        return alpha

    @overload
    def forward(self, skip: Tensor, gate: Tensor, return_attention: Literal[False] = False) -> Tensor: ...
    @overload
    def forward(
        self, skip: Tensor, gate: Tensor, return_attention: Literal[True]
    ) -> tuple[Tensor, Tensor]: ...
    def forward(
        self, skip: Tensor, gate: Tensor, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Gate ``skip`` (B, C_skip, H, W) by ``gate``; optionally also return the (B, 1, H, W) map."""
        alpha = self.attention_map(skip, gate)
        out = skip * alpha
        return (out, alpha) if return_attention else out
