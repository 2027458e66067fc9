"""Infer stage, worker side: a :class:`TileSegmenter` holds one model and turns tile indices into predictions.

A segmenter reads each tile's input (core + halo, mirror-padded at the scene edge) from the work store,
scales it as the run decided (the scene's pixel map, :mod:`segpipe.pipeline.fit`), normalises it as the model's
metadata says, runs batches, and hands the scores to the run's merger
(:mod:`segpipe.pipeline.merge`), which writes them back into the store.

Only tile indices go in and small stats come out. Reads of the next batch and writes of the previous one run
on background threads while the model computes. A batch is a fixed group of tiles, so a re-run recomputes
exactly the same batches and produces identical bytes; a group whose tiles are all marked done is skipped.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.core.pixels import PixelMap, normalise
from segpipe.core.runtime import retain_freed_memory
from segpipe.core.tiles import Tile, TileGrid, read_tile_input
from segpipe.pipeline import store as ws
from segpipe.pipeline.merge import merger_type
from segpipe.pipeline.session import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferJob:
    """One scene's inference, as a segmenter sees it: where the tiles are and how they are cut and merged.

    Attributes:
        store_url: The scene's work store.
        tile_size: Core side in pixels.
        halo: Halo in pixels.
        blend: A merger name (see :data:`segpipe.pipeline.merge.MERGERS`).
        probabilities: Also write per-class probabilities.
        pixel_map: Applied to each tile's pixels before the model's normalisation (the scene's scaling), or None.
    """

    store_url: str
    tile_size: int
    halo: int
    blend: str
    probabilities: bool = False
    pixel_map: PixelMap | None = None


@dataclass(frozen=True)
class InferOptions:
    """Settings of one inference run.

    Attributes:
        model: Model name or checkpoint path (see :func:`segpipe.models.checkpoint.load_model`).
        tile_size: Core side in pixels.
        halo: Halo in pixels.
        blend: A merger name (``crop``, ``cosine`` or ``gaussian``; see :data:`segpipe.pipeline.merge.MERGERS`).
        batch_size: Tiles per forward pass.
        device: ``cpu`` or ``cuda`` (already resolved, not ``auto``).
        threads: torch intra-op threads of one segmenter in this process (CPU; Ray segmenters get theirs from the
            session).
        probabilities: Also write per-class probabilities.
        checksum: The SHA-256 of the model file the run was planned with (segmenters verify it); None: any.
        metadata: The model's metadata file when named explicitly (``--model-metadata``), else None.
        pixel_map: The scene's scaling (see :class:`InferJob`).
    """

    model: str
    tile_size: int
    halo: int
    blend: str
    batch_size: int
    device: str
    threads: int
    probabilities: bool = False
    checksum: str | None = None
    metadata: str | None = None
    pixel_map: PixelMap | None = None


def _node_id() -> str:
    """The Ray node this runs on, or ``local`` outside Ray (Ray is not imported just to ask)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return str(ray.get_runtime_context().get_node_id())
    return "local"


class TileSegmenter:
    """Holds one model on one device and segments groups of tiles of any scene's work store (a Ray actor, or an
    object in the driver). The model is loaded once, here; a scene's store is opened at its first call.

    Args:
        spec: The model (name, path or URL, and the checksum the run planned with), device and threads.
    """

    def __init__(self, spec: ModelSpec) -> None:
        import torch

        from segpipe.models.checkpoint import load_model

        self.spec = spec
        if spec.device == "cpu":
            torch.set_num_threads(max(1, spec.threads))
            retain_freed_memory()
        self.torch = torch
        self.device = torch.device(spec.device)
        self.loaded = load_model(spec.model, device=spec.device, checksum=spec.checksum, metadata=spec.metadata)
        self.model = self.loaded.module
        if self.device.type == "cuda":
            # torch's stubs for Module.to omit the memory_format keyword that it accepts
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        meta = self.loaded.metadata
        self.mean, self.std = meta.mean, meta.std
        self.job: InferJob | None = None
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tile-io")

    def _open(self, job: InferJob) -> None:
        """Open ``job``'s work store and merger (kept until a call for another job)."""
        if job == self.job:
            return
        self.store = ws.WorkStore(job.store_url, mode="r+")
        self.image = self.store.array(ws.IMAGE)
        self.valid = self.store.array(ws.VALID)
        self.done = self.store.array(ws.DONE)
        scene = self.store.attrs["scene"]
        self.grid = TileGrid(scene["width"], scene["height"], job.tile_size, job.halo)
        self.merger = merger_type(job.blend)(self.store, self.grid, probabilities=job.probabilities)
        self.job = job

    def _read_batch(self, indices: Sequence[int]) -> tuple[list[Tile], np.ndarray, np.ndarray]:
        tiles = [self.grid.tile_at(i) for i in indices]
        inputs, valids = [], []
        pixel_map = self.job.pixel_map if self.job is not None else None
        for tile in tiles:
            pixels, ok = read_tile_input(self.image, self.valid, tile)
            if pixel_map is not None:
                pixels = pixel_map.apply(pixels)
            inputs.append(normalise(pixels, self.mean, self.std, ok))
            valids.append(ok)
        return tiles, np.stack(inputs), np.stack(valids)

    def _forward(self, batch: np.ndarray) -> Any:
        """The merger's scores (B, classes, S, S) of a normalised batch (B, bands, S, S), as a float32 tensor on
        the model's device."""
        torch = self.torch
        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                logits = self.model(x)
        else:
            with torch.inference_mode():
                logits = self.model(x)
        return self.merger.scores(logits)

    def _is_done(self, indices: Sequence[int]) -> bool:
        return all(self.done[divmod(i, self.grid.cols)] == 1 for i in indices)

    def process(self, job: InferJob, groups: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Segment the given groups of tiles (flat tile indices) of ``job``'s scene; each group is one batch.

        Groups whose tiles are all done already (a retried call after a crash) are skipped.

        Returns:
            Small stats: tiles computed, batches, seconds reading, computing and waiting on writes.
        """
        start = time.perf_counter()
        self._open(job)
        todo = [list(g) for g in groups if not self._is_done(g)]
        stats: dict[str, Any] = {"tiles": 0, "batches": 0, "compute_s": 0.0, "wait_read_s": 0.0, "wait_write_s": 0.0}
        stats["node"] = _node_id()
        if not todo:
            return {**stats, "seconds": time.perf_counter() - start}
        pending_read: Future[tuple[list[Tile], np.ndarray, np.ndarray]] = self.io.submit(self._read_batch, todo[0])
        pending_write: Future[None] | None = None
        for k in range(len(todo)):
            t0 = time.perf_counter()
            tiles, batch, valids = pending_read.result()
            t1 = time.perf_counter()
            if k + 1 < len(todo):
                pending_read = self.io.submit(self._read_batch, todo[k + 1])
            scores = self._forward(batch)
            if self.device.type == "cuda":
                self.torch.cuda.synchronize()
            t2 = time.perf_counter()
            if pending_write is not None:
                pending_write.result()
            t3 = time.perf_counter()
            pending_write = self.io.submit(self.merger.aggregate, tiles, scores, valids)
            stats["wait_read_s"] += t1 - t0
            stats["compute_s"] += t2 - t1
            stats["wait_write_s"] += t3 - t2
            stats["tiles"] += len(tiles)
            stats["batches"] += 1
        if pending_write is not None:
            pending_write.result()
        return {**stats, "seconds": time.perf_counter() - start}

    def ping(self) -> str:
        """Readiness probe: ``device@host`` once the model is loaded."""
        import socket

        return f"{self.device}@{socket.gethostname()}"
