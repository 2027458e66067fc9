"""Write the packaged default model: ``python -m segpipe.models.make_default [--output PATH]``.

Fixed-seed, untrained attention U-Net weights (CBAM + local attention + gates, base 16, depth 4) for the six
classes of the Dubai aerial dataset, so the pipeline runs end to end before a trained model exists. Its masks
are meaningless; :mod:`segpipe.models.training` replaces the weights. Re-running gives bit-identical files on the same
torch version.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from segpipe.models.checkpoint import ClassInfo, ModelMetadata, default_model_path, save_checkpoint
from segpipe.models.dubai import DUBAI_CLASSES
from segpipe.models.metadata import input_contract
from segpipe.models.registry import build_model

ARGUMENTS = {
    "in_channels": 3,
    "num_classes": len(DUBAI_CLASSES),
    "base_channels": 16,
    "depth": 4,
    "channel_attention": "cbam",
    "self_attention": "local",
    "attention_gates": True,
    "heads": 4,
    "window": 8,
}


def default_metadata() -> ModelMetadata:
    """Metadata of the packaged default model (RGB in 0-255 units, ImageNet statistics)."""
    return ModelMetadata(
        architecture="attention_unet",
        arguments=ARGUMENTS,
        classes=tuple(ClassInfo(name, colour) for name, colour in DUBAI_CLASSES),
        bands=("red", "green", "blue"),
        mean=(123.7, 116.3, 103.5),
        std=(58.4, 57.1, 57.4),
        tile_size=512,
        halo=64,
        size_multiple=16,
        input=input_contract("uint8"),
        provenance={
            "trained": False,
            "note": "fixed-seed untrained weights; masks are meaningless until the trained model lands",
            "seed": 0,
            "torch": torch.__version__.split("+")[0],
        },
    )


def make_default(output: Path | None = None) -> Path:
    """Build the seed-0 model and save it with its metadata; returns the .safetensors path."""
    torch.manual_seed(0)
    metadata = default_metadata()
    model = build_model(metadata.architecture, metadata.arguments).eval()
    return save_checkpoint(model, metadata, output or default_model_path())


def run_maker(make: Callable[[Path | None], Path], doc: str | None, argv: list[str] | None) -> None:
    """The command line of a packaged-model maker (``make``, described by ``doc``): ``--output`` (default: the
    packaged path); prints where the model went."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--output", type=Path, default=None, help="where to write (default: packaged path)")
    args = parser.parse_args(argv)
    print(make(args.output))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    run_maker(make_default, __doc__, argv)


if __name__ == "__main__":
    main()
