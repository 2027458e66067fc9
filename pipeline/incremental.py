"""Incremental runs by content: every output records the key it was made from, and a scene is skipped only when its
key is unchanged.

A key (:class:`OutputKey`) has three parts:

- ``scene``: the scene's fingerprint (its header, and what identifies its bytes: a local file's size and
  modification time, an object's ETag, an HTTP resource's ETag and Last-Modified; see
  :func:`segpipe.core.raster.identity`);
- ``model``: the SHA-256 of the model file and a digest of its metadata (normalisation, bands, input contract);
- ``settings``: every setting that changes pixels (tile size, halo, blend, batch size, probabilities, the scaling of
  the scene's values) and segpipe's version; the bands and nodata read (``--bands``, ``--nodata``) are part of the
  scene's fingerprint, and so are a slide's ``--resolution`` and ``--tissue`` (the selection read);
- ``settings["vector"]``, only when polygons are written: their format, simplification and minimum area (a run
  without polygons keeps the key it had before polygons existed).

The run summary holds it (``"key"``), and :func:`decide` compares a scene's current key with the one in its
summary, giving the reason of the decision: ``new``, ``incomplete`` (outputs without a readable summary),
``changed scene``, ``changed model``, ``changed settings (...)``, ``forced`` (``--overwrite``), or ``unchanged``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import segpipe

#: Settings that change an output's pixels, recorded in its key.
PIXEL_SETTINGS = ("tile_size", "halo", "blend", "batch_size", "probabilities", "scaling")


@dataclass(frozen=True)
class OutputKey:
    """What an output was made from (see the module docstring)."""

    scene: str
    model: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """SHA-256 of the three parts."""
        text = json.dumps({"scene": self.scene, "model": self.model, "settings": self.settings}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "scene": self.scene, "model": self.model, "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputKey:
        return cls(str(data["scene"]), str(data["model"]), dict(data.get("settings", {})))


def output_key(
    *, scene_fingerprint: str, model_checksum: str, tile_size: int, halo: int, blend: str, batch_size: int,
    probabilities: bool, scaling: str | None = None, vector: dict[str, Any] | None = None,
    cog: dict[str, str] | None = None,
) -> OutputKey:  # fmt: skip
    """The key of an output made with these inputs and settings (``model_checksum``: the model's identity, see
    :attr:`segpipe.models.checkpoint.LoadedModel.identity`; ``vector``: how polygons are made, None without;
    ``cog``: the COG creation options given, ``--co``)."""
    settings = {
        "tile_size": tile_size,
        "halo": halo,
        "blend": blend,
        "batch_size": batch_size,
        "probabilities": probabilities,
        "scaling": scaling,
        "segpipe": segpipe.__version__,
    }
    if vector is not None:
        settings["vector"] = dict(vector)
    if cog:  # only when set: the keys of outputs written with the defaults stay as they were
        settings["cog"] = dict(cog)
    return OutputKey(scene_fingerprint, model_checksum, settings)


@dataclass(frozen=True)
class Decision:
    """Whether to segment a scene, and why."""

    run: bool
    reason: str


def decide(current: OutputKey, summary: dict[str, Any] | None, *, outputs_exist: bool, force: bool) -> Decision:
    """Compare a scene's current key with the one recorded in its summary (None when there is none)."""
    if force:
        return Decision(True, "forced (--overwrite)")
    if summary is None:
        return Decision(True, "incomplete (outputs without a summary)" if outputs_exist else "new")
    if not outputs_exist:
        return Decision(True, "incomplete (summary without its outputs)")
    try:
        recorded = OutputKey.from_dict(summary["key"])
    except (KeyError, TypeError):
        return Decision(True, "incomplete (a summary without a key, from an older segpipe)")
    if recorded.digest == current.digest:
        return Decision(False, "unchanged")
    if recorded.scene != current.scene:
        return Decision(True, "changed scene")
    if recorded.model != current.model:
        return Decision(True, "changed model")
    changed = sorted(
        k for k in set(recorded.settings) | set(current.settings) if recorded.settings.get(k) != current.settings.get(k)
    )
    return Decision(True, f"changed settings ({', '.join(changed)})")
