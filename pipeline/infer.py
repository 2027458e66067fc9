"""Infer stage, worker side: a :class:`TileSegmenter` holds one model and turns tile indices into predictions.

A segmenter reads each tile's input (core + halo, mirror-padded at the scene edge) from the scene itself, window
by window, or from the work store's copy of it (:mod:`segpipe.pipeline.tile_reader`), scales it as the run decided
(the scene's pixel map, :mod:`segpipe.pipeline.fit`), normalises it as the model's metadata says, runs batches, and
hands the scores to the run's merger (:mod:`segpipe.pipeline.merge`), which writes them back into the store.

Only tile indices go in and small stats come out. The tiles of the next :data:`PREFETCH_BATCHES` batches are read,
decoded and normalised on reader threads (one tile per task, :func:`reader_threads`) and the previous batch is
written on a writer thread while the model computes; on a GPU the batch goes through a reused pinned buffer. A
batch is a fixed group of tiles, so a re-run recomputes exactly the same batches and produces identical bytes; a
group whose tiles are all marked done is skipped.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.core.errors import ModelError, SegpipeError
from segpipe.core.pixels import normalise
from segpipe.core.runtime import retain_freed_memory
from segpipe.core.tiles import Tile, TileGrid
from segpipe.models.checkpoint import load_model
from segpipe.pipeline import store as ws
from segpipe.pipeline.merge import merger_type
from segpipe.pipeline.recipe import Recipe
from segpipe.pipeline.tile_reader import TileReader, tile_reader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What one segmenter holds: a model (packaged name, local path or object URL) with the checksum the run
    planned with (segmenters verify it; None: any) and its metadata file when named explicitly
    (``--model-metadata``), on a device (``cpu`` or ``cuda``, resolved), with a number of torch threads."""

    model: str
    checksum: str | None
    device: str
    threads: int
    metadata: str | None = None


#: Batches whose tiles are being read while the model computes (two: one ready, one being decoded).
PREFETCH_BATCHES = 2


def reader_threads(spec: ModelSpec) -> int:
    """Threads reading and decoding tiles for one segmenter: its torch threads (the cores it holds; a GPU
    segmenter holds the CPUs of its share of the node), at least 2 and at most 8."""
    return max(2, min(8, spec.threads))


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
        import torch  # lazy: 2.1 s, and only segmenters need it (the driver plans and exports without it)

        self.spec = spec
        if spec.device == "cpu":
            torch.set_num_threads(max(1, spec.threads))
            retain_freed_memory()
        self.torch = torch
        self.device = torch.device(spec.device)
        self.job: tuple[str, Recipe] | None = None
        self.reader: TileReader | None = None
        #: A model that cannot be loaded: raised by ping and process (a Ray actor whose constructor raises dies,
        #: and its error would reach the driver as a death, not as the model's message).
        self.failed: SegpipeError | None = None
        try:
            self.loaded = load_model(spec.model, device=spec.device, checksum=spec.checksum, metadata=spec.metadata)
        except SegpipeError as exc:
            self.failed = exc
            return
        self.model = self.loaded.module
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has the same shape: pick the fastest kernels once
            # torch's stubs for Module.to omit the memory_format keyword that it accepts
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        meta = self.loaded.metadata
        self.mean, self.std = meta.mean, meta.std
        self._pinned: Any = None
        # tiles are read and decoded on their own threads (GDAL, zarr and numpy release the GIL), results written on one
        self.readers = ThreadPoolExecutor(max_workers=reader_threads(spec), thread_name_prefix="tile-read")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-write")

    def _open(self, store_url: str, recipe: Recipe) -> None:
        """Open the work store at ``store_url``, its tile reader and the recipe's merger (kept until a call for
        another store or recipe)."""
        if (store_url, recipe) == self.job:
            return
        if recipe.model != self.loaded.identity:
            raise ModelError(
                f"this segmenter holds the model {self.loaded.identity[:16]}..., the run was planned with "
                f"{recipe.model[:16]}...; the model changed since the run was planned: run again"
            )
        if self.reader is not None:
            self.reader.close()
        self.store = ws.WorkStore(store_url, mode="r+")
        self.reader = tile_reader(self.store)
        self.done = self.store.array(ws.DONE)
        scene = self.store.attrs["scene"]
        self.grid = TileGrid(scene["width"], scene["height"], recipe.tile_size, recipe.halo)
        self.merger = merger_type(recipe.blend)(self.store, self.grid, probabilities=recipe.probabilities)
        self.job = (store_url, recipe)

    def _read_tile(self, index: int) -> tuple[Tile, np.ndarray, np.ndarray]:
        """One tile's normalised input (bands, S, S) float32 and validity (S, S), on a reader thread."""
        assert self.reader is not None and self.job is not None
        tile = self.grid.tile_at(index)
        pixels, ok = self.reader.read(tile)
        pixel_map = self.job[1].pixel_map
        if pixel_map is not None:
            pixels = pixel_map.apply(pixels)
        return tile, normalise(pixels, self.mean, self.std, ok), ok

    def _submit_reads(self, group: Sequence[int]) -> list[Future[tuple[Tile, np.ndarray, np.ndarray]]]:
        return [self.readers.submit(self._read_tile, i) for i in group]

    @staticmethod
    def _gather(
        reads: Sequence[Future[tuple[Tile, np.ndarray, np.ndarray]]],
    ) -> tuple[list[Tile], np.ndarray, np.ndarray]:
        done = [f.result() for f in reads]
        return [d[0] for d in done], np.stack([d[1] for d in done]), np.stack([d[2] for d in done])

    def _to_device(self, batch: np.ndarray) -> Any:
        """A batch (B, bands, S, S) as a tensor on the model's device: on a GPU through a pinned host buffer kept
        between batches (page-locked copies run asynchronously), channels-last."""
        torch = self.torch
        x = torch.from_numpy(batch)
        if self.device.type != "cuda":
            return x
        if self._pinned is None or self._pinned.shape != x.shape:
            self._pinned = torch.empty(x.shape, dtype=x.dtype).pin_memory()
        self._pinned.copy_(x)  # the previous batch's copy has finished: process() synchronises after each batch
        return self._pinned.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def _forward(self, batch: np.ndarray) -> Any:
        """The merger's scores (B, classes, S, S) of a normalised batch (B, bands, S, S), as a float32 tensor on
        the model's device."""
        torch = self.torch
        x = self._to_device(batch)
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                logits = self.model(x)
        else:
            with torch.inference_mode():
                logits = self.model(x)
        return self.merger.scores(logits)

    def _is_done(self, indices: Sequence[int]) -> bool:
        return all(self.done[divmod(i, self.grid.cols)] == 1 for i in indices)

    def process(self, store_url: str, recipe: Recipe, groups: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Segment the given groups of tiles (flat tile indices) of the scene in the work store at ``store_url``, as
        ``recipe`` says; each group is one batch.

        Groups whose tiles are all done already (a retried call after a crash) are skipped.

        Returns:
            Small stats: tiles computed, batches, seconds reading, computing and waiting on writes.
        """
        start = time.perf_counter()
        if self.failed is not None:
            raise self.failed
        self._open(store_url, recipe)
        todo = [list(g) for g in groups if not self._is_done(g)]
        stats: dict[str, Any] = {"tiles": 0, "batches": 0, "compute_s": 0.0, "wait_read_s": 0.0, "wait_write_s": 0.0}
        stats["node"] = _node_id()
        if not todo:
            return {**stats, "seconds": time.perf_counter() - start}
        reads = deque(self._submit_reads(g) for g in todo[:PREFETCH_BATCHES])
        pending_write: Future[None] | None = None
        for k in range(len(todo)):
            t0 = time.perf_counter()
            tiles, batch, valids = self._gather(reads.popleft())
            t1 = time.perf_counter()
            if k + PREFETCH_BATCHES < len(todo):
                reads.append(self._submit_reads(todo[k + PREFETCH_BATCHES]))
            scores = self._forward(batch)
            if self.device.type == "cuda":
                self.torch.cuda.synchronize()
            t2 = time.perf_counter()
            if pending_write is not None:
                pending_write.result()
            t3 = time.perf_counter()
            pending_write = self.writer.submit(self.merger.aggregate, tiles, scores, valids)
            stats["wait_read_s"] += t1 - t0
            stats["compute_s"] += t2 - t1
            stats["wait_write_s"] += t3 - t2
            stats["tiles"] += len(tiles)
            stats["batches"] += 1
        if pending_write is not None:
            pending_write.result()
        return {**stats, "seconds": time.perf_counter() - start}

    def placement(self) -> dict[str, Any]:
        """What this segmenter holds: its device (and the GPU's name), Ray's GPU ids for it, the
        ``CUDA_VISIBLE_DEVICES`` Ray set, its node and its torch threads."""
        ray = sys.modules.get("ray")
        ids = [str(g) for g in ray.get_gpu_ids()] if ray is not None and ray.is_initialized() else []
        cuda = self.device.type == "cuda"
        return {
            "device": str(self.device),
            "name": self.torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "gpu_ids": ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "node": _node_id(),
            "threads": self.torch.get_num_threads(),
        }

    def ping(self) -> str:
        """Readiness probe: ``device@host`` once the model is loaded; the model's error when it could not be."""
        if self.failed is not None:
            raise self.failed
        return f"{self.device}@{socket.gethostname()}"
