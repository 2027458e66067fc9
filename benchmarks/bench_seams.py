"""Seam study: how far tiled inference is from whole-image inference, per tile size, halo and blend.

    python -m benchmarks.bench_seams [--scene PATH] [--side 2048] [--configs 512:64,512:128,1024:64,512:0]
        [--model default] [--margin 256] [--threads N] [--out benchmarks/results/seams.json]

The model runs once on the whole scene (a ``side`` x ``side`` window of ``--scene``, default the real aerial
image ``../shared/data/rasterio/cogeo.tif`` mirror-tiled to 2048 x 2048 px) and once per tile of each
``tile:halo`` configuration, with segpipe's own tiling (:class:`segpipe.core.tiles.TileGrid`), tile reads
(:func:`segpipe.core.tiles.read_tile_input`, mirror padding at the scene edge), normalisation and blending
(:func:`segpipe.pipeline.stitch.blend_core`). Both blends of a configuration use the same tile predictions. Reported:
the share of pixels whose class differs from whole-image inference, in the interior (``--margin`` px away from
the scene edge, where whole-image inference sees real context and tiles see mirrored context) and overall, and
the forward seconds of the tiles (compute cost of the halo).

What it answers: the cheapest halo and blend that are as close to whole-image inference as any. Prints a
markdown table and writes JSON. Not a timing benchmark: run it anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from torch import nn

from benchmarks.bench_pipeline import mirror_indices
from segpipe.core.blend import weights_2d
from segpipe.core.pixels import normalise
from segpipe.core.tiles import Tile, TileGrid, read_tile_input
from segpipe.models.checkpoint import load_model
from segpipe.models.metadata import ModelMetadata
from segpipe.pipeline.stitch import blend_core

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "rasterio" / "cogeo.tif"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "seams.json"

#: Tile predictions of a configuration: (row, col) -> (tile, softmax (classes, S, S) over the tile's input).
Predictions = dict[tuple[int, int], tuple[Tile, np.ndarray]]


def mirrored(source: Path, side: int) -> np.ndarray:
    """A (bands, side, side) scene: ``source`` mirror-tiled as the pipeline benchmark's scenes are
    (:func:`benchmarks.bench_pipeline.mirror_indices`), held in memory."""
    with rasterio.open(source) as src:
        data = src.read()
    _, h, w = data.shape
    return np.ascontiguousarray(data[:, mirror_indices(0, side, h)][:, :, mirror_indices(0, side, w)])


def parse_configs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        tile, _, halo = item.partition(":")
        out.append((int(tile), int(halo)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_seams", description=__doc__.split("\n")[0])
    p.add_argument("--scene", type=Path, default=DEFAULT_SOURCE, help="real image, mirror-tiled to --side")
    p.add_argument("--side", type=int, default=2048, help="scene side in pixels (a multiple of every tile size)")
    p.add_argument("--configs", type=parse_configs, default=parse_configs("512:64,512:128,1024:64,1024:32,512:0"))
    p.add_argument("--model", default="default")
    p.add_argument("--margin", type=int, default=256, help="interior = this many pixels away from the edge")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    scene = mirrored(args.scene, args.side)
    valid = np.ones(scene.shape[1:], dtype=np.uint8)
    t = time.perf_counter()
    reference = softmax(loaded.module, normalise(scene, loaded.metadata.mean, loaded.metadata.std, valid)).argmax(0)
    reference_s = time.perf_counter() - t
    m = args.margin
    inner = (slice(m, args.side - m), slice(m, args.side - m))
    rows: list[dict[str, Any]] = []
    for tile_size, halo in args.configs:
        grid = TileGrid(args.side, args.side, tile_size, halo)
        t = time.perf_counter()
        predictions = tile_predictions(loaded.module, loaded.metadata, scene, valid, grid)
        seconds = time.perf_counter() - t
        for blend in ("crop", "cosine"):
            if blend == "cosine" and halo == 0:
                continue  # no overlap: identical to crop
            out = stitched(grid, predictions, blend, args.side)
            rows.append(
                {
                    "tile_size": tile_size,
                    "halo": halo,
                    "blend": blend,
                    "compute_factor": (grid.input_size / tile_size) ** 2,
                    "disagreement_interior": float((out[inner] != reference[inner]).mean()),
                    "disagreement_all": float((out != reference).mean()),
                    "forward_seconds": seconds,
                }
            )
    print(table(rows))
    result = {
        "benchmark": "seams",
        "command": ["python", "-m", "benchmarks.bench_seams", *(argv if argv is not None else sys.argv[1:])],
        "scene": {"source": str(args.scene), "side": args.side, "mirror_tiled": True},
        "model": {"name": args.model, "sha256": loaded.checksum},
        "margin": m,
        "reference_seconds": reference_s,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def softmax(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The model's class probabilities (classes, H, W) of one normalised image (bands, H, W)."""
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(x)[None]).float(), dim=1)[0].numpy()


def tile_predictions(
    model: nn.Module, meta: ModelMetadata, scene: np.ndarray, valid: np.ndarray, grid: TileGrid
) -> Predictions:
    """Every tile's softmax, each tile read with its halo as segpipe reads it (mirror-padded at the edge)."""
    predictions = {}
    for tile in grid:
        pixels, ok = read_tile_input(scene, valid, tile)
        predictions[(tile.row, tile.col)] = (tile, softmax(model, normalise(pixels, meta.mean, meta.std, ok)))
    return predictions


def stitched(grid: TileGrid, predictions: Predictions, blend: str, side: int) -> np.ndarray:
    """The class ids (side, side) of the tile predictions merged as ``blend`` merges them: each tile's core
    (``crop``), or the weighted mean of the overlapping tiles (``cosine``)."""
    out = np.zeros((side, side), dtype=np.uint8)
    weights = weights_2d(grid.input_size, grid.halo, blend)
    for tile in grid:
        if blend == "crop":
            c = tile.core_in_input
            probs = predictions[(tile.row, tile.col)][1][:, c.row_slice, c.col_slice]
        else:
            near = {(n.row, n.col): predictions[(n.row, n.col)] for n in grid.neighbours(tile.row, tile.col)}
            probs = blend_core(tile, near, weights)
        out[tile.core.row_slice, tile.core.col_slice] = probs.argmax(0)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| tile | halo | blend | compute x | differs (interior) | differs (all) | tile forwards (s) |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tile_size']} | {r['halo']} | {r['blend']} | {r['compute_factor']:.2f} | "
            f"{100 * r['disagreement_interior']:.2f} % | {100 * r['disagreement_all']:.2f} % | "
            f"{r['forward_seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
