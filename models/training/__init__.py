"""Training: configuration, the loop, validation, resume state and optimisation helpers.

``from segpipe.models.training import TrainConfig, train``; the shipped model's recipe is
:mod:`segpipe.models.train_default`.
"""

from segpipe.models.training.config import EpochRecord, TrainConfig, TrainResult
from segpipe.models.training.loop import train
from segpipe.models.training.optim import WarmupCosine, ema_update
from segpipe.models.training.validate import predict_image, validate

__all__ = [
    "EpochRecord",
    "TrainConfig",
    "TrainResult",
    "WarmupCosine",
    "ema_update",
    "predict_image",
    "train",
    "validate",
]
