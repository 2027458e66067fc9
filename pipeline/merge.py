"""Mergers: how the predictions of overlapping tiles become one mask (the split/aggregate/finalize seam).

A merger is chosen by the run's ``--blend`` and lives on both sides of inference:

- in each segmenter, :meth:`Merger.scores` turns a batch's logits into what is kept, and :meth:`Merger.aggregate`
  writes a batch of tiles into the work store (each tile's chunks by the segmenter that computed it) and marks
  the tiles done;
- on the driver, :meth:`Merger.finalize` turns what was aggregated into ``mask`` (and ``probabilities``).

Mergers (registered in :data:`MERGERS`):

- ``crop``: each tile keeps only its core (the U-Net overlap-tile strategy, exact when the halo covers the
  receptive field): the segmenters write class ids (and scaled probabilities) straight into ``mask``; nothing to
  finalize.
- ``cosine``, ``gaussian``: the softmax over each whole tile input goes to ``tile_probabilities`` (float16); the
  finalize step (:mod:`segpipe.pipeline.stitch`) averages overlapping tiles with the weights of
  :mod:`segpipe.core.blend`.

A new merger is one class here (or in its own module) and one entry in :data:`MERGERS`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import zarr

from segpipe.core.blend import Blend
from segpipe.core.tiles import Tile, TileGrid
from segpipe.pipeline import store as ws
from segpipe.pipeline.stitch import stitch
from segpipe.pipeline.tasks import TaskRunner

if TYPE_CHECKING:
    import torch


class Merger:
    """The base of all mergers, bound to one work store and grid.

    Args:
        store: The work store (opened by whoever holds the merger: a segmenter or the driver).
        grid: The run's tile grid.
        probabilities: Whether per-class probabilities are kept besides the mask.
    """

    #: Name in :data:`MERGERS` and in ``--blend``.
    name: ClassVar[str]
    #: Whether the store needs ``tile_probabilities`` (the softmax over every tile input) for this merger.
    tile_probabilities: ClassVar[bool]

    def __init__(self, store: ws.WorkStore, grid: TileGrid, *, probabilities: bool) -> None:
        self.store = store
        self.grid = grid
        self.probabilities = probabilities
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.store.array(name)
        return self._arrays[name]

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What the segmenter keeps of a batch's logits (B, classes, S, S): float32 softmax probabilities."""
        import torch  # lazy: torch takes 2 s; --blend's choices and the driver's stitch need no torch

        return torch.softmax(logits.float(), dim=1)

    def aggregate(self, tiles: Sequence[Tile], scores: torch.Tensor, valids: np.ndarray) -> None:
        """Write a batch of tiles' scores (B, classes, S, S) into the store and mark the tiles done.

        Args:
            tiles: The batch's tiles, in batch order.
            scores: :meth:`scores` of their logits.
            valids: (B, S, S) validity of their inputs.
        """
        raise NotImplementedError

    def finalize(
        self, *, workers: int = 2, progress: Callable[[int], Any] | None = None, session: TaskRunner | None = None
    ) -> bool:
        """Produce ``mask`` (and ``probabilities``) from what was aggregated (on the session's cluster, if any);
        returns whether there was work."""
        return False

    def written(self, tile: Tile) -> list[np.ndarray]:
        """What the store holds of ``tile``'s results, read back (the arrays :meth:`aggregate` wrote for it)."""
        raise NotImplementedError

    def _mark_done(self, tile: Tile, parts: Sequence[np.ndarray]) -> None:
        """Record the tile's checksum of ``parts`` (what was written for it), then its done flag."""
        self._array(ws.CHECKSUMS)[tile.row, tile.col] = tile_checksum(parts)
        self._array(ws.DONE)[tile.row, tile.col] = 1

    def damaged(self, done: np.ndarray) -> list[tuple[int, int]]:
        """The tiles flagged done (``done``: (rows, cols)) whose results are not what was written: a chunk missing,
        truncated or corrupt (it does not decode, or decodes to other bytes than its checksum says)."""
        checksums = np.asarray(self._array(ws.CHECKSUMS)[...])
        bad = []
        for r, c in zip(*np.nonzero(done), strict=True):
            try:
                ok = tile_checksum(self.written(self.grid.tile(int(r), int(c)))) == int(checksums[r, c])
            except Exception:  # a chunk zarr or its codec cannot read
                ok = False
            if not ok:
                bad.append((int(r), int(c)))
        return bad


def tile_checksum(parts: Sequence[np.ndarray]) -> int:
    """CRC-32 of the bytes of a tile's result arrays, in order (C order)."""
    value = 0
    for part in parts:
        value = zlib.crc32(np.ascontiguousarray(part).tobytes(), value)
    return value


def class_ids(scores: torch.Tensor) -> torch.Tensor:
    """``argmax`` over the classes of (B, classes, H, W) scores as (B, H, W) uint8, on the scores' device.

    Equal to ``torch.argmax(scores, dim=1)`` (the first of equal maxima; NaN counts as the largest), which on CPU
    reduces across a strided axis and is slow (113 ms for 6 x 1024 x 1024 on 2 EPYC cores): a running maximum over
    the classes takes 20 ms. NaN scores (a broken model) take torch's own argmax, so the ids match it everywhere.
    """
    import torch  # lazy: torch takes 2 s; only segmenters call this

    if scores.device.type != "cpu" or scores.shape[1] > 255 or bool(torch.isnan(scores).any()):
        return torch.argmax(scores, dim=1).to(torch.uint8)
    best = scores[:, 0].clone()
    ids = torch.zeros(best.shape, dtype=torch.uint8)
    for c in range(1, scores.shape[1]):
        higher = scores[:, c] > best  # strictly: the first of equal maxima wins, as in torch.argmax
        best = torch.where(higher, scores[:, c], best)
        ids.masked_fill_(higher, c)
    return ids


class CropMerger(Merger):
    """Keep each tile's core: class ids (argmax in float32, nodata -> 255) and scaled probabilities, written
    straight into ``mask`` and ``probabilities``."""

    name = "crop"
    tile_probabilities = False

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities, or the logits where only their argmax is used (no probabilities: the same
        classes, no exp)."""
        return super().scores(logits) if self.probabilities else logits.float()

    def aggregate(self, tiles: Sequence[Tile], scores: torch.Tensor, valids: np.ndarray) -> None:
        import torch  # lazy: torch takes 2 s; only segmenters call this

        t, h = self.grid.tile_size, self.grid.halo
        core = scores[:, :, h : h + t, h : h + t]
        classes = class_ids(core).cpu().numpy()
        scaled = torch.round(core * ws.PROBABILITY_SCALE).to(torch.uint8).cpu().numpy() if self.probabilities else None
        mask = self._array(ws.MASK)
        for k, tile in enumerate(tiles):
            w = tile.core_in_input
            ok = valids[k, w.row_slice, w.col_slice].astype(bool)
            rows, cols = slice(0, w.height), slice(0, w.width)
            ids = np.where(ok, classes[k, rows, cols], ws.MASK_NODATA).astype(np.uint8, copy=False)
            mask[tile.core.row_slice, tile.core.col_slice] = ids
            parts = [ids]
            if scaled is not None:
                probabilities = np.where(ok[None], scaled[k, :, rows, cols], ws.PROBABILITY_NODATA).astype(
                    np.uint8, copy=False
                )
                self._array(ws.PROBABILITIES)[:, tile.core.row_slice, tile.core.col_slice] = probabilities
                parts.append(probabilities)
            self._mark_done(tile, parts)

    def written(self, tile: Tile) -> list[np.ndarray]:
        core = tile.core
        parts = [np.asarray(self._array(ws.MASK)[core.row_slice, core.col_slice])]
        if self.probabilities:
            parts.append(np.asarray(self._array(ws.PROBABILITIES)[:, core.row_slice, core.col_slice]))
        return parts


class BlendMerger(Merger):
    """Keep the softmax over every whole tile input; finalize blends overlapping tiles (weights of
    :func:`segpipe.core.blend.weights_2d`) into ``mask`` and ``probabilities``."""

    tile_probabilities = True
    blend: ClassVar[Blend]

    def aggregate(self, tiles: Sequence[Tile], scores: torch.Tensor, valids: np.ndarray) -> None:
        import torch  # lazy: torch takes 2 s; only segmenters call this

        half = scores.to(torch.float16).cpu().numpy()
        target = self._array(ws.TILE_PROBABILITIES)
        for k, tile in enumerate(tiles):
            target[tile.row, tile.col] = half[k]
            self._mark_done(tile, [half[k]])

    def written(self, tile: Tile) -> list[np.ndarray]:
        return [np.asarray(self._array(ws.TILE_PROBABILITIES)[tile.row, tile.col])]

    def finalize(
        self, *, workers: int = 2, progress: Callable[[int], Any] | None = None, session: TaskRunner | None = None
    ) -> bool:
        stitch(self.store, self.grid, self.blend, workers=workers, progress=progress, session=session)
        return True


class CosineMerger(BlendMerger):
    """Raised-cosine weights over the outer ``2 * halo`` pixels (a partition of unity between neighbours)."""

    name = "cosine"
    blend = "cosine"


class GaussianMerger(BlendMerger):
    """Gaussian weights with sigma = tile input / 8 (as MONAI's sliding window)."""

    name = "gaussian"
    blend = "gaussian"


#: Registered mergers by ``--blend`` name.
MERGERS: dict[str, type[Merger]] = {m.name: m for m in (CropMerger, CosineMerger, GaussianMerger)}


def merger_type(name: str) -> type[Merger]:
    """The merger class for ``--blend name``; a ValueError for an unknown name (plans check it first)."""
    if name not in MERGERS:
        raise ValueError(f"blend must be one of {', '.join(MERGERS)}, got {name!r}")
    return MERGERS[name]
