"""Shared fixtures: paths to the real test rasters and small checkpoints built per test session."""

from __future__ import annotations

import os

# Quiet, offline-friendly defaults for Prefect and Ray; set before either is imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # as the CLI: busy machines

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real data for integration tests); tests using it skip on a clone without it."""
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} is not present (it sits beside the repo in CI)")
    return SHARED


CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """Build a small, seeded, untrained U-Net checkpoint for the given bands (safetensors + JSON)."""
    import torch

    from segpipe.models.checkpoint import ClassInfo, ModelMetadata, save_checkpoint
    from segpipe.models.metadata import InputContract
    from segpipe.models.registry import build_model

    def make(
        name: str,
        *,
        bands: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        classes: int = 3,
        architecture: str = "unet",
        base_channels: int = 4,
        depth: int = 2,
        tile_size: int = 64,
        halo: int = 16,
        seed: int = 0,
        contract: tuple[str, tuple[float, float], str] | None = None,
        **extra: object,
    ) -> Path:
        torch.manual_seed(seed)
        arguments = {
            "in_channels": len(bands),
            "num_classes": classes,
            "base_channels": base_channels,
            "depth": depth,
            **extra,
        }
        module = build_model(architecture, arguments).eval()
        palette = ["#E6194B", "#3CB44B", "#FFE119", "#4363D8", "#F58231", "#911EB4", "#46F0F0", "#F032E6"]
        metadata = ModelMetadata(
            architecture=architecture,
            arguments=arguments,
            classes=tuple(ClassInfo(f"class{i}", palette[i % len(palette)]) for i in range(classes)),
            bands=tuple(bands),
            mean=tuple(mean),
            std=tuple(std),
            tile_size=tile_size,
            halo=halo,
            size_multiple=int(getattr(module, "size_multiple", 2**depth)),
            input=InputContract(*contract) if contract else None,
            provenance={"trained": False, "note": "test fixture"},
        )
        directory = tmp_path_factory.mktemp("models")
        return save_checkpoint(module, metadata, directory / f"{name}.safetensors")

    return make


@pytest.fixture(scope="session")
def rgb_checkpoint(make_checkpoint: CheckpointFactory) -> Path:
    return make_checkpoint(
        "rgb", bands=("red", "green", "blue"), mean=(100.0, 100.0, 100.0), std=(50.0, 50.0, 50.0)
    )


@pytest.fixture(scope="session")
def slow_checkpoint(make_checkpoint: Callable[..., Path]) -> Path:
    """A wider (base 8) RGB U-Net: slow enough on a CPU that a fault test can catch inference half-way."""
    return make_checkpoint(
        "slow", bands=("red", "green", "blue"), mean=(100.0,) * 3, std=(50.0,) * 3, base_channels=8
    )
