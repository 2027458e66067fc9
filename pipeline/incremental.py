"""Incremental runs by content: every output records the key it was made from, and a scene is skipped only when its
key is unchanged.

A key (:class:`OutputKey`) has three parts:

- ``scene``: the scene's fingerprint (its header, and what identifies its bytes: a local file's size and
  modification time, an object's ETag, an HTTP resource's ETag and Last-Modified; see
  :func:`segpipe.core.raster.identity`), with what is read of it (the selection: bands, nodata, a slide's
  resolution and tissue detection);
- ``model``: the model's identity, the SHA-256 of its file and a digest of its metadata (normalisation, bands,
  input contract);
- ``settings``: the run's :class:`~segpipe.pipeline.recipe.Recipe` settings (everything else that changes pixels),
  segpipe's version, how polygons are made (``vector``, None without) and the COG creation options (``cog``).

The run summary holds it (``"key"``), and :func:`decide` compares a scene's current key with the one in its
summary, giving the reason of the decision: ``new``, ``incomplete`` (outputs without a readable summary),
``changed scene``, ``changed model``, ``changed settings (...)``, ``forced`` (``--overwrite``), or ``unchanged``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from segpipe.core.version import VERSION
from segpipe.pipeline.recipe import Recipe


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
    recipe: Recipe, *, scene: str, vector: dict[str, Any] | None = None, cog: dict[str, str] | None = None
) -> OutputKey:
    """The key of an output made of the scene with fingerprint ``scene`` by ``recipe``; ``vector``: how its
    polygons are made (None: none are); ``cog``: the COG creation options given (``--co``)."""
    settings = {**recipe.settings(), "segpipe": VERSION, "vector": vector, "cog": dict(cog or {})}
    return OutputKey(scene, recipe.model, settings)


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
        return Decision(True, "incomplete (a summary without a key)")
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
