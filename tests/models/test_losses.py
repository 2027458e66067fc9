"""Soft Dice and Lovasz-softmax losses: bounds, hand-computed values, ignored pixels and classes, gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from segpipe.core.errors import ConfigError
from segpipe.models.losses import lovasz_softmax_loss, soft_dice_loss


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


@pytest.mark.parametrize(
    ("loss", "seed", "ignored_rows", "tolerance"), [(soft_dice_loss, 1, 4, 1e-6), (lovasz_softmax_loss, 4, 3, 1e-5)]
)
def test_ignored_pixels_and_excluded_classes_count_for_nothing(
    loss: Callable[..., torch.Tensor], seed: int, ignored_rows: int, tolerance: float
) -> None:
    """Both losses: values at ignored pixels change nothing, an excluded class is left out, bad shapes refused."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (1, 8, 8), generator=g)
    target[0, :ignored_rows] = 255
    logits = torch.randn(1, 3, 8, 8, generator=g)
    changed = logits.clone()
    changed[:, :, :ignored_rows] = torch.randn(1, 3, ignored_rows, 8, generator=g) * 10  # only at ignored pixels
    assert torch.equal(loss(logits, target), loss(changed, target))

    # a class left out of the mean: confident mistakes into it change the loss only through the kept classes
    no_two = torch.where(target == 2, 255, target)
    assert loss(_confident(no_two, 3), no_two, exclude=(2,)).item() == pytest.approx(0.0, abs=tolerance)
    with pytest.raises(ConfigError, match=r"\(B, K, H, W\)"):
        loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.int64))


def test_dice_needs_a_class_outside_exclude() -> None:
    with pytest.raises(ConfigError, match="at least one class"):
        soft_dice_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.int64), exclude=(0, 1, 2))


def test_gradient_lowers_the_loss() -> None:
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 5, (2, 12, 12), generator=g)
    logits = torch.zeros(2, 5, 12, 12, requires_grad=True)
    before = soft_dice_loss(logits, target)
    before.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    after = soft_dice_loss((logits - 10.0 * logits.grad).detach(), target)
    assert after < before


def test_dice_refuses_a_smooth_that_is_not_positive() -> None:
    with pytest.raises(ConfigError, match="smooth"):
        soft_dice_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int64), smooth=0)


def test_lovasz_equals_jaccard_loss_for_hard_predictions() -> None:
    """At one-hot probabilities the Lovasz extension is exact: mean over present classes of 1 - IoU."""
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (2, 10, 10), generator=g)
    pred = torch.randint(0, 4, (2, 10, 10), generator=g)
    target[0, 0] = 255
    loss = lovasz_softmax_loss(_confident(pred, 4, scale=200.0), target)
    valid = target != 255
    ious = []
    for c in range(4):
        t, p = (target == c) & valid, (pred == c) & valid
        ious.append((t & p).sum().item() / (t | p).sum().item())
    assert loss.item() == pytest.approx(1 - sum(ious) / 4, abs=1e-5)
    assert lovasz_softmax_loss(_confident(target, 4, scale=200.0), target).item() == pytest.approx(0.0, abs=1e-6)


def test_lovasz_hand_computed_value() -> None:
    # 2 pixels, classes 0 and 1, uniform logits: p = 0.5 everywhere, every error 0.5.
    # Class 0 (truth 1, 0): sorted errors [0.5, 0.5], gradient [1 - 0/1, (1 - 0/2) - 1] = [1, 0] -> 0.5; same for 1.
    target = torch.tensor([[[0, 1]]])
    assert lovasz_softmax_loss(torch.zeros(1, 2, 1, 2), target).item() == pytest.approx(0.5)


def test_lovasz_of_an_all_ignored_batch_is_zero_and_its_gradient_lowers_it() -> None:
    g = torch.Generator().manual_seed(4)
    target = torch.randint(0, 3, (1, 8, 8), generator=g)
    target[0, :3] = 255
    logits = torch.randn(1, 3, 8, 8, generator=g)
    assert lovasz_softmax_loss(logits, torch.full_like(target, 255)).item() == 0.0
    x = logits.clone().requires_grad_(True)
    before = lovasz_softmax_loss(x, target)
    before.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert lovasz_softmax_loss((x - 5.0 * x.grad).detach(), target) < before
