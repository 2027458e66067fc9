"""Training losses beyond torch's cross-entropy: soft Dice over a batch, for segmentation logits.

Cross-entropy weighs every pixel alike, so a class that covers 5 % of the pixels contributes about 5 % of the
gradient even with class weights; IoU, the metric, weighs every class alike. Soft Dice (1 - 2|P.G| / (|P| + |G|)
per class, averaged over classes) is a differentiable stand-in for the per-class overlap and is commonly added
to cross-entropy (nnU-Net's "Dice + CE") to lift small, thin classes such as roads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from segpipe.errors import ConfigError


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
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ConfigError(
            f"expected logits (B, K, H, W) and target (B, H, W), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
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
