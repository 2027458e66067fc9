"""Where a segmenter's time per tile goes: each step of the tile path timed on its own, old and new side by side.

    python -m benchmarks.profile_tiles [--mp 64] [--model null] [--repeats 8] [--out benchmarks/results/tiles.json]

On a mirror tiling of real imagery (built as ``benchmarks.bench_pipeline`` builds its scenes), one tile input
(tile + halo of the model's metadata) at a time, torch threads = cores:

- read: the tile's window from the work store's copy (zarr, after ingest) and from the scene itself (GDAL, in
  place), each over ``--repeats`` different tiles (no block is read twice);
- normalise: the expression segpipe used before (``(x - mean) / std * valid``) and
  :func:`segpipe.core.pixels.normalise`;
- forward: the model's forward pass (the null model: a 1x1 convolution);
- class ids: ``torch.argmax`` over the class axis and :func:`segpipe.pipeline.merge.class_ids`;
- write: the class ids of one core into a zarr mask chunk, and its ``done`` flag.

Each figure is the median over the repeats, in milliseconds per tile. A cProfile of ``--profile-run`` tiles through
the in-process segmenter follows (its top functions by cumulative time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import bench_pipeline as bp
from segpipe.core.pixels import normalise
from segpipe.core.runtime import available_cores
from segpipe.core.tiles import TileGrid
from segpipe.models.checkpoint import load_model
from segpipe.pipeline import store as ws
from segpipe.pipeline.infer import ModelSpec, TileSegmenter
from segpipe.pipeline.ingest import index_scene, ingest
from segpipe.pipeline.merge import class_ids
from segpipe.pipeline.read import describe_scene
from segpipe.pipeline.recipe import Recipe
from segpipe.pipeline.scene import Selection
from segpipe.pipeline.tile_reader import SceneTiles, StoreTiles

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "tiles.json"


def _median_ms(fn: Callable[[int], Any], repeats: int) -> float:
    times = []
    for k in range(repeats):
        t = time.perf_counter()
        fn(k)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _steps(scene: str, model: str, repeats: int, work: Path) -> dict[str, float]:

    torch.set_num_threads(available_cores())
    loaded = load_model(model)
    meta = loaded.metadata
    info = describe_scene(scene)
    grid = TileGrid(info.width, info.height, meta.tile_size, meta.halo)
    store = ws.WorkStore(str(work / "store.zarr"))
    ingest(info, store, chunk_size=meta.tile_size)
    store.prepare_run("profile", grid, len(meta.classes), probabilities=False, tile_probabilities=False)
    tiles = [grid.tile_at(k * len(grid) // repeats) for k in range(repeats)]
    copy, direct = StoreTiles(store), SceneTiles(info)
    pixels, ok = direct.read(tiles[0])
    m = np.asarray(meta.mean, np.float32).reshape(-1, 1, 1)
    s = np.asarray(meta.std, np.float32).reshape(-1, 1, 1)
    x = torch.from_numpy(normalise(pixels, meta.mean, meta.std, ok))[None]
    with torch.inference_mode():
        logits = loaded.module(x).float()
    t, h = meta.tile_size, meta.halo
    core = logits[:, :, h : h + t, h : h + t]
    ids = class_ids(core)[0].numpy()
    mask, done = store.array(ws.MASK), store.array(ws.DONE)

    def forward(_: int) -> None:
        with torch.inference_mode():
            loaded.module(x)

    def write(k: int) -> None:
        tile = tiles[k]
        w = tile.core
        mask[w.row_slice, w.col_slice] = ids[: w.height, : w.width]

    try:
        return {
            "read from the store's copy (zarr)": _median_ms(lambda k: copy.read(tiles[k]), repeats),
            "read in place (GDAL window)": _median_ms(lambda k: direct.read(tiles[(k + 1) % repeats]), repeats),
            "normalise, before": _median_ms(
                lambda k: (pixels.astype(np.float32) - m) / s * ok[None].astype(np.float32), repeats
            ),
            "normalise, now": _median_ms(lambda k: normalise(pixels, meta.mean, meta.std, ok), repeats),
            f"forward ({meta.architecture})": _median_ms(forward, repeats),
            "class ids, torch.argmax": _median_ms(lambda k: torch.argmax(core, dim=1).to(torch.uint8), repeats),
            "class ids, running maximum": _median_ms(lambda k: class_ids(core), repeats),
            "write the mask chunk (zarr)": _median_ms(write, repeats),
            "write the done flag": _median_ms(lambda k: done.__setitem__(divmod(k, grid.cols), 1), repeats),
        }
    finally:
        direct.close()


def _profile(scene: str, model: str, tiles: int, work: Path) -> str:
    """cProfile of ``tiles`` tiles through the in-process segmenter (scene read in place)."""

    segmenter = TileSegmenter(ModelSpec(model, None, "cpu", available_cores()))
    meta = segmenter.loaded.metadata
    info = describe_scene(scene)
    store = ws.WorkStore(str(work / "profile.zarr"))
    index_scene(info, store, chunk_size=meta.tile_size)

    grid = TileGrid(info.width, info.height, meta.tile_size, meta.halo)
    recipe = Recipe(
        model=segmenter.loaded.identity, tile_size=meta.tile_size, halo=meta.halo, blend="crop", batch_size=1,
        probabilities=False, selection=Selection(), scaling=None,
    )  # fmt: skip
    store.prepare_run(recipe.digest(), grid, len(meta.classes), probabilities=False, tile_probabilities=False)
    profiler = cProfile.Profile()
    profiler.enable()
    stats = segmenter.process(store.url, recipe, [[i] for i in range(min(tiles, len(grid)))])
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(20)
    return json.dumps(stats) + "\n" + out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_tiles", description=__doc__.split("\n\n")[0])
    p.add_argument("--mp", type=float, default=64.0, help="scene size, nominal megapixels (default 64)")
    p.add_argument("--model", default="null", help="model (default: the null model)")
    p.add_argument("--repeats", type=int, default=8, help="tiles timed per step (default 8)")
    p.add_argument("--profile-run", type=int, default=16, help="tiles through the segmenter under cProfile")
    p.add_argument("--source", type=Path, default=bp.DEFAULT_SOURCE, help="real image to mirror-tile")
    p.add_argument("--scratch", type=Path, default=bp.DEFAULT_SCRATCH, help="scene cache")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    args = p.parse_args(argv)
    scene, _ = bp.build_scene(args.source, bp.scene_side(args.mp), args.scratch / "scenes")
    with tempfile.TemporaryDirectory(prefix="segpipe-tiles-") as tmp:
        steps = _steps(str(scene), args.model, args.repeats, Path(tmp))
        profile = _profile(str(scene), args.model, args.profile_run, Path(tmp))
    machine = bp.machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; scene {scene}; model {args.model}")
    print("| step | ms per tile |\n|---|---:|")
    for name, ms in steps.items():
        print(f"| {name} | {ms:.1f} |")
    print(profile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine, "scene": str(scene), "model": args.model, "ms_per_tile": steps, "profile": profile}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
