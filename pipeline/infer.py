"""Infer stage, worker side: a :class:`TileSegmenter` holds one model and turns tile indices into predictions.

A segmenter reads each tile's input (core + halo, mirror-padded at the scene edge) from the work store,
normalises it as the model's metadata says, runs batches, and writes results back into the store:

- ``crop`` blend: class ids of the core straight into ``mask`` (argmax in float32, nodata -> 255) and, if
  asked, scaled probabilities into ``probabilities``; no stitch pass is needed.
- ``cosine``/``gaussian``: the softmax over the whole tile input into ``tile_probabilities`` (float16), for
  :mod:`pipeline.stitch` to blend.

Only tile indices go in and small stats come out. Reads of the next batch and writes of the previous one run
on background threads while the model computes. A batch is a fixed group of tiles, so a re-run recomputes
exactly the same batches and produces identical bytes; a group whose tiles are all marked done is skipped.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline import store as ws
from pipeline.blend import Blend
from pipeline.tile import Tile, TileGrid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferOptions:
    """Settings of one inference run.

    Attributes:
        model: Model name or checkpoint path (see :func:`models.checkpoint.load_model`).
        tile_size: Core side in pixels.
        halo: Halo in pixels.
        blend: ``crop``, ``cosine`` or ``gaussian``.
        batch_size: Tiles per forward pass.
        device: ``cpu`` or ``cuda`` (already resolved, not ``auto``).
        threads: torch intra-op threads of one segmenter (CPU).
        probabilities: Also write per-class probabilities.
    """

    model: str
    tile_size: int
    halo: int
    blend: Blend
    batch_size: int
    device: str
    threads: int
    probabilities: bool = False


def read_tile_input(
    image: zarr.Array | np.ndarray, valid: zarr.Array | np.ndarray, tile: Tile
) -> tuple[np.ndarray, np.ndarray]:
    """Read a tile's input window from the store (or in-memory arrays of the same layout: image (bands, H, W),
    valid (H, W)), mirror-padded to the full input size outside the scene.

    Returns:
        ``(pixels, valid)``: pixels (bands, S, S) in the scene's dtype and a (S, S) uint8 validity mask, where
        S = tile_size + 2 * halo.
    """
    r, p = tile.read, tile.pad
    data = np.asarray(image[:, r.row_slice, r.col_slice])
    ok = np.asarray(valid[r.row_slice, r.col_slice])
    if p.top or p.bottom or p.left or p.right:
        data = np.pad(data, ((0, 0), (p.top, p.bottom), (p.left, p.right)), mode="reflect")
        ok = np.pad(ok, ((p.top, p.bottom), (p.left, p.right)), mode="reflect")
    return data, ok


def normalise(
    pixels: np.ndarray, valid: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """``(x - mean) / std`` per band as float32 (bands, H, W); nodata pixels become 0 (the band mean)."""
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    x = (pixels.astype(np.float32) - m) / s
    x *= valid[None].astype(np.float32)
    return x


def retain_freed_memory(threshold: int = 1 << 30) -> bool:
    """Let the C heap reuse freed memory instead of mapping fresh pages for every large tensor (glibc, Linux).

    A forward pass allocates activation tensors of tens to hundreds of megabytes and frees them. glibc serves
    allocations above its mmap threshold (at most 32 MiB by default) with fresh mappings and returns them on free,
    so every batch faults in and zeroes its activations again: measured with the default model at 640 px on 2
    EPYC cores, 0.5 s of system time per megapixel at batch 1 and 1.7 s at batch 10, on top of 1.8 s of compute.
    Raising the mmap threshold to ``threshold`` bytes and the trim threshold to its maximum (2 GiB, mallopt takes
    a C int) keeps freed memory in the heap for the next batch. Results are unchanged; the process's peak memory
    is that of one forward pass, as before, but it is not handed back between batches.

    Returns:
        True if both thresholds were set; False where ``mallopt`` is missing or refuses (another C library).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok = bool(mallopt(m_mmap_threshold, threshold)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    log.debug("malloc thresholds %s", "raised" if ok else "unchanged")
    return ok


class TileSegmenter:
    """Holds one model on one device and segments groups of tiles of one work store.

    Args:
        store_path: The work store (zarr group) path or URL.
        options: The run's settings; the model is loaded once, here.
    """

    def __init__(self, store_path: str, options: InferOptions) -> None:
        import torch

        from models.checkpoint import load_model

        self.options = options
        if options.device == "cpu":
            torch.set_num_threads(max(1, options.threads))
            retain_freed_memory()
        self.torch = torch
        self.device = torch.device(options.device)
        self.loaded = load_model(options.model, device=options.device)
        self.model = self.loaded.module
        if self.device.type == "cuda":
            # torch's stubs for Module.to omit the memory_format keyword that it accepts
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        meta = self.loaded.metadata
        self.mean, self.std = meta.mean, meta.std
        self.group = ws.open_store(store_path, mode="r+")
        self.image = ws.array(self.group, ws.IMAGE)
        self.valid = ws.array(self.group, ws.VALID)
        self.done = ws.array(self.group, ws.DONE)
        scene = ws.attrs(self.group)["scene"]
        self.grid = TileGrid(scene["width"], scene["height"], options.tile_size, options.halo)
        if options.blend == "crop":
            self.mask = ws.array(self.group, ws.MASK)
            self.probabilities = ws.array(self.group, ws.PROBABILITIES) if options.probabilities else None
        else:
            self.tile_probabilities = ws.array(self.group, ws.TILE_PROBABILITIES)
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tile-io")

    def _read_batch(self, indices: Sequence[int]) -> tuple[list[Tile], np.ndarray, np.ndarray]:
        tiles = [self.grid.tile_at(i) for i in indices]
        inputs, valids = [], []
        for tile in tiles:
            pixels, ok = read_tile_input(self.image, self.valid, tile)
            inputs.append(normalise(pixels, ok, self.mean, self.std))
            valids.append(ok)
        return tiles, np.stack(inputs), np.stack(valids)

    def _forward(self, batch: np.ndarray) -> Any:
        """Scores (B, classes, S, S) as a float32 torch tensor on the model's device: softmax probabilities, or
        the logits where only their argmax is used (``crop`` without probabilities: same classes, no exp)."""
        torch = self.torch
        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = (
                x.pin_memory()
                .to(self.device, non_blocking=True)
                .contiguous(memory_format=torch.channels_last)
            )
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                logits = self.model(x)
        else:
            with torch.inference_mode():
                logits = self.model(x)
        if self.options.blend == "crop" and not self.options.probabilities:
            return logits.float()
        return torch.softmax(logits.float(), dim=1)

    def _write(self, tiles: list[Tile], probs: Any, valids: np.ndarray) -> None:
        torch = self.torch
        if self.options.blend == "crop":
            t = self.options.tile_size
            h = self.options.halo
            core = probs[:, :, h : h + t, h : h + t]
            classes = torch.argmax(core, dim=1).to(torch.uint8).cpu().numpy()
            scaled = (
                torch.round(core * ws.PROBABILITY_SCALE).to(torch.uint8).cpu().numpy()
                if self.probabilities is not None
                else None
            )
            for k, tile in enumerate(tiles):
                w = tile.core_in_input
                ok = valids[k, w.row_slice, w.col_slice].astype(bool)
                rows, cols = slice(0, w.height), slice(0, w.width)
                self.mask[tile.core.row_slice, tile.core.col_slice] = np.where(
                    ok, classes[k, rows, cols], ws.MASK_NODATA
                )
                if scaled is not None and self.probabilities is not None:
                    self.probabilities[:, tile.core.row_slice, tile.core.col_slice] = np.where(
                        ok[None], scaled[k, :, rows, cols], ws.PROBABILITY_NODATA
                    )
                self.done[tile.row, tile.col] = 1
        else:
            half = probs.to(torch.float16).cpu().numpy()
            for k, tile in enumerate(tiles):
                self.tile_probabilities[tile.row, tile.col] = half[k]
                self.done[tile.row, tile.col] = 1

    def _is_done(self, indices: Sequence[int]) -> bool:
        return all(self.done[divmod(i, self.grid.cols)] == 1 for i in indices)

    def process(self, groups: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Segment the given groups of tiles (flat tile indices); each group is one batch.

        Groups whose tiles are all done already (a retried call after a crash) are skipped.

        Returns:
            Small stats: tiles computed, batches, seconds reading, computing and waiting on writes.
        """
        start = time.perf_counter()
        todo = [list(g) for g in groups if not self._is_done(g)]
        stats = {"tiles": 0, "batches": 0, "compute_s": 0.0, "wait_read_s": 0.0, "wait_write_s": 0.0}
        if not todo:
            return {**stats, "seconds": time.perf_counter() - start}
        pending_read: Future[tuple[list[Tile], np.ndarray, np.ndarray]] = self.io.submit(
            self._read_batch, todo[0]
        )
        pending_write: Future[None] | None = None
        for k in range(len(todo)):
            t0 = time.perf_counter()
            tiles, batch, valids = pending_read.result()
            t1 = time.perf_counter()
            if k + 1 < len(todo):
                pending_read = self.io.submit(self._read_batch, todo[k + 1])
            probs = self._forward(batch)
            if self.device.type == "cuda":
                self.torch.cuda.synchronize()
            t2 = time.perf_counter()
            if pending_write is not None:
                pending_write.result()
            t3 = time.perf_counter()
            pending_write = self.io.submit(self._write, tiles, probs, valids)
            stats["wait_read_s"] += t1 - t0
            stats["compute_s"] += t2 - t1
            stats["wait_write_s"] += t3 - t2
            stats["tiles"] += len(tiles)
            stats["batches"] += 1
        if pending_write is not None:
            pending_write.result()
        return {**stats, "seconds": time.perf_counter() - start}

    def ping(self) -> str:
        """Readiness probe: returns the device name once the model is loaded."""
        return str(self.device)
