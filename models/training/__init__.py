"""Training: the configuration (``config``), what a run trains on (``inputs``, ``data``), the network and what
optimises it (``model``, ``optim``), the steps (``step``), validation (``validate``), what is recorded and kept
(``record``), resuming (``resume``, ``state``), and the loop that runs them in order (``loop``).

``from segpipe.models.training import TrainConfig, train``; the shipped model's recipe is
:mod:`segpipe.models.train_default`. The names are imported on first use, so that reading a configuration (the
``segpipe`` command builds its flags from :class:`TrainConfig`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segpipe.models.training.config import EpochRecord, TrainConfig, TrainResult
    from segpipe.models.training.loop import train
    from segpipe.models.training.optim import WarmupCosine, ema_update
    from segpipe.models.training.validate import predict_image, validate

_WHERE = {
    "EpochRecord": "config",
    "TrainConfig": "config",
    "TrainResult": "config",
    "train": "loop",
    "WarmupCosine": "optim",
    "ema_update": "optim",
    "predict_image": "validate",
    "validate": "validate",
}

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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
