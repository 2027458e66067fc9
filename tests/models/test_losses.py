"""Soft Dice loss: bounds, ignored pixels and classes, gradients, and its place in training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.losses import soft_dice_loss
from segpipe.errors import ConfigError


def _confident(target: torch.Tensor, k: int, scale: float = 50.0) -> torch.Tensor:
    """Logits that put (almost) all mass on ``target``'s class at every pixel."""
    return F.one_hot(target.clamp(max=k - 1), k).permute(0, 3, 1, 2).float() * scale


def test_perfect_prediction_has_no_loss_and_wrong_has_loss_near_one() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 16, 16), generator=g)
    assert soft_dice_loss(_confident(target, 4), target).item() == pytest.approx(0.0, abs=1e-6)
    wrong = _confident((target + 1) % 4, 4)
    assert soft_dice_loss(wrong, target).item() > 0.95


def test_hand_computed_value() -> None:
    # one image of 2 pixels, 2 classes; uniform logits give p = 0.5 everywhere
    target = torch.tensor([[[0, 1]]])
    logits = torch.zeros(1, 2, 1, 2)
    # class 0: inter 0.5, |P| 1, |G| 1 -> (1 + 1) / (2 + 1); class 1 the same
    expected = 1 - (2 * 0.5 + 1) / (1 + 1 + 1)
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected)
    assert soft_dice_loss(logits, target, smooth=1e-6).item() == pytest.approx(0.5, abs=1e-5)


def test_ignored_pixels_and_excluded_classes_count_for_nothing() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (1, 8, 8), generator=g)
    target[0, :4] = 255
    logits = torch.randn(1, 3, 8, 8, generator=g)
    changed = logits.clone()
    changed[:, :, :4] = torch.randn(1, 3, 4, 8, generator=g) * 10  # only at ignored pixels
    assert torch.equal(soft_dice_loss(logits, target), soft_dice_loss(changed, target))

    # a class left out of the mean: confident mistakes into it change the loss only through the kept classes
    no_two = torch.where(target == 2, 255, target)
    kept = soft_dice_loss(_confident(no_two, 3), no_two, exclude=(2,))
    assert kept.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="at least one class"):
        soft_dice_loss(logits, target, exclude=(0, 1, 2))


def test_gradient_lowers_the_loss() -> None:
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 5, (2, 12, 12), generator=g)
    logits = torch.zeros(2, 5, 12, 12, requires_grad=True)
    before = soft_dice_loss(logits, target)
    before.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    after = soft_dice_loss((logits - 10.0 * logits.grad).detach(), target)
    assert after < before


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"\(B, K, H, W\)"):
        soft_dice_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.int64))
    with pytest.raises(ConfigError, match="smooth"):
        soft_dice_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int64), smooth=0)
