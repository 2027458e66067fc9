"""Training losses beyond torch's cross-entropy: soft Dice and Lovasz-softmax over a batch, for segmentation logits.

Cross-entropy weighs every pixel alike, so a class that covers 5 % of the pixels contributes about 5 % of the
gradient even with class weights; IoU, the metric, weighs every class alike. Soft Dice (1 - 2|P.G| / (|P| + |G|)
per class, averaged over classes) is a differentiable stand-in for the per-class overlap and is commonly added
to cross-entropy (nnU-Net's "Dice + CE") to lift small, thin classes such as roads. The Lovasz-softmax loss
(Berman, Rannen Triki and Blaschko, CVPR 2018) is the tight convex surrogate of the per-class Jaccard loss
1 - IoU itself: for each class it sorts the pixels by their error |g - p| and weighs each error by how much it
moves the class's IoU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from segpipe.core.errors import ConfigError


def _check_shapes(logits: Tensor, target: Tensor) -> None:
    """Refuse logits that are not (B, K, H, W) or a target that is not (B, H, W) on the same grid."""
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ConfigError(
            f"expected logits (B, K, H, W) and target (B, H, W), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )


def soft_dice_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = 255,
    exclude: Sequence[int] = (),
    smooth: float = 1.0,
) -> Tensor:
    """Mean over classes of ``1 - (2 sum(p g) + s) / (sum(p) + sum(g) + s)``, summed over the whole batch.

    Args:
        logits: (B, K, H, W) raw scores (any float dtype; computed in float32).
        target: (B, H, W) int64 class ids; pixels equal to ``ignore_index`` count for nothing.
        ignore_index: Mask value left out (need not be a class id).
        exclude: Class ids left out of the mean (e.g. "unlabeled"); their pixels should already carry
            ``ignore_index``.
        smooth: s, added to numerator and denominator: a class absent from both prediction and target scores
            a Dice of 1 (no loss) instead of 0/0.

    Returns:
        A scalar in [0, 1]: 0 when the softmax puts all of each valid pixel's mass on its true class.
    """
    _check_shapes(logits, target)
    if smooth <= 0:
        raise ConfigError(f"expected smooth > 0, got {smooth}")
    k = logits.shape[1]
    keep = [c for c in range(k) if c not in set(exclude)]
    if not keep:
        raise ConfigError(f"expected at least one class outside exclude={tuple(exclude)}, got {k} classes")
    probs = F.softmax(logits.float(), dim=1)
    valid = target != ignore_index
    onehot = F.one_hot(torch.where(valid, target, 0), k).permute(0, 3, 1, 2).to(probs.dtype)
    weight = valid.unsqueeze(1).to(probs.dtype)
    probs = probs * weight
    onehot = onehot * weight
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + smooth) / (total + smooth)
    return 1 - dice[keep].mean()


def _lovasz_gradient(truth_sorted: Tensor) -> Tensor:
    """Gradient of the Jaccard loss w.r.t. errors sorted in decreasing order (Berman et al., 2018, Alg. 1).

    Args:
        truth_sorted: (P,) float 0/1 ground truth of one class, in the order of decreasing error.
    """
    total = truth_sorted.sum()
    intersection = total - truth_sorted.cumsum(0)
    union = total + (1 - truth_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return jaccard


def lovasz_softmax_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = 255,
    exclude: Sequence[int] = (),
) -> Tensor:
    """Lovasz-softmax loss over the whole batch: mean over the classes present in ``target`` of the Lovasz
    extension of the Jaccard loss, evaluated at the softmax errors.

    Cost: one sort of the B * H * W valid pixels per class, O(K * P log P) for P pixels.

    Args:
        logits: (B, K, H, W) raw scores (any float dtype; computed in float32).
        target: (B, H, W) int64 class ids; pixels equal to ``ignore_index`` count for nothing.
        ignore_index: Mask value left out (need not be a class id).
        exclude: Class ids left out of the mean (e.g. "unlabeled"); their pixels should already carry
            ``ignore_index``.

    Returns:
        A scalar in [0, 1]: 0 when every valid pixel's softmax puts all its mass on the true class; equal to
        the mean of 1 - IoU over present classes when the softmax is one-hot (a hard prediction).
    """
    _check_shapes(logits, target)
    k = logits.shape[1]
    probs = F.softmax(logits.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, k)
    labels = target.reshape(-1)
    valid = labels != ignore_index
    probs, labels = probs[valid], labels[valid]
    excluded = set(exclude)
    losses = []
    for c in range(k):
        if c in excluded:
            continue
        truth = (labels == c).to(probs.dtype)
        if not bool(truth.any()):
            continue  # absent classes are left out, as in the paper's "present" mode
        errors = (truth - probs[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_gradient(truth[order])))
    if not losses:
        return logits.sum() * 0.0  # nothing to score: no loss, but keep the graph
    return torch.stack(losses).mean()
