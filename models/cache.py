"""Models on object storage: a local cache of model files, keyed by their SHA-256.

``--model s3://bucket/models/x.safetensors`` (or ``.onnx``, ``.pt``) names a model file with its metadata
``x.segpipe.json`` (or ``x.json``) beside it. Every process that needs it (the driver, each segmenter, on any
machine) fetches it once into ``<cache>/models/<sha256>/`` and loads it from there with the same loader as a local
file (never unpickling). The
model file is downloaded only when the cache lacks a copy with the expected checksum; the sidecar (a few hundred
bytes) is read again at every load, so an edited sidecar is never stale. A copy whose bytes do not match its
checksum is replaced.

The cache folder is ``$SEGPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/segpipe``, else ``~/.cache/segpipe``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from segpipe.core.errors import ModelError
from segpipe.core.files import sha256_file, write_atomically
from segpipe.core.objects import ObjectUrl, read_bytes
from segpipe.models.metadata import METADATA_SUFFIX


def cache_root() -> Path:
    """The folder of segpipe's local caches (see the module docstring)."""
    if os.environ.get("SEGPIPE_CACHE_DIR"):
        return Path(os.environ["SEGPIPE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "segpipe"


def sidecar_url(url: str, suffix: str = ".json") -> str:
    """A metadata file of a model URL: ``<stem><suffix>`` beside it."""
    parsed = ObjectUrl.parse(url)
    return str(parsed.parent.child(Path(parsed.name).stem + suffix))


def _read_sidecar(url: str) -> tuple[bytes, str]:
    """The model's metadata (``<stem>.segpipe.json``, else ``<stem>.json``) and the suffix it was found under."""
    for suffix in (METADATA_SUFFIX, ".json"):
        try:
            return read_bytes(sidecar_url(url, suffix)), suffix
        except Exception as exc:  # missing: try the next name
            last = exc
    raise ModelError(
        f"model {url}: its metadata {sidecar_url(url, METADATA_SUFFIX)} (or {sidecar_url(url)}) cannot be read ({last})"
    )


def fetch_model(url: str, *, checksum: str | None = None) -> Path:
    """A local copy of the model file at ``url`` and its sidecar; returns the model file's path.

    Args:
        url: ``s3://``, ``gs://`` or ``az://`` URL of a ``.safetensors``, ``.onnx``, ``.pt`` or ``.ts`` file.
        checksum: The SHA-256 the file must have (what the run's plan found); None: whatever is there now.

    Raises:
        ModelError: the file cannot be fetched, or its bytes do not match ``checksum``.
    """
    name = ObjectUrl.parse(url).name
    if not name:
        raise ModelError(f"--model {url!r} names no file; give the URL of a .safetensors, .onnx or .pt file")
    sidecar, suffix = _read_sidecar(url)
    if checksum is not None:
        cached = cache_root() / "models" / checksum / name
        if cached.is_file() and sha256_file(cached) == checksum:
            write_atomically(cached.with_name(cached.stem + suffix), sidecar, shared=True)
            return cached
    try:
        data = read_bytes(url)
    except Exception as exc:
        raise ModelError(f"model {url} cannot be fetched ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if checksum is not None and digest != checksum:
        raise ModelError(
            f"model {url} has SHA-256 {digest[:16]}... but the run was planned with {checksum[:16]}...; the file "
            "changed during the run: run again"
        )
    path = cache_root() / "models" / digest / name
    # every segmenter on a machine may fill the same cache entry at once, with the same bytes
    write_atomically(path.with_name(path.stem + suffix), sidecar, shared=True)
    write_atomically(path, data, shared=True)
    return path
