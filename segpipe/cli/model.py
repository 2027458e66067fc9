"""``segpipe model init MODEL``: write segpipe's metadata for an ONNX or TorchScript model from elsewhere.

What the model says about itself (input channels, a fixed input size, output classes, the size multiple) is found
by :func:`segpipe.models.signature.inspect_model`; what it cannot say (class names and colours, band names,
normalisation, the input contract) comes from the options (:class:`~segpipe.models.sidecar.ModelInitOptions`), or,
on a terminal, from questions. The file is ``<stem>.segpipe.json`` beside the model (``--out`` to choose), so it
never collides with another tool's JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from segpipe.cli.options import parsed
from segpipe.cli.process import EXIT_OK
from segpipe.core.errors import ConfigError
from segpipe.core.location import Location
from segpipe.core.options import add_arguments
from segpipe.models.metadata import ModelMetadata, metadata_path
from segpipe.models.sidecar import ModelInitOptions, check_bands, check_model_file, external_metadata
from segpipe.models.signature import Signature, inspect_model


def add_model(sub: Any) -> None:
    p = sub.add_parser("model", help="models from elsewhere: write segpipe's metadata for an ONNX or TorchScript file")
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    init = actions.add_parser(
        "init",
        help="write MODEL's segpipe metadata (<stem>.segpipe.json) from its signature and these options",
        description=(
            "Inspect an ONNX or TorchScript segmentation model (input bands, fixed input size, classes, size "
            "multiple) and write segpipe's metadata beside it. Options give what the model cannot say; on a "
            "terminal, missing ones are asked for."
        ),
    )
    init.add_argument("model", help="the .onnx, .pt or .ts file")
    add_arguments(init, ModelInitOptions)
    init.set_defaults(handler=_cmd_init)


def _cmd_init(args: argparse.Namespace) -> int:
    options = parsed(args, ModelInitOptions)
    model = Path(args.model)
    check_model_file(model)
    out = Path(options.out) if options.out else metadata_path(model)
    if out.exists() and not options.force:
        raise ConfigError(f"{out} exists; pass --force to replace it")
    options = _ask(options, "bands", "input band names, in order (e.g. red,green,blue)")
    signature = inspect_model(model, in_channels=len(options.band_names()) or None)
    check_bands(options, signature)
    for name, question in _questions(signature):
        options = _ask(options, name, question)
    metadata = external_metadata(model, options, signature)
    Location(out).write_json(metadata.to_dict())
    print(_written(out, metadata))
    return EXIT_OK


def _questions(signature: Signature) -> list[tuple[str, str]]:
    """(option, question) for what the model cannot say, after its bands."""
    return [
        ("classes", f"{signature.classes} class names in output order"),
        ("mean", "per-band mean of the model's normalisation"),
        ("std", "per-band standard deviation of the model's normalisation"),
        ("input_dtype", "dtype of the imagery it was trained on (uint8, uint16, float32)"),
    ]


def _ask(options: ModelInitOptions, name: str, question: str) -> ModelInitOptions:
    """``options`` with the option ``name`` answered on the terminal, if it is not given and there is a terminal."""
    if getattr(options, name) is not None or not sys.stdin.isatty():
        return options
    answer = input(f"{question}: ").strip()
    changes: dict[str, Any] = {name: answer}
    return dataclasses.replace(options, **changes) if answer else options


def _written(out: Path, metadata: ModelMetadata) -> str:
    """The line that says what was written."""
    if metadata.input_size:
        tiling = f"fixed input {metadata.input_size} px (tile {metadata.tile_size} + halo {metadata.halo})"
    else:
        tiling = f"sizes in multiples of {metadata.size_multiple}"
    trained = f", trained at {metadata.resolution}" if metadata.resolution is not None else ""
    return (
        f"wrote {out}: {metadata.architecture}, {len(metadata.bands)} band(s) {', '.join(metadata.bands)}, "
        f"{len(metadata.classes)} classes, {tiling}{trained}"
    )
