"""Attention blocks: shapes, gradients, maps, identity at initialisation, locality of windowed attention."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from segpipe.core.errors import ModelError
from segpipe.models.attention import (
    CBAM,
    AttentionGate,
    ChannelAttention,
    SelfAttention2d,
    SpatialAttention,
    SqueezeExcitation,
    WindowSelfAttention2d,
)

C = 8

BLOCKS: dict[str, Callable[[], nn.Module]] = {
    "se": lambda: SqueezeExcitation(C, reduction=2),
    "channel": lambda: ChannelAttention(C, reduction=2),
    "spatial": lambda: SpatialAttention(7),
    "cbam": lambda: CBAM(C, reduction=2),
    "global": lambda: SelfAttention2d(C, heads=2),
    "local": lambda: WindowSelfAttention2d(C, heads=2, window=4),
}


def _with_gamma(block: nn.Module, value: float) -> nn.Module:
    gamma = getattr(block, "gamma", None)
    if isinstance(gamma, nn.Parameter):
        with torch.no_grad():
            gamma.fill_(value)
    return block


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_block_shape_and_gradients(name: str, size: tuple[int, int]) -> None:
    block = _with_gamma(BLOCKS[name](), 0.5)
    # Per-channel offsets, as real feature maps have: zero-mean noise would leave SE's pooled input near 0.
    x = (torch.randn(2, C, *size) + 2 * torch.randn(2, C, 1, 1)).requires_grad_()
    y = block(x)
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in block.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}.{pname} got a zero gradient"


def test_gate_shape_and_gradients() -> None:
    gate = AttentionGate(gate_channels=16, skip_channels=C, inter_channels=4)
    skip = torch.randn(2, C, 16, 16, requires_grad=True)
    g = torch.randn(2, 16, 8, 8, requires_grad=True)
    y, alpha = gate(skip, g, return_attention=True)
    assert y.shape == skip.shape
    assert alpha.shape == (2, 1, 16, 16)
    assert bool(((alpha >= 0) & (alpha <= 1)).all())
    torch.testing.assert_close(y, skip * alpha)
    (y * torch.randn_like(y)).sum().backward()
    for tensor in (skip, g, *gate.parameters()):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_gate_at_same_resolution() -> None:
    gate = AttentionGate(gate_channels=6, skip_channels=C, inter_channels=4)
    y, alpha = gate(torch.randn(1, C, 10, 10), torch.randn(1, 6, 10, 10), return_attention=True)
    assert y.shape == (1, C, 10, 10) and alpha.shape == (1, 1, 10, 10)


@pytest.mark.parametrize("name", ["se", "channel"])
def test_channel_maps(name: str) -> None:
    x = torch.randn(3, C, 9, 7)
    y, weights = BLOCKS[name]()(x, return_attention=True)
    assert weights.shape == (3, C, 1, 1)
    assert bool(((weights >= 0) & (weights <= 1)).all())
    torch.testing.assert_close(y, x * weights)


def test_spatial_and_cbam_maps() -> None:
    x = torch.randn(2, C, 9, 7)
    y, weights = SpatialAttention(3)(x, return_attention=True)
    assert weights.shape == (2, 1, 9, 7) and bool(((weights >= 0) & (weights <= 1)).all())
    torch.testing.assert_close(y, x * weights)
    cbam = CBAM(C, reduction=2)
    y, maps = cbam(x, return_attention=True)
    assert set(maps) == {"channel", "spatial"}
    assert maps["channel"].shape == (2, C, 1, 1) and maps["spatial"].shape == (2, 1, 9, 7)
    torch.testing.assert_close(y, cbam(x))


@pytest.mark.parametrize("name", ["global", "local"])
def test_self_attention_is_identity_at_init(name: str) -> None:
    block = BLOCKS[name]()
    assert isinstance(block, SelfAttention2d | WindowSelfAttention2d)
    assert block.gamma.item() == 0.0
    x = torch.randn(2, C, 13, 10)
    assert torch.equal(block(x), x)
    y, _ = block(x, return_attention=True)
    assert torch.equal(y, x)


def _rows_are_distributions(weights: Tensor) -> None:
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), rtol=0, atol=1e-5)


def test_global_attention_map() -> None:
    block = _with_gamma(SelfAttention2d(C, heads=2, key_channels=4), 0.3)
    x = torch.randn(2, C, 6, 5)
    y, weights = block(x, return_attention=True)
    assert weights.shape == (2, 2, 30, 30)
    _rows_are_distributions(weights)
    # The explicit path (weights computed) and the fused SDPA path agree.
    torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-5)


def test_local_attention_map_with_padding() -> None:
    block = _with_gamma(WindowSelfAttention2d(C, heads=2, window=4), 0.3)
    x = torch.randn(2, C, 13, 10)  # padded to 16 x 12: 4 x 3 windows per image
    y, weights = block(x, return_attention=True)
    assert y.shape == x.shape
    assert weights.shape == (2 * 12, 2, 16, 16)
    _rows_are_distributions(weights)
    # Bottom-right window of image 0 covers rows 12..15 and columns 8..11: only row 12 is real, so keys in
    # rows 13..15 (positions 4..15 of the window) are padding and receive no weight.
    corner = weights[11]
    assert torch.equal(corner[..., 4:], torch.zeros_like(corner[..., 4:]))
    torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(8, 8), (6, 5)])
def test_one_window_equals_global_attention(size: tuple[int, int]) -> None:
    local = _with_gamma(WindowSelfAttention2d(C, heads=2, window=8), 0.8)
    glob = SelfAttention2d(C, heads=2)
    glob.load_state_dict(local.state_dict())
    x = torch.randn(2, C, *size)
    torch.testing.assert_close(local(x), glob(x), rtol=1e-5, atol=1e-5)


def test_local_attention_stays_in_its_window() -> None:
    block = _with_gamma(WindowSelfAttention2d(C, heads=2, window=4), 1.0)
    x = torch.randn(1, C, 12, 12, requires_grad=True)
    block(x)[0, :, 5, 6].sum().backward()  # window rows 4..7, columns 4..7
    assert x.grad is not None
    touched = x.grad.abs().sum(dim=(0, 1)) > 0
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[4:8, 4:8] = True
    assert torch.equal(touched, expected)


def test_local_attention_memory_is_linear_in_area() -> None:
    # 256 x 256 = 65536 positions: global attention weights would take 2 heads x 65536^2 floats (34 GB).
    block = _with_gamma(WindowSelfAttention2d(4, heads=2, window=8), 0.5)
    x = torch.randn(1, 4, 250, 254)
    with torch.no_grad():
        y, weights = block(x, return_attention=True)
    assert y.shape == x.shape
    assert weights.shape == (32 * 32, 2, 64, 64)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SelfAttention2d(6, heads=4), "'channels' (6) must be a multiple of 'heads' (4)"),
        (lambda: SelfAttention2d(8, heads=2, key_channels=3), "'key_channels' (3) must be a multiple"),
        (lambda: WindowSelfAttention2d(8, window=0), "'window' must be a positive integer, got 0"),
        (lambda: SpatialAttention(4), "'kernel_size' must be odd"),
        (lambda: SqueezeExcitation(0), "'channels' must be a positive integer, got 0"),
        (lambda: AttentionGate(4, 4, True), "'inter_channels' must be a positive integer, got True"),
    ],
)
def test_bad_arguments(make: Callable[[], nn.Module], message: str) -> None:
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()
