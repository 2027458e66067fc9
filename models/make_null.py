"""Write the packaged null model: ``python -m segpipe.models.make_null [--output PATH]``.

A 1x1 convolution (:class:`segpipe.models.registry.Pointwise`) with the shipped model's bands, classes,
normalisation, input contract, tile size and halo, so that ``segpipe run --model null`` tiles, reads, normalises,
merges and writes exactly as a run with the shipped model does, for almost no compute: the pipeline's own cost
per tile (benchmarks/bench_pipeline.py, benchmarks/gpu_check.py). Its masks mean nothing. Fixed seed: re-running
gives bit-identical files on the same torch version.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from segpipe.models.checkpoint import WEIGHTS_DIR, default_model_path, save_checkpoint
from segpipe.models.make_default import run_maker
from segpipe.models.metadata import ModelMetadata, read_metadata
from segpipe.models.registry import build_model


def null_model_path() -> Path:
    """The packaged null model's weights: ``models/weights/null.safetensors``."""
    return WEIGHTS_DIR / "null.safetensors"


def null_metadata(shipped: ModelMetadata) -> ModelMetadata:
    """The shipped model's metadata with the pointwise architecture (same bands, classes, tiles, contract)."""
    return dataclasses.replace(
        shipped,
        architecture="pointwise",
        arguments={"in_channels": len(shipped.bands), "num_classes": len(shipped.classes)},
        size_multiple=1,
        input_size=None,
        provenance={
            "trained": False,
            "note": "null model for benchmarks: a fixed-seed 1x1 convolution; its masks mean nothing",
            "seed": 0,
            "torch": torch.__version__.split("+")[0],
        },
    )


def make_null(output: Path | None = None) -> Path:
    """Build the seed-0 pointwise model with the shipped model's metadata; returns the .safetensors path."""
    torch.manual_seed(0)
    metadata = null_metadata(read_metadata(default_model_path().with_suffix(".json")))
    model = build_model(metadata.architecture, metadata.arguments).eval()
    return save_checkpoint(model, metadata, output or null_model_path())


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    run_maker(make_null, __doc__, argv)


if __name__ == "__main__":
    main()
