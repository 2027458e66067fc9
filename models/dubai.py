"""The Dubai aerial data set (``../shared/data/dubai-aerial``; Humans in the Loop / MBRSC, CC0): its classes and
the split the shipped model was trained on. Constants only."""

from __future__ import annotations

#: The Dubai aerial classes, in class-id order, with the colours actually used in the mask PNGs (the
#: ``classes.json`` of the original upload lists different colours and is wrong).
DUBAI_CLASSES: tuple[tuple[str, str], ...] = (
    ("building", "#3C1098"),
    ("land", "#8429F6"),
    ("road", "#6EC1E4"),
    ("vegetation", "#FEDD3A"),
    ("water", "#E2A929"),
    ("unlabeled", "#9B9B9B"),
)
#: Class id of "unlabeled" in :data:`DUBAI_CLASSES`: not a real class, left out of the headline mIoU.
DUBAI_UNLABELED = 5

#: The tile folder held out for validation by default. tile-1 (9 images of 797x644, 4.6 Mpx, 6.6 % of the
#: set) has every real class at >= 4.7 % of its pixels (land 62, water 14, road 13, building 5.3,
#: vegetation 4.7 %). tile-7 would be a poor choice: it is 48 % of all pixels (training would lose half of
#: the data), water is only 1.5 % of it (a noisy IoU), and validating its 34 Mpx every epoch costs more than
#: an epoch of training on a CPU.
DEFAULT_VALIDATION_TILE = "tile-1"
