"""The recipe of a run: everything that decides the pixels of its mask and probabilities, in one frozen value.

A :class:`Recipe` is built once, where a run is planned (:func:`segpipe.pipeline.plan.make_plan`), and the same
way, without reading pixels, where a data set decides what to segment (:func:`segpipe.pipeline.plan.scene_output_key`).
Everything downstream reads it and nothing copies its fields:

- :meth:`Recipe.digest` keys the work store's inference results (:meth:`segpipe.pipeline.store.WorkStore.prepare_run`:
  results made with another recipe, or of another version of the scene, are discarded);
- :meth:`Recipe.settings` is the settings part of every output key
  (:func:`segpipe.pipeline.incremental.output_key`), so a data set recomputes a scene when any of them changes, and
  says which;
- the segmenters receive ``(work store, recipe)`` for each group of tiles
  (:meth:`segpipe.pipeline.infer.TileSegmenter.process`).

A new setting that changes pixels is one field here (or, when it changes what is read of the scene, one field of
:class:`~segpipe.pipeline.scene.Selection`): the digest, the output keys and the summary's key follow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any

from segpipe.core.pixels import PixelMap
from segpipe.pipeline.scene import Selection


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How a run makes its pixels.

    Attributes:
        model: The model's identity: the SHA-256 of its file and a digest of its metadata
            (:attr:`segpipe.models.checkpoint.LoadedModel.identity`); segmenters check that they hold this model.
        tile_size: Tile core side, in pixels.
        halo: Context read around each core, in pixels.
        blend: The merger (``--blend``; :data:`segpipe.pipeline.merge.MERGERS`).
        batch_size: Tiles per forward pass (it changes float sums in their last bits).
        probabilities: Whether per-class probabilities are kept besides the mask.
        selection: What is read of the scene: bands, nodata, and for a slide the pixel size read, the tissue
            detection and the level-0 pixel size (:class:`~segpipe.pipeline.scene.Selection`).
        scaling: How scene values map to the model's input (``--scaling`` or the model's contract), as text; None:
            values used as they are.
        pixel_map: What ``scaling`` gives for this scene (per band scale, offset and clip), applied to every tile
            before the model's normalisation; None without a scaling or when the recipe was made without reading
            pixels. Not in the digest: it is a function of the scaling and the scene's content, both keyed.
    """

    model: str
    tile_size: int
    halo: int
    blend: str
    batch_size: int
    probabilities: bool
    selection: Selection
    scaling: str | None
    pixel_map: PixelMap | None = None

    def settings(self) -> dict[str, Any]:
        """Every field that decides pixels except the model, as JSON values: the settings part of an output key."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "pixel_map")}
        values["selection"] = self.selection.to_attrs()
        return values

    def digest(self) -> str:
        """SHA-256 (hex) of the model and :meth:`settings`: the key of the work store's results."""
        text = json.dumps({"model": self.model, **self.settings()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()
