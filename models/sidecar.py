"""The metadata of a model from elsewhere (ONNX or TorchScript), as ``segpipe model init`` writes it: what the model
says about itself (:func:`segpipe.models.signature.inspect_model`: input channels, a fixed input size, classes, the
size multiple) and what the user says (:class:`ModelInitOptions`: class names and colours, band names,
normalisation, the input contract). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segpipe.core.bands import parse_bands
from segpipe.core.errors import ConfigError
from segpipe.core.options import option
from segpipe.core.pixels import Scaling
from segpipe.core.pyramid import Resolution, parse_resolution
from segpipe.models.metadata import ClassInfo, InputContract, ModelMetadata
from segpipe.models.signature import Signature

#: Colours for classes given without one (tab10).
PALETTE = ("#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F", "#BCBD22")
#: Suffixes of the model files ``model init`` describes: ONNX, and TorchScript archives.
MODEL_SUFFIXES = (".onnx", ".pt", ".ts")
#: The options a model cannot state about itself, in the order they are asked for.
USER_STATED = ("bands", "classes", "mean", "std", "input_dtype")


@dataclass(frozen=True, kw_only=True)
class ModelInitOptions:
    """What ``segpipe model init`` takes besides the model file: what the model cannot say about itself, the
    recommended tiling (pixels), and where the metadata goes. Checked on construction, as far as that needs no
    model (``ConfigError`` naming the flag)."""

    classes: str | None = option(
        None, help="class names in output order, each optionally :#RRGGBB (water:#1F77B4,land)"
    )
    bands: str | None = option(None, help="input band names in input order, STAC common names where they have one")
    mean: str | None = option(None, help="per band, in the model's input units (x_norm = (x - mean) / std)")
    std: str | None = option(None, help="per band, > 0")
    input_dtype: str | None = option(None, help="dtype of the imagery the model was trained on, e.g. uint8 or uint16")
    input_range: str | None = option(None, help="LOW,HIGH of the values mean and std refer to (default: the dtype's)")
    scaling: str | None = option(
        None,
        help="for scenes of another dtype: refuse (default), or percentile[:LOW,HIGH], minmax:MIN,MAX, "
        "linear:SCALE,OFFSET, product",
    )
    tile_size: int | None = option(None, help="recommended tile core in pixels (default: from the input size)")
    halo: int | None = option(None, help="recommended halo in pixels (default: 1/8 of a fixed input, else 32)")
    size_multiple: int | None = option(None, help="override the probed size multiple")
    resolution: str | None = option(
        None,
        help="the pixel size the model was trained at, e.g. 0.5um (slides are read at it) or 0.3m (imagery: "
        "recorded); default: none stated",
        metavar="SIZE",
    )
    out: str | None = option(None, help="where to write (default: <stem>.segpipe.json beside MODEL)")
    force: bool = option(False, help="replace an existing metadata file")

    def __post_init__(self) -> None:
        for name in ("tile_size", "halo", "size_multiple"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a number of pixels >= 0, got {value}")
        count = len(self.band_names()) or None
        for name in ("mean", "std"):
            text = getattr(self, name)
            if text is not None:
                _numbers(text, f"--{name}", count)
        if self.input_dtype is not None:
            self.value_range()
        Scaling.parse(self.scaling or "refuse")
        self.trained_at()

    def band_names(self) -> tuple[str, ...]:
        """The names of ``--bands`` (empty when not given).

        Raises:
            ConfigError: band numbers instead of names, or a list :func:`~segpipe.core.bands.parse_bands` refuses.
        """
        bands = parse_bands(self.bands) if self.bands else ()
        if bands and isinstance(bands[0], int):
            raise ConfigError("--bands must name the model's bands (red,green,blue), not give numbers")
        return tuple(str(b) for b in bands)

    def dtype(self) -> np.dtype:
        """The numpy dtype of ``--input-dtype`` (given).

        Raises:
            ConfigError: not a numpy dtype name.
        """
        try:
            return np.dtype(self.input_dtype)
        except TypeError:
            raise ConfigError(f"--input-dtype {self.input_dtype!r} is not a numpy dtype name such as uint8") from None

    def value_range(self) -> tuple[float, float]:
        """(low, high) of the values mean and std refer to: ``--input-range``, else the full range of an integer
        ``--input-dtype``.

        Raises:
            ConfigError: a range that is not two numbers, or none for imagery of floats.
        """
        kind = self.dtype()
        if self.input_range:
            low, high = _numbers(self.input_range, "--input-range", 2)
            return low, high
        if np.issubdtype(kind, np.integer):
            return float(np.iinfo(kind).min), float(np.iinfo(kind).max)
        raise ConfigError(f"--input-range LOW,HIGH is needed for {kind.name} imagery")

    def trained_at(self) -> Resolution | None:
        """The pixel size of ``--resolution`` (None when not given).

        Raises:
            ConfigError: not a pixel size with its unit (``native`` is for a run).
        """
        resolution = parse_resolution(self.resolution) if self.resolution else None
        if self.resolution and resolution is None:
            raise ConfigError(
                "--resolution native is for a run; give the pixel size the model was trained at, e.g. 0.5um"
            )
        return resolution

    def missing(self) -> list[str]:
        """The flags of what the model cannot say and the options do not (or leave empty), in the order they are
        asked for."""
        return ["--" + name.replace("_", "-") for name in USER_STATED if not getattr(self, name)]


def check_model_file(model: Path) -> None:
    """Raise ConfigError unless ``model`` is an ONNX or TorchScript file that exists."""
    if not model.is_file():
        raise ConfigError(f"model file {model} does not exist; check the path")
    if model.suffix.lower() not in MODEL_SUFFIXES:
        raise ConfigError(
            f"model init is for ONNX (.onnx) and TorchScript (.pt, .ts) files, got {model.name}; segpipe's own "
            "checkpoints (.safetensors) get their metadata from segpipe train"
        )


def check_bands(options: ModelInitOptions, signature: Signature) -> None:
    """Raise ConfigError when ``--bands`` names another number of bands than the model takes."""
    bands = options.band_names()
    if bands and len(bands) != signature.in_channels:
        raise ConfigError(f"the model takes {signature.in_channels} bands but --bands names {len(bands)}")


def external_metadata(model: Path, options: ModelInitOptions, signature: Signature) -> ModelMetadata:
    """The metadata of the ``model`` file from its ``signature`` and the ``options``.

    Raises:
        ConfigError: something the model cannot say is missing (all of it named in one line), or the options
            contradict the model (number of classes, of values per band).
        ModelError: the metadata is not valid as a whole (:class:`~segpipe.models.metadata.ModelMetadata`).
    """
    missing = options.missing()
    if missing:
        raise ConfigError(
            f"{model.name}: the model takes {signature.in_channels} band(s) and gives {signature.classes} classes"
            f"{f', input {signature.input_size} px' if signature.input_size else ''}; say what it cannot: "
            f"{' '.join(m + ' ...' for m in missing)}"
        )
    assert options.classes and options.mean and options.std
    bands = options.band_names()
    low, high = options.value_range()
    resolution = options.trained_at()
    tile, halo, multiple = recommended_tiling(options, signature)
    return ModelMetadata(
        architecture=signature.architecture,
        arguments={},
        classes=tuple(ClassInfo(n, c) for n, c in _classes(options.classes, signature.classes)),
        bands=bands,
        mean=_numbers(options.mean, "--mean", len(bands)),
        std=_numbers(options.std, "--std", len(bands)),
        tile_size=tile,
        halo=halo,
        size_multiple=multiple,
        input_size=signature.input_size,
        input=InputContract(options.dtype().name, (low, high), options.scaling or "refuse"),
        provenance={"source": model.name, "written_by": "segpipe model init"},
        resolution=resolution,
    )


def recommended_tiling(options: ModelInitOptions, signature: Signature) -> tuple[int, int, int]:
    """(tile core, halo, size multiple) in pixels: the options', else a fixed input's (halo 1/8 of it, the core the
    rest), else a 512 px input with a 32 px halo, each rounded to the size multiple."""
    input_size = signature.input_size
    halo = options.halo if options.halo is not None else (input_size // 8 if input_size else 32)
    tile = options.tile_size or (input_size - 2 * halo if input_size else 512 - 2 * halo)
    multiple = options.size_multiple or signature.size_multiple
    if not input_size:  # the recommended tile and halo must fit the size multiple
        halo = -(-halo // multiple) * multiple
        tile = max(multiple, tile // multiple * multiple)
    return tile, halo, multiple


def _numbers(text: str, what: str, count: int | None) -> tuple[float, ...]:
    """Comma-separated numbers, one per band (one value is repeated for every band); ``count`` None: any number."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        wanted = f"{count} comma-separated numbers" if count is not None else "comma-separated numbers"
        raise ConfigError(f"{what} must be {wanted}, got {text!r}") from None
    if count is None:
        return values
    if len(values) == 1 and count > 1:
        values = values * count
    if len(values) != count:
        raise ConfigError(f"{what} must have one value per band ({count}), got {len(values)}")
    return values


def _classes(text: str, count: int) -> tuple[tuple[str, str], ...]:
    """``water:#1F77B4,land`` -> (name, colour) per class, a :data:`PALETTE` colour where none is given."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if len(items) != count:
        raise ConfigError(f"the model has {count} output classes but --classes names {len(items)}: {text!r}")
    out = []
    for k, item in enumerate(items):
        name, _, colour = item.partition(":")
        out.append((name.strip(), colour.strip() or PALETTE[k % len(PALETTE)]))
    return tuple(out)
