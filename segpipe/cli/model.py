"""``segpipe model init MODEL``: write segpipe's metadata for an ONNX or TorchScript model from elsewhere.

What the model says about itself (input channels, a fixed input size, output classes, the size multiple) is found
by :func:`segpipe.models.signature.inspect_model`; what it cannot say (class names and colours, band names,
normalisation, the input contract) comes from the options, or, on a terminal, from questions. The file is
``<stem>.segpipe.json`` beside the model (``--out`` to choose), so it never collides with another tool's JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from segpipe.cli import EXIT_OK
from segpipe.core.errors import ConfigError
from segpipe.core.files import write_json_atomically

#: Colours for classes given without one (tab10).
PALETTE = ("#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F", "#BCBD22")


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
    init.add_argument("--classes", help="class names in output order, each optionally :#RRGGBB (water:#1F77B4,land)")
    init.add_argument("--bands", help="input band names in input order, STAC common names where they have one")
    init.add_argument("--mean", help="per band, in the model's input units (x_norm = (x - mean) / std)")
    init.add_argument("--std", help="per band, > 0")
    init.add_argument("--input-dtype", help="dtype of the imagery the model was trained on, e.g. uint8 or uint16")
    init.add_argument("--input-range", help="LOW,HIGH of the values mean and std refer to (default: the dtype's)")
    init.add_argument(
        "--scaling",
        default=None,
        help="for scenes of another dtype: refuse (default), or percentile[:LOW,HIGH], minmax:MIN,MAX, "
        "linear:SCALE,OFFSET, product",
    )
    init.add_argument("--tile-size", type=int, help="recommended tile core in pixels (default: from the input size)")
    init.add_argument("--halo", type=int, help="recommended halo in pixels (default: 1/8 of a fixed input, else 32)")
    init.add_argument("--size-multiple", type=int, help="override the probed size multiple")
    init.add_argument(
        "--resolution",
        metavar="SIZE",
        help="the pixel size the model was trained at, e.g. 0.5um (slides are read at it) or 0.3m (imagery: "
        "recorded); default: none stated",
    )
    init.add_argument("--out", help="where to write (default: <stem>.segpipe.json beside MODEL)")
    init.add_argument("--force", action="store_true", help="replace an existing metadata file")
    init.set_defaults(handler=_cmd_init)


def _ask(args: argparse.Namespace, name: str, question: str, missing: list[str]) -> str | None:
    value = getattr(args, name)
    if value is not None:
        return str(value)
    if sys.stdin.isatty():
        answer = input(f"{question}: ").strip()
        if answer:
            return answer
    missing.append("--" + name.replace("_", "-"))
    return None


def _numbers(text: str, what: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{what} must be {count} comma-separated numbers, got {text!r}") from None
    if len(values) == 1 and count > 1:
        values = values * count
    if len(values) != count:
        raise ConfigError(f"{what} must have one value per band ({count}), got {len(values)}")
    return values


def _classes(text: str, count: int) -> tuple[tuple[str, str], ...]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if len(items) != count:
        raise ConfigError(f"the model has {count} output classes but --classes names {len(items)}: {text!r}")
    out = []
    for k, item in enumerate(items):
        name, _, colour = item.partition(":")
        out.append((name.strip(), colour.strip() or PALETTE[k % len(PALETTE)]))
    return tuple(out)


def _cmd_init(args: argparse.Namespace) -> int:
    import numpy as np

    from segpipe.core.bands import parse_bands
    from segpipe.core.pixels import Scaling
    from segpipe.core.pyramid import parse_resolution
    from segpipe.models.metadata import (
        ClassInfo,
        InputContract,
        ModelMetadata,
        metadata_path,
    )
    from segpipe.models.signature import inspect_model

    model = Path(args.model)
    if not model.is_file():
        raise ConfigError(f"model file {model} does not exist; check the path")
    if model.suffix.lower() not in (".onnx", ".pt", ".ts"):
        raise ConfigError(
            f"model init is for ONNX (.onnx) and TorchScript (.pt, .ts) files, got {model.name}; segpipe's own "
            "checkpoints (.safetensors) get their metadata from segpipe train"
        )
    out = Path(args.out) if args.out else metadata_path(model)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to replace it")
    missing: list[str] = []
    bands_text = _ask(args, "bands", "input band names, in order (e.g. red,green,blue)", missing)
    bands = parse_bands(bands_text) if bands_text else ()
    if bands and isinstance(bands[0], int):
        raise ConfigError("--bands must name the model's bands (red,green,blue), not give numbers")
    signature = inspect_model(model, in_channels=len(bands) or None)
    if bands and len(bands) != signature.in_channels:
        raise ConfigError(f"the model takes {signature.in_channels} bands but --bands names {len(bands)}")
    classes_text = _ask(args, "classes", f"{signature.classes} class names in output order", missing)
    mean_text = _ask(args, "mean", "per-band mean of the model's normalisation", missing)
    std_text = _ask(args, "std", "per-band standard deviation of the model's normalisation", missing)
    dtype = _ask(args, "input_dtype", "dtype of the imagery it was trained on (uint8, uint16, float32)", missing)
    if missing:
        raise ConfigError(
            f"{model.name}: the model takes {signature.in_channels} band(s) and gives {signature.classes} classes"
            f"{f', input {signature.input_size} px' if signature.input_size else ''}; say what it cannot: "
            f"{' '.join(m + ' ...' for m in missing)}"
        )
    assert bands_text and classes_text and mean_text and std_text and dtype
    count = len(bands)
    try:
        kind = np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"--input-dtype {dtype!r} is not a numpy dtype name such as uint8") from None
    if args.input_range:
        low, high = _numbers(args.input_range, "--input-range", 2)
    elif np.issubdtype(kind, np.integer):
        low, high = float(np.iinfo(kind).min), float(np.iinfo(kind).max)
    else:
        raise ConfigError(f"--input-range LOW,HIGH is needed for {kind.name} imagery")
    scaling = args.scaling or "refuse"
    Scaling.parse(scaling)
    resolution = parse_resolution(args.resolution) if args.resolution else None
    if args.resolution and resolution is None:
        raise ConfigError("--resolution native is for a run; give the pixel size the model was trained at, e.g. 0.5um")
    input_size = signature.input_size
    halo = args.halo if args.halo is not None else (input_size // 8 if input_size else 32)
    tile = args.tile_size or (input_size - 2 * halo if input_size else 512 - 2 * halo)
    multiple = args.size_multiple or signature.size_multiple
    if not input_size:  # the recommended tile and halo must fit the size multiple
        halo = -(-halo // multiple) * multiple
        tile = max(multiple, tile // multiple * multiple)
    metadata = ModelMetadata(
        architecture=signature.architecture,
        arguments={},
        classes=tuple(ClassInfo(n, c) for n, c in _classes(classes_text, signature.classes)),
        bands=tuple(str(b) for b in bands),
        mean=_numbers(mean_text, "--mean", count),
        std=_numbers(std_text, "--std", count),
        tile_size=tile,
        halo=halo,
        size_multiple=multiple,
        input_size=input_size,
        input=InputContract(kind.name, (low, high), scaling),
        provenance={"source": model.name, "written_by": "segpipe model init"},
        resolution=resolution,
    )
    write_json_atomically(out, metadata.to_dict())
    print(
        f"wrote {out}: {signature.architecture}, {count} band(s) {', '.join(metadata.bands)}, "
        f"{signature.classes} classes, "
        + (
            f"fixed input {input_size} px (tile {tile} + halo {halo})"
            if input_size
            else f"sizes in multiples of {multiple}"
        )
        + (f", trained at {resolution}" if resolution is not None else "")
    )
    return EXIT_OK
