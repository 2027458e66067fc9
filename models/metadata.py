"""Checkpoint metadata (the JSON sidecar): what a model expects and produces. No torch import here.

A sidecar looks like::

    {"architecture": "attention_unet", "arguments": {"in_channels": 3, "num_classes": 6, ...},
     "classes": [{"name": "building", "colour": "#3C1098"}, ...],
     "bands": ["red", "green", "blue"], "mean": [123.7, 116.3, 103.5], "std": [58.4, 57.1, 57.4],
     "tile_size": 512, "halo": 64, "size_multiple": 16, "input_size": null,
     "input": {"dtype": "uint8", "range": [0, 255], "scaling": "percentile:2,98"},
     "resolution": {"value": 0.5, "unit": "um"},
     "provenance": {"trained": true, "data": "...", "epochs": 40, "metrics": {...}}}

``input`` is the model's input contract (:class:`InputContract`): the values ``mean`` and ``std`` refer to, and how
a scene whose values do not fit is brought to them. ``bands`` are STAC common names where the bands have one
(``red``, ``green``, ``blue``, ``nir``, ``swir16`` ...), so that scenes can be matched by name
(:mod:`segpipe.core.bands`). ``resolution`` is the pixel size the model was trained at (``um``: micrometres per pixel,
for slides; ``m``: metres, for imagery); a slide is read at it (:mod:`segpipe.core.pyramid`), optional.

Every field is validated on construction; errors are :class:`ModelError` naming the file, the field, what was
expected and what was found.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.core.colours import parse_colour
from segpipe.core.errors import ModelError, SegpipeError
from segpipe.core.location import Location
from segpipe.core.pixels import Scaling
from segpipe.core.pyramid import Resolution

#: ``architecture`` values for models that are not built from the registry.
EXTERNAL_ARCHITECTURES = ("onnx", "torchscript")

_COLOUR = re.compile(r"^#[0-9A-Fa-f]{6}$")


class _FieldError(ModelError):
    """A field is invalid; ``detail`` says which and why, without saying where the values came from."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"model metadata: {detail}; fix the values passed to ModelMetadata")
        self.detail = detail


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _FieldError(f"'{name}' must be a non-empty string, got {_describe(value)}")
    return value


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise _FieldError(f"'{name}' must be {kind}, got {_describe(value)}")
    return value


def _sequence(name: str, value: Any) -> Sequence[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise _FieldError(f"'{name}' must be a non-empty list, got {_describe(value)}")
    return value


def _numbers(name: str, value: Any, *, positive: bool) -> tuple[float, ...]:
    result = []
    for i, item in enumerate(_sequence(name, value)):
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise _FieldError(f"'{name}[{i}]' must be a finite number, got {_describe(item)}")
        if positive and item <= 0:
            raise _FieldError(f"'{name}[{i}]' must be greater than 0, got {item!r}")
        result.append(float(item))
    return tuple(result)


def _json_object(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise _FieldError(f"'{name}' must be an object with string keys, got {_describe(value)}")
    try:
        copied: dict[str, Any] = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise _FieldError(f"'{name}' must hold only JSON values (finite numbers), but {error}") from None
    return copied


def _colour_problem(colour: Any) -> str | None:
    if not isinstance(colour, str) or not _COLOUR.match(colour):
        return f"a colour '#RRGGBB' (hex), got {_describe(colour)}"
    return None


@dataclass(frozen=True)
class ClassInfo:
    """One output class: its name and display colour ("#RRGGBB", stored upper-case)."""

    name: str
    colour: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ModelError(f"ClassInfo: 'name' must be a non-empty string, got {_describe(self.name)}")
        problem = _colour_problem(self.colour)
        if problem:
            raise ModelError(f"ClassInfo {self.name!r}: 'colour' must be {problem}")
        object.__setattr__(self, "colour", self.colour.upper())

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The colour as (red, green, blue) in 0..255."""
        return parse_colour(self.colour)


def _classes(value: Any) -> tuple[ClassInfo, ...]:
    result: list[ClassInfo] = []
    for i, item in enumerate(_sequence("classes", value)):
        if isinstance(item, ClassInfo):
            result.append(item)
            continue
        if not isinstance(item, Mapping) or set(item) != {"name", "colour"}:
            raise _FieldError(
                f"'classes[{i}]' must be an object with exactly the keys 'name' and 'colour', got {_describe(item)}"
            )
        name, colour = item["name"], item["colour"]
        if not isinstance(name, str) or not name.strip():
            raise _FieldError(f"'classes[{i}].name' must be a non-empty string, got {_describe(name)}")
        problem = _colour_problem(colour)
        if problem:
            raise _FieldError(f"'classes[{i}].colour' must be {problem}")
        result.append(ClassInfo(name, colour))
    names = [info.name for info in result]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _FieldError(f"'classes' must have unique names, got duplicates {duplicates}")
    return tuple(result)


def _bands(value: Any) -> tuple[str, ...]:
    bands = tuple(_text(f"bands[{i}]", item) for i, item in enumerate(_sequence("bands", value)))
    duplicates = sorted({b for b in bands if bands.count(b) > 1})
    if duplicates:
        raise _FieldError(f"'bands' must have unique names, got duplicates {duplicates}")
    return bands


@dataclass(frozen=True)
class InputContract:
    """What values a model takes, and how a scene's values are brought to them.

    Attributes:
        dtype: The numpy dtype of the imagery the model was trained on (``uint8`` for 8-bit aerial RGB).
        range: (low, high): the values ``mean`` and ``std`` refer to, in the model's input units.
        scaling: For a scene whose dtype does not fit (see :func:`segpipe.core.pixels.fits`): ``refuse`` (one
            clear error naming the options that fix it) or a :class:`~segpipe.core.pixels.Scaling` such as
            ``percentile:2,98``. ``--scaling`` overrides it for a run.
    """

    dtype: str
    range: tuple[float, float]
    scaling: str = "refuse"

    def __post_init__(self) -> None:
        try:
            np.dtype(self.dtype)
        except TypeError:
            raise _FieldError(
                f"'input.dtype' must be a numpy dtype name such as uint8, got {_describe(self.dtype)}"
            ) from None
        values = _numbers("input.range", self.range, positive=False)
        if len(values) != 2 or not values[0] < values[1]:
            raise _FieldError(f"'input.range' must be [low, high] with low < high, got {_describe(self.range)}")
        low, high = values
        object.__setattr__(self, "range", (low, high))
        try:
            Scaling.parse(self.scaling)
        except Exception as error:
            raise _FieldError(f"'input.scaling': {error}") from None

    @classmethod
    def from_value(cls, value: Any) -> InputContract:
        if isinstance(value, InputContract):
            return value
        if not isinstance(value, Mapping) or not {"dtype", "range"} <= set(value) <= {"dtype", "range", "scaling"}:
            raise _FieldError(
                "'input' must be an object with 'dtype', 'range' and optionally 'scaling', e.g. "
                f'{{"dtype": "uint8", "range": [0, 255], "scaling": "percentile:2,98"}}, got {_describe(value)}'
            )
        return cls(str(value["dtype"]), tuple(value["range"]), str(value.get("scaling", "refuse")))

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "range": list(self.range), "scaling": self.scaling}


def input_contract(dtype: Any) -> InputContract:
    """The contract of a model trained on imagery of ``dtype``: integer imagery's full range (uint8: 0..255); a
    scene of another dtype is stretched per band (2-98 % percentiles) onto that range for 8-bit models, whose
    training imagery was itself display-stretched, and refused for others (their scaling must be stated)."""
    kind = np.dtype(dtype)
    if np.issubdtype(kind, np.integer):
        info = np.iinfo(kind)
        scaling = "percentile:2,98" if kind == np.uint8 else "refuse"
        return InputContract(kind.name, (float(info.min), float(info.max)), scaling)
    return InputContract(kind.name, (0.0, 1.0), "refuse")


@dataclass(frozen=True)
class ModelMetadata:
    """What a checkpoint's network expects and produces; the content of its JSON sidecar.

    Attributes:
        architecture: A registry name (see ``segpipe.models.registry.ARCHITECTURES``), or "onnx" / "torchscript".
        arguments: Keyword arguments for ``build_model`` (JSON values).
        classes: Output channel i is ``classes[i]``.
        bands: Input band names, in input-channel order.
        mean: Per band, in raw pixel units: ``x_norm = (x - mean) / std``.
        std: Per band, > 0.
        tile_size: Recommended tile core side, in pixels.
        halo: Recommended halo, in pixels (at least the effective receptive field).
        size_multiple: Model input height and width must be multiples of this.
        input_size: Fixed square input side in pixels (ONNX models exported with a fixed shape), or None.
        input: The input contract (values, range and scaling), or None for a model that states none (its scenes'
            values are used as they are).
        provenance: Free-form record of how the weights were made (data, epochs, seed, metrics, ...).
        resolution: The pixel size the model was trained at, or None when it states none.
    """

    architecture: str
    arguments: Mapping[str, Any]
    classes: tuple[ClassInfo, ...]
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tile_size: int
    halo: int
    size_multiple: int = 1
    input_size: int | None = None
    input: InputContract | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    resolution: Resolution | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "architecture", _text("architecture", self.architecture))
        put(self, "arguments", _json_object("arguments", self.arguments))
        put(self, "classes", _classes(self.classes))
        put(self, "bands", _bands(self.bands))
        put(self, "mean", _numbers("mean", self.mean, positive=False))
        put(self, "std", _numbers("std", self.std, positive=True))
        for name in ("mean", "std"):
            if len(getattr(self, name)) != len(self.bands):
                raise _FieldError(
                    f"'{name}' must have one value per band ({len(self.bands)} bands: {list(self.bands)}), "
                    f"got {len(getattr(self, name))} values"
                )
        _integer("tile_size", self.tile_size, 1)
        _integer("halo", self.halo, 0)
        _integer("size_multiple", self.size_multiple, 1)
        if self.input_size is not None:
            _integer("input_size", self.input_size, 1)
        if self.input is not None:
            put(self, "input", InputContract.from_value(self.input))
        put(self, "provenance", _json_object("provenance", self.provenance))
        if self.resolution is not None:
            try:
                put(self, "resolution", Resolution.from_value(self.resolution))
            except ValueError as error:
                raise _FieldError(f"'resolution': {error}") from None
        problem = self._tile_problem(self.tile_size, self.halo)
        if problem:
            raise _FieldError(problem)

    def _tile_problem(self, tile_size: int, halo: int) -> str | None:
        side = tile_size + 2 * halo
        if self.input_size is None and side % self.size_multiple:
            return (
                f"tile_size + 2 * halo ({tile_size} + 2 * {halo} = {side}) must be a multiple of "
                f"'size_multiple' ({self.size_multiple})"
            )
        if self.input_size is not None and side != self.input_size:
            return (
                f"tile_size + 2 * halo ({tile_size} + 2 * {halo} = {side}) must equal 'input_size' "
                f"({self.input_size}), the only input size this model accepts"
            )
        return None

    def check_tile_geometry(self, tile_size: int, halo: int) -> None:
        """Raise ModelError unless tiles of this core and halo fit the model's input constraints.

        The model sees tiles of side ``tile_size + 2 * halo`` pixels: that must be a multiple of
        ``size_multiple``, and equal ``input_size`` when the model has a fixed input size.
        """
        problem = self._tile_problem(tile_size, halo)
        if problem:
            raise ModelError(f"{problem}; choose a tile size and halo that satisfy it")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str) -> ModelMetadata:
        """Validate and build metadata from parsed JSON.

        Args:
            data: The parsed sidecar.
            source: Where it came from (a path), named in error messages.

        Raises:
            ModelError: Naming ``source``, the field, what was expected and what was found.
        """
        if not isinstance(data, Mapping):
            raise ModelError(f"model metadata {source}: expected a JSON object, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed), key=str)
        if unknown:
            raise ModelError(
                f"model metadata {source}: unknown field(s) {unknown}; allowed fields: {', '.join(allowed)}"
            )
        if data.get("architecture") in EXTERNAL_ARCHITECTURES:
            data = {"arguments": {}, **data}  # an ONNX or TorchScript model is not built from arguments
        optional = ("size_multiple", "input_size", "input", "provenance", "resolution")
        required = [f.name for f in fields(cls) if f.name not in optional]
        missing = [name for name in required if name not in data]
        if missing:
            raise ModelError(f"model metadata {source}: missing field(s) {missing}; add them to the JSON sidecar")
        try:
            return cls(**data)
        except _FieldError as error:
            raise ModelError(f"model metadata {source}: {error.detail}; fix the JSON sidecar") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``ModelMetadata.from_dict(m.to_dict(), source=...) == m``."""
        return {
            "architecture": self.architecture,
            "arguments": dict(self.arguments),
            "classes": [{"name": c.name, "colour": c.colour} for c in self.classes],
            "bands": list(self.bands),
            "mean": list(self.mean),
            "std": list(self.std),
            "tile_size": self.tile_size,
            "halo": self.halo,
            "size_multiple": self.size_multiple,
            "input_size": self.input_size,
            **({"input": self.input.to_dict()} if self.input is not None else {}),
            "provenance": dict(self.provenance),
            **({"resolution": self.resolution.to_dict()} if self.resolution is not None else {}),
        }


#: The name of segpipe's metadata beside a model file ``x.onnx``: ``x.segpipe.json``, which no other tool writes.
METADATA_SUFFIX = ".segpipe.json"


def metadata_path(model: str | Path) -> Path:
    """Where segpipe writes the metadata of ``model``: ``<stem>.segpipe.json`` beside it."""
    model = Path(model)
    return model.with_name(model.stem + METADATA_SUFFIX)


def is_segpipe_metadata(data: Any) -> bool:
    """Whether parsed JSON is segpipe's metadata (an object with 'architecture'), not another tool's file."""
    return isinstance(data, Mapping) and "architecture" in data


def find_metadata(model: str | Path) -> Path:
    """The metadata file of a local model file: ``<stem>.segpipe.json``, else ``<stem>.json`` when that file is
    segpipe's (checkpoints written by ``segpipe train`` and older exports); another tool's ``<stem>.json`` is never
    read as segpipe's.

    Raises:
        ModelError: there is none, saying how to make one.
    """
    model = Path(model)
    ours, plain = metadata_path(model), model.with_suffix(".json")
    if ours.is_file():
        return ours
    how = f"write one with: segpipe model init {model}, or name it with --model-metadata PATH"
    if plain.is_file():
        try:
            data = json.loads(plain.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return plain  # not JSON at all: reading it says so
        if is_segpipe_metadata(data):
            return plain
        found = sorted(data)[:6] if isinstance(data, Mapping) else type(data).__name__
        raise ModelError(
            f"model file {model} has no segpipe metadata: {ours.name} is missing, and {plain.name} beside it is "
            f"another tool's file (fields {found}, no 'architecture'); {how}"
        )
    if model.suffix.lower() == ".safetensors":
        how = "segpipe train and save_checkpoint write it with the weights; copy it with the checkpoint"
    raise ModelError(f"model file {model} has no segpipe metadata ({ours.name} or {plain.name} beside it); {how}")


def read_metadata(path: str | Path) -> ModelMetadata:
    """Read and validate a metadata file (a path, or an object-storage URL).

    Raises:
        ModelError: If the file is missing, is not JSON, or a field is invalid.
    """
    location = Location(path)
    if location.is_local and not location.path.exists():
        raise ModelError(
            f"model metadata {path} is missing; every model needs segpipe metadata (see "
            "segpipe.models.metadata.ModelMetadata, or write it with segpipe model init)"
        )
    try:
        text = location.read_bytes().decode("utf-8")
    except (SegpipeError, UnicodeDecodeError) as error:
        raise ModelError(f"model metadata {path} cannot be read ({error}); check the path or URL") from None
    return _parse_metadata(text, str(path))


def _parse_metadata(text: str, source: str) -> ModelMetadata:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelError(f"model metadata {source} is not valid JSON ({error}); fix the JSON sidecar") from None
    return ModelMetadata.from_dict(data, source=source)


def write_metadata(metadata: ModelMetadata, path: str | Path, *, suffix: str = ".json") -> Path:
    """Write ``metadata`` beside ``path`` as ``<stem><suffix>`` (``.json`` for segpipe's own checkpoints,
    :data:`METADATA_SUFFIX` for a model from elsewhere), atomically; return its path.

    Use it to give an exported ONNX or TorchScript model its metadata (``path`` may be the model file itself).
    """
    path = Path(path)
    sidecar = path.with_name(path.stem + suffix) if suffix != ".json" else path.with_suffix(".json")
    Location(sidecar).write_json(metadata.to_dict())
    return sidecar
