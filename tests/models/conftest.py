"""Shared fixtures for the model tests: deterministic seeds, tiny metadata, trained-looking weights."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import torch
from torch import nn

from segpipe.models.checkpoint import ClassInfo, ModelMetadata

TINY_ARGUMENTS: dict[str, Any] = {
    "in_channels": 3,
    "num_classes": 4,
    "base_channels": 4,
    "depth": 2,
    "heads": 2,
    "window": 2,
}


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors gain nothing from threads, and lose much on a busy machine
    yield
    torch.set_num_threads(threads)


def make_metadata(**overrides: Any) -> ModelMetadata:
    """Valid metadata for a tiny attention U-Net (3 bands, 4 classes); ``overrides`` replace fields."""
    fields: dict[str, Any] = {
        "architecture": "attention_unet",
        "arguments": dict(TINY_ARGUMENTS),
        "classes": tuple(ClassInfo(f"class{i}", f"#{i:02X}{i:02X}{i:02X}") for i in range(4)),
        "bands": ("red", "green", "blue"),
        "mean": (120.0, 110.0, 100.0),
        "std": (50.0, 51.0, 52.0),
        "tile_size": 24,
        "halo": 4,
        "size_multiple": 4,
        "provenance": {"trained": False, "note": "test"},
    }
    fields.update(overrides)
    return ModelMetadata(**fields)


M = TypeVar("M", bound=nn.Module)


def randomise(model: M) -> M:
    """Give weights, BatchNorm statistics and attention gammas values like training would; eval mode.

    Convolutions get He initialisation so signals keep their scale through the network (PyTorch's default
    shrinks them layer by layer, which would make every output nearly constant and tests insensitive).
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            gamma = getattr(module, "gamma", None)
            if isinstance(gamma, nn.Parameter):
                gamma.fill_(0.7)
    return model.eval()


@pytest.fixture
def metadata_factory() -> Callable[..., ModelMetadata]:
    return make_metadata


class Evil:
    """Unpickling this creates ``marker`` (stands in for arbitrary code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))
