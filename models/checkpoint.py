"""Save and load checkpoints: safetensors weights + JSON sidecar; ONNX and TorchScript with a sidecar.

Loading never unpickles. ``.pth``/``.pkl``/``.ckpt`` files, and any file whose bytes are a pickle or a zip of
pickles (``torch.save`` output), are refused before anything in them is interpreted: unpickling can run
arbitrary code. Convert such a checkpoint once, in a trusted environment: load it, then
``save_checkpoint(module, metadata, "model.safetensors")``.

Accepted by :func:`load_model`:

- ``"default"`` (the packaged model) or another stem of a file in ``models/weights/``;
- ``x.safetensors`` or ``x.json`` (the pair is found by stem); a directory holding exactly one checkpoint;
- ``x.onnx`` (onnxruntime; ``pip install onnxruntime``) and ``x.pt`` / ``x.ts`` TorchScript archives
  (``torch.jit.save``), each with segpipe's metadata ``x.segpipe.json`` (``segpipe model init`` writes it), or an
  ``x.json`` that is segpipe's, or a metadata file named explicitly (``--model-metadata``); a ``x.json`` of another
  tool beside the model is never read as segpipe's (:func:`segpipe.models.metadata.find_metadata`);
- any of these as an object-storage URL (``s3://bucket/models/x.safetensors``), fetched into a local cache keyed by
  its checksum (:mod:`segpipe.models.cache`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from segpipe.core.errors import ConfigError, ModelError
from segpipe.core.files import write_atomically
from segpipe.core.location import Location
from segpipe.models.cache import fetch_model
from segpipe.models.external import OnnxModel, TorchScriptModel
from segpipe.models.metadata import (
    EXTERNAL_ARCHITECTURES,
    METADATA_SUFFIX,
    ClassInfo,
    ModelMetadata,
    find_metadata,
    read_metadata,
    write_metadata,
)
from segpipe.models.registry import ARCHITECTURES, build_model

__all__ = [
    "ClassInfo",
    "LoadedModel",
    "ModelMetadata",
    "default_model_path",
    "find_metadata",
    "load_model",
    "read_metadata",
    "save_checkpoint",
    "write_metadata",
]

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Model file suffixes load_model accepts (each needs a .json sidecar with the same stem).
MODEL_SUFFIXES = (".safetensors", ".onnx", ".pt", ".ts")
#: Suffixes of pickle-based checkpoints, refused without being read.
PICKLE_SUFFIXES = (".pth", ".pkl", ".pickle", ".ckpt", ".bin")
_MAX_LISTED = 5


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference.

    Attributes:
        module: In eval mode on the requested device; maps float32 normalised (B, bands, H, W) to logits
            (B, len(classes), H, W).
        metadata: The validated sidecar.
        path: The weights (or ONNX/TorchScript) file it came from, absolute.
        checksum: SHA-256 hex digest of that file's bytes (for work-store fingerprints).
    """

    module: nn.Module
    metadata: ModelMetadata
    path: str
    checksum: str
    metadata_path: str = ""

    @property
    def identity(self) -> str:
        """What outputs depend on: the model file's SHA-256 and a digest of its metadata (bands, normalisation,
        input contract), as ``<sha256>+<16 hex>``."""
        text = json.dumps(self.metadata.to_dict(), sort_keys=True)
        return f"{self.checksum}+{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def default_model_path() -> Path:
    """The packaged default model's weights: ``models/weights/default.safetensors``."""
    return WEIGHTS_DIR / "default.safetensors"


def _refusal(path: Path, what: str) -> ModelError:
    return ModelError(
        f"model file {path} is {what}; segpipe never unpickles (unpickling can run arbitrary code) "
        "and accepts only safetensors, ONNX or TorchScript files with a JSON sidecar. Convert it once in a "
        "trusted environment: load it there and call segpipe.models.checkpoint.save_checkpoint(module, metadata, "
        "'model.safetensors')"
    )


def _pickle_kind(data: bytes) -> str | None:
    """Describe ``data`` if it is a pickle or a zip archive holding pickles (torch.save output), else None."""
    if len(data) >= 2 and data[0] == 0x80 and 1 <= data[1] <= 5:
        return "a pickle"
    if data[:1] in (b"(", b"c", b"]", b"}", b"i") and data.rstrip().endswith(b"."):
        return "a pickle (protocol 0/1)"
    if data[:4] == b"PK\x03\x04":
        names = _zip_names(data)
        if any(name.endswith(".pkl") for name in names) and not _is_torchscript(names):
            return "a zip of pickles (torch.save output)"
    return None


def _zip_names(data: bytes) -> list[str]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def _is_torchscript(names: list[str]) -> bool:
    """TorchScript archives (torch.jit.save) hold ``<name>/code/`` sources and ``constants.pkl``."""
    return any("/code/" in name for name in names) and any(name.endswith("/constants.pkl") for name in names)


def _packaged(name: str) -> Path | None:
    found = [WEIGHTS_DIR / f"{name}{suffix}" for suffix in MODEL_SUFFIXES]
    found = [path for path in found if path.is_file()]
    if len(found) > 1:
        raise ModelError(f"packaged model name {name!r} is ambiguous: {[p.name for p in found]}; pass a path")
    return found[0] if found else None


def _packaged_names() -> list[str]:
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted({p.stem for p in WEIGHTS_DIR.iterdir() if p.suffix in MODEL_SUFFIXES})


def _single_checkpoint_in(directory: Path) -> Path:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    models = [p for p in files if p.suffix.lower() in MODEL_SUFFIXES]
    if len(models) == 1:
        return models[0]
    if models:
        raise ModelError(
            f"model directory {directory} holds {len(models)} checkpoints "
            f"({', '.join(p.name for p in models)}); pass the one you mean"
        )
    pickles = [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise _refusal(pickles[0], "a pickle-based checkpoint")
    raise ModelError(
        f"model directory {directory} holds no checkpoint; expected one of {', '.join(MODEL_SUFFIXES)} "
        "with a .json sidecar"
    )


def _model_file(path: Path) -> Path:
    """The model file meant by an existing file path (a sidecar leads to its model file)."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise _refusal(path, "a pickle-based checkpoint")
    if suffix in MODEL_SUFFIXES:
        return path
    if suffix == ".json":
        if path.name.endswith(METADATA_SUFFIX):
            path = path.with_name(path.name[: -len(METADATA_SUFFIX)] + ".json")
        siblings = [path.with_suffix(s) for s in MODEL_SUFFIXES if path.with_suffix(s).is_file()]
        if len(siblings) == 1:
            return siblings[0]
        if siblings:
            raise ModelError(
                f"sidecar {path} has several model files ({', '.join(p.name for p in siblings)}); "
                "pass the model file itself"
            )
        pickles = [path.with_suffix(s) for s in PICKLE_SUFFIXES if path.with_suffix(s).is_file()]
        if pickles:
            raise _refusal(pickles[0], "a pickle-based checkpoint")
        raise ModelError(
            f"sidecar {path} has no model file next to it; expected {path.stem} with one of {', '.join(MODEL_SUFFIXES)}"
        )
    raise ModelError(
        f"model file {path}: unsupported type {path.suffix or '(no suffix)'}; expected .safetensors, "
        ".onnx, or .pt/.ts TorchScript, each with a .json sidecar, or a directory holding one such checkpoint"
    )


def resolve_model_path(name_or_path: str | Path, *, checksum: str | None = None) -> Path:
    """The model file (weights, ONNX or TorchScript) that ``name_or_path`` designates; see :func:`load_model`. A URL
    is fetched into the local model cache (:func:`segpipe.models.cache.fetch_model`).

    Raises:
        ModelError: If nothing matches, the choice is ambiguous, or the file is a pickle.
    """
    text = str(name_or_path)
    if not Location(text).is_local:
        if Path(text).suffix.lower() in PICKLE_SUFFIXES:
            raise _refusal(Path(text), "a pickle-based checkpoint")
        return fetch_model(text, checksum=checksum)
    path = Path(text).expanduser()
    bare = isinstance(name_or_path, str) and "/" not in text and "\\" not in text
    if bare and path.suffix and not path.exists() and (WEIGHTS_DIR / text).is_file():
        path = WEIGHTS_DIR / text  # a packaged file named with its suffix, e.g. "default.json"
    elif bare and not path.suffix:
        packaged = _packaged(text)
        if packaged is not None:
            return packaged
        if not path.exists():
            if text == "default":
                raise ModelError(
                    f"the packaged default model is missing ({default_model_path()}); the install is incomplete: "
                    "reinstall segpipe (pip install --force-reinstall --no-deps -e . from the repository)"
                )
            raise ModelError(
                f"no packaged model named {text!r} (available: {', '.join(_packaged_names()) or 'none'}) "
                f"and no file or directory {text!r}; pass 'default', a packaged name, or a checkpoint path"
            )
    if not path.exists():
        raise ModelError(f"model file {path} does not exist; check the path")
    if path.is_dir():
        path = _single_checkpoint_in(path)
    return _model_file(path)


def _summarise(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _check_state(tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor], where: str, fix: str) -> None:
    """Raise ModelError unless ``tensors`` has the keys and shapes of ``expected`` and finite values."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{key} {tuple(tensors[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(tensors) & set(expected))
        if tensors[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch (weights vs architecture): {_summarise(mismatched)}")
    if problems:
        raise ModelError(f"{where}: {'; '.join(problems)}; {fix}")
    bad = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelError(f"{where}: non-finite values (NaN or inf) in {_summarise(sorted(bad))}; retrain or re-save")


def _check_consistency(model: nn.Module, metadata: ModelMetadata, where: str) -> None:
    """Raise ModelError if the network's channels or size multiple contradict the metadata."""
    checks = [
        ("in_channels", len(metadata.bands), f"'bands' lists {len(metadata.bands)}"),
        ("num_classes", len(metadata.classes), f"'classes' lists {len(metadata.classes)}"),
    ]
    for attribute, count, listed in checks:
        value = getattr(model, attribute, None)
        if isinstance(value, int) and value != count:
            raise ModelError(f"{where}: the network has {attribute}={value} but {listed}; make them agree")
    multiple = getattr(model, "size_multiple", None)
    if isinstance(multiple, int) and metadata.size_multiple % multiple:
        raise ModelError(
            f"{where}: 'size_multiple' is {metadata.size_multiple} but the network needs multiples of "
            f"{multiple}; set 'size_multiple' to {multiple} (or a multiple of it)"
        )


def _pair(path: Path) -> tuple[Path, Path]:
    base = path.with_suffix("") if path.suffix.lower() in (".safetensors", ".json") else path
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def save_checkpoint(module: nn.Module, metadata: ModelMetadata, path: str | Path) -> Path:
    """Write ``module``'s weights as ``<stem>.safetensors`` and ``metadata`` as ``<stem>.json``.

    Each file is written to a temporary name, fsynced and renamed into place (the sidecar first, the weights
    last), so readers never see a partial file. Writing the same weights and metadata twice gives identical
    bytes.

    Args:
        module: A network built from the registry architecture named in ``metadata`` (any device).
        metadata: Its metadata; ``architecture`` must be a registry name.
        path: ``x``, ``x.safetensors`` or ``x.json``; parent directories are created.

    Returns:
        The ``.safetensors`` path.

    Raises:
        ModelError: If the architecture is not in the registry or the weights do not match it.
    """
    weights, sidecar = _pair(Path(path))
    where = f"save_checkpoint {weights}"
    if metadata.architecture not in ARCHITECTURES:
        raise ModelError(
            f"{where}: architecture {metadata.architecture!r} is not in the registry "
            f"({', '.join(sorted(ARCHITECTURES))}); export ONNX/TorchScript models yourself and give them a "
            "sidecar with segpipe.models.checkpoint.write_metadata"
        )
    reference = build_model(metadata.architecture, metadata.arguments)
    state = {key: value.detach().to("cpu").clone().contiguous() for key, value in module.state_dict().items()}
    _check_state(state, reference.state_dict(), where, "pass the module that metadata.arguments describes")
    _check_consistency(reference, metadata, where)
    data = save_safetensors(state, metadata={"format": "pt"})
    write_metadata(metadata, sidecar)
    write_atomically(weights, data)
    logger.info("saved checkpoint %s (%d tensors)", weights, len(state))
    return weights


def _load_safetensors(data: bytes, path: Path, metadata: ModelMetadata) -> nn.Module:
    sidecar = path.with_suffix(".json")
    if metadata.architecture in EXTERNAL_ARCHITECTURES:
        raise ModelError(
            f"sidecar {sidecar}: architecture {metadata.architecture!r} is for .onnx/.pt files, but the "
            f"weights are safetensors; name a registry architecture ({', '.join(sorted(ARCHITECTURES))})"
        )
    try:
        tensors = load_safetensors(data)
    except Exception as error:  # safetensors raises SafetensorError, but also other types for odd headers
        raise ModelError(
            f"model file {path} is not a valid safetensors file (corrupted or truncated: "
            f"{str(error)[:200]}); re-download or re-save it"
        ) from None
    try:
        model = build_model(metadata.architecture, metadata.arguments)
    except ModelError as error:
        raise ModelError(f"sidecar {sidecar}: {error}") from None
    where = f"weights {path} vs architecture {metadata.architecture!r} in {sidecar}"
    _check_state(tensors, model.state_dict(), where, "the sidecar must describe the network the weights came from")
    _check_consistency(model, metadata, f"sidecar {sidecar}")
    model.load_state_dict(tensors, strict=True)
    return model


def load_model(
    name_or_path: str | Path, *, device: str = "cpu", checksum: str | None = None, metadata: str | None = None
) -> LoadedModel:
    """Load a model and its metadata for inference, without ever unpickling.

    Args:
        name_or_path: "default" (the packaged model) or the stem of another file in ``models/weights/``;
            a ``.safetensors``, ``.onnx``, ``.pt``/``.ts`` (TorchScript) file or its ``.json`` sidecar;
            or a directory holding exactly one checkpoint.
        device: Torch device for the module ("cpu", "cuda", "cuda:1"); ONNX models use onnxruntime's CUDA
            provider on CUDA devices when it is installed.
        checksum: The SHA-256 the model file must have (a segmenter loading what its run planned with); None:
            any.
        metadata: The metadata file (a path or URL); None: found beside the model file
            (:func:`segpipe.models.metadata.find_metadata`).

    Returns:
        The module (eval mode, on ``device``), its validated metadata, the model file path and its SHA-256.

    Raises:
        ModelError: Missing or invalid sidecar, pickle files, corrupted weights, weights that do not match the
            architecture, a missing onnxruntime.
        ConfigError: An unknown device.
    """
    target = _torch_device(device)
    path = resolve_model_path(name_or_path, checksum=checksum).resolve()
    data = _model_bytes(path)
    sidecar = metadata if metadata is not None else find_metadata(path)
    meta = read_metadata(sidecar)
    module = _module(data, path, meta, sidecar, target).to(target).eval()
    found = hashlib.sha256(data).hexdigest()
    if checksum is not None and found != checksum:
        raise ModelError(
            f"model file {path} has SHA-256 {found[:16]}... but the run was planned with {checksum[:16]}...; every "
            "node must have the same model (a URL on object storage, or the same segpipe version for packaged models)"
        )
    logger.info("loaded model %s (%s, sha256 %s) on %s", path, meta.architecture, found[:12], target)
    return LoadedModel(module=module, metadata=meta, path=str(path), checksum=found, metadata_path=str(sidecar))


def _torch_device(device: str) -> torch.device:
    """``device`` as a torch device that this machine has.

    Raises:
        ConfigError: not a torch device, or CUDA without a usable GPU.
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but this machine has no usable CUDA GPU; use 'cpu'")
    return target


def _model_bytes(path: Path) -> bytes:
    """The bytes of the model file at ``path``, refused (before anything in them is interpreted) if they are a pickle.

    Raises:
        ModelError: the file cannot be read, or is a pickle or a zip of pickles.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelError(f"model file {path} cannot be read ({error}); check the file") from None
    suffix = path.suffix.lower()
    kind = _pickle_kind(data) if suffix != ".safetensors" or not _safetensors_header_ok(data) else None
    if kind:
        raise _refusal(path, kind)
    return data


def _module(data: bytes, path: Path, meta: ModelMetadata, sidecar: str | Path, target: torch.device) -> nn.Module:
    """The network of a model file's bytes: built from the registry and loaded with safetensors weights, or the
    ONNX or TorchScript model wrapped as a module (on ``target``).

    Raises:
        ModelError: the sidecar's architecture does not fit the file's kind, or the weights do not fit it.
    """
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(data, path, meta)
    expected = "onnx" if suffix == ".onnx" else "torchscript"
    if meta.architecture != expected:
        raise ModelError(
            f"sidecar {sidecar}: 'architecture' must be {expected!r} for a {suffix} model file, "
            f"got {meta.architecture!r}; fix the JSON sidecar"
        )
    if suffix == ".onnx":
        return OnnxModel(data, meta, str(path), target)
    return TorchScriptModel(data, meta, str(path), target)


def _safetensors_header_ok(data: bytes) -> bool:
    """True if ``data`` starts like a safetensors file: an 8-byte header length, then a JSON object."""
    if len(data) < 10:
        return False
    length = int.from_bytes(data[:8], "little")
    return 2 <= length <= len(data) - 8 and data[8:9] == b"{"
