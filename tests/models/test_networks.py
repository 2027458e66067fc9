"""UNet: shapes, size checks, attention maps, receptive field, translation equivariance; the registry."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from segpipe.core.errors import ModelError
from segpipe.models.networks import UNet, receptive_field_radius
from segpipe.models.registry import ARCHITECTURES, build_model
from tests.models.conftest import randomise

FULL: dict[str, Any] = {"channel_attention": "cbam", "self_attention": "local", "attention_gates": True}
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "cbam-local-gates": FULL,
    "se-global": {"channel_attention": "se", "self_attention": "global"},
    "gates": {"attention_gates": True},
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("depth", "size"), [(2, (32, 32)), (2, (16, 40)), (3, (64, 48))])
def test_output_shape(variant: str, depth: int, size: tuple[int, int]) -> None:
    model = UNet(3, 5, base_channels=4, depth=depth, heads=2, window=2, **VARIANTS[variant])
    x = torch.randn(2, 3, *size)
    logits = model(x)
    assert logits.shape == (2, 5, *size)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("variant", ["plain", "cbam-local-gates"])
def test_downsample_keeps_the_input_grid(variant: str) -> None:
    model = UNet(3, 5, base_channels=4, depth=2, heads=2, window=2, downsample=2, **VARIANTS[variant])
    assert model.size_multiple == 8
    x = torch.randn(2, 3, 24, 40)
    logits = model(x)
    assert logits.shape == (2, 5, 24, 40)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ModelError, match=r"multiples of 8 \(downsample \* 2\*\*depth\), got 20 x 40"):
        model(torch.randn(1, 3, 20, 40))
    # The network sees 2 x 2 block means: a change that keeps every block mean changes nothing.
    model.eval()
    y = x.clone()
    y[:, :, 0::2, 0::2] += 1.0
    y[:, :, 1::2, 1::2] -= 1.0
    torch.testing.assert_close(model(x), model(y))


def test_size_must_be_a_multiple() -> None:
    model = UNet(3, 2, base_channels=4, depth=3)
    assert model.size_multiple == 8
    with pytest.raises(
        ModelError, match=r"multiples of 8 \(2\*\*depth\), got 30 x 32; pad the tile to 32 x 32"
    ):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ModelError, match=r"expected input \(B, 3, H, W\), got shape \(1, 4, 32, 32\)"):
        model(torch.randn(1, 4, 32, 32))


def test_attention_maps() -> None:
    model = randomise(UNet(3, 4, base_channels=4, depth=2, heads=2, window=2, **FULL))
    x = torch.randn(2, 3, 32, 32)
    logits, maps = model(x, return_attention=True)
    torch.testing.assert_close(logits, model(x))
    assert maps["enc1.cbam.channel"].shape == (2, 4, 1, 1)
    assert maps["enc1.cbam.spatial"].shape == (2, 1, 32, 32)
    assert maps["dec2.cbam.spatial"].shape == (2, 1, 16, 16)
    assert maps["gate1"].shape == (2, 1, 32, 32) and maps["gate2"].shape == (2, 1, 16, 16)
    # Bottleneck 8 x 8, windows of 2 x 2: 16 windows per image.
    assert maps["bottleneck.self_attention"].shape == (2 * 16, 2, 4, 4)
    expected = {
        f"{s}.cbam.{b}"
        for s in ("enc1", "enc2", "bottleneck", "dec1", "dec2")
        for b in ("channel", "spatial")
    }
    assert set(maps) == expected | {"gate1", "gate2", "bottleneck.self_attention"}
    for name, value in maps.items():
        assert bool((value >= 0).all() and (value <= 1).all()), name
    torch.testing.assert_close(maps["bottleneck.self_attention"].sum(-1), torch.ones(32, 2, 4))


def test_plain_and_attention_parameter_counts() -> None:
    plain = build_model("unet", {"in_channels": 3, "num_classes": 6})
    attention = build_model("attention_unet", {"in_channels": 3, "num_classes": 6})
    n_plain, n_attention = _count(plain), _count(attention)
    print(f"\nparameters at base 16, depth 4: unet {n_plain:,}, attention_unet {n_attention:,}")
    assert 1_800_000 < n_plain < 2_200_000
    assert n_plain < n_attention < 1.25 * n_plain
    # Same widths: every 3x3 convolution of the plain net has its twin, shape for shape, in the attention net.
    shapes = {k: v.shape for k, v in attention.state_dict().items() if k.endswith("convs.0.weight")}
    assert shapes == {k: v.shape for k, v in plain.state_dict().items() if k.endswith("convs.0.weight")}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"depth": 4}, 137),
        ({"depth": 2}, 29),
        ({"depth": 4, **FULL}, 387),
        ({"depth": 2, "self_attention": "local", "window": 3}, 29 + 2 * 4),
        ({"depth": 2, "downsample": 2}, 29 * 2 + 1 + 2),
    ],
)
def test_receptive_field_formula(kwargs: dict[str, Any], expected: int) -> None:
    assert receptive_field_radius(UNet(3, 2, base_channels=4, **kwargs)) == expected


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"self_attention": "local", "attention_gates": True, "window": 2}, {"downsample": 2}],
)
def test_receptive_field_bounds_the_gradient(kwargs: dict[str, Any]) -> None:
    model = randomise(UNet(1, 1, base_channels=4, depth=2, heads=2, **kwargs))
    radius = receptive_field_radius(model)
    size, centre = 192, 96
    x = torch.randn(1, 1, size, size, requires_grad=True)
    model(x)[0, 0, centre, centre].backward()
    assert x.grad is not None
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    reach = int(torch.maximum((rows - centre).abs().max(), (cols - centre).abs().max()))
    assert reach <= radius
    assert reach >= radius * 3 // 4  # the bound is not loose


def _shifted_outputs(model: UNet, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of two tiles of one scene, offset by (dy, dx), on the pixels both see with full context."""
    radius = receptive_field_radius(model)
    side = -(-(2 * radius + 40) // 16) * 16
    scene = torch.randn(1, model.in_channels, side + dy, side + dx)
    with torch.no_grad():
        a = model(scene[:, :, :side, :side])
        b = model(scene[:, :, dy : dy + side, dx : dx + side])
    lo, hi = radius + max(dy, dx), side - radius
    return a[:, :, lo:hi, lo:hi], b[:, :, lo - dy : hi - dy, lo - dx : hi - dx]


@pytest.mark.parametrize(
    ("kwargs", "expected_shift"),
    [({}, 4), ({"self_attention": "local", "attention_gates": True, "window": 2}, 8), ({"downsample": 2}, 8)],
)
def test_translation_equivariance(kwargs: dict[str, Any], expected_shift: int) -> None:
    model = randomise(UNet(2, 3, base_channels=4, depth=2, heads=2, **kwargs))
    if model.context is not None:
        with torch.no_grad():
            model.context.gamma.fill_(20.0)  # make attention dominate, so a misaligned window would show
    shift = model.shift_multiple  # 4; 8 with 2 x 2 windows at the 1/4-resolution bottleneck, or at half resolution
    assert shift == expected_shift
    a, b = _shifted_outputs(model, 2 * shift, shift)
    assert a.std(dim=(2, 3)).max() > 1e-2  # the output does depend on the input: the test can fail
    torch.testing.assert_close(a, b)
    if model.context is not None:  # windows are anchored at the tile origin: a shift by size_multiple moves them
        a, b = _shifted_outputs(model, model.size_multiple, 0)
        assert (a - b).abs().max() > 1e-2


def test_receptive_field_needs_a_unet() -> None:
    with pytest.raises(ModelError, match="expected a UNet, got Conv2d"):
        receptive_field_radius(nn.Conv2d(1, 1, 1))


def test_registry_defaults() -> None:
    attention = build_model("attention_unet", {"in_channels": 3, "num_classes": 2, "base_channels": 4})
    assert isinstance(attention, UNet)
    assert (attention.channel_attention, attention.self_attention, attention.attention_gates) == (
        "cbam",
        "local",
        True,
    )
    plain = build_model("unet", {"in_channels": 3, "num_classes": 2, "base_channels": 4})
    assert isinstance(plain, UNet)
    assert (plain.channel_attention, plain.self_attention, plain.attention_gates) == ("none", "none", False)
    assert set(ARCHITECTURES) == {"attention_unet", "unet", "pointwise"}  # pointwise: the null model


@pytest.mark.parametrize(
    ("architecture", "arguments", "message"),
    [
        ("resnet", {}, "unknown architecture 'resnet'; known architectures: attention_unet, pointwise, unet"),
        ("unet", {"in_channels": 3}, "missing a required argument: 'num_classes'"),
        ("unet", {"in_channels": 3, "num_classes": 2, "chanels": 4}, "unexpected keyword argument 'chanels'"),
        (
            "unet",
            {"in_channels": 3, "num_classes": 2, "channel_attention": "se"},
            "accepted parameters: in_ch",
        ),
        (
            "attention_unet",
            {"in_channels": 3, "num_classes": 0},
            "'num_classes' must be a positive integer, got 0",
        ),
        ("attention_unet", {"in_channels": 3, "num_classes": 2, "self_attention": "axial"}, "one of 'none'"),
        ("attention_unet", {"in_channels": 3, "num_classes": 2, "heads": 3}, "must be a multiple of 'heads'"),
        ("unet", {"in_channels": 3, "num_classes": 2, "depth": 2.5}, "'depth' must be a positive integer"),
        ("unet", [("in_channels", 3)], "must be a mapping"),
    ],
)
def test_registry_errors(architecture: str, arguments: Any, message: str) -> None:
    with pytest.raises(ModelError) as error:
        build_model(architecture, arguments)
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)
