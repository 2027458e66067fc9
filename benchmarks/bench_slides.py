"""Whole-slide images at a gigapixel: tissue detection, background tiles skipped, peak memory (issue 18).

    python -m benchmarks.bench_slides [--gigapixels 1.0] [--crops 0.025,0.1] [--coarse 2um]
        [--out benchmarks/results/slides.json] [--scratch /tmp/segpipe-bench] [--skip-runs]

1. **Slide.** A pyramidal tiled TIFF mirror-tiled from the two real Aperio regions in ``../shared/data/wsi``: a cell
   of ``cmu_small_region.svs`` (Aperio JPEG, 0.499 um/px; 2176 x 2944 of its 2220 x 2967) beside the middle 4416 x
   2944 of ``tcga-cr-7395-01a-01-ts1.svs`` (JPEG 2000, 4443 x 3567; its unscanned corners composited onto white
   glass), with 2048 px of the CMU region's own bare glass right and below (8640 x 4992 in all), read at level 0 with
   OpenSlide, tiled endlessly with alternate flips (numpy's "symmetric"), so every edge between copies matches:
   islands of two sections each, 4096 px of glass between them, as on a slide of serial sections. Nominal size N
   gigapixels is a square of ``sqrt(N) * 32768`` px rounded to 512 (1.0 -> 32768 x 32768, 1.07 GP; 0.1 -> 10240, 105
   MP; 0.025 -> 5120, 26 MP: the smaller ones are crops of the top left corner of the larger). Levels by 4 down to
   512 px or less, 512 x 512 tiles, DEFLATE (level 1) with horizontal predictor, lossless; pixel size 0.499 um in the
   resolution tags (cm), which OpenSlide's generic-tiff reads as ``openslide.mpp-x``. The cell's sides are multiples
   of 64, so each coarser level is exactly the 4 x 4 area mean of level 0 (the mirror tiling of the cell's mean).
   Written tile by tile from an iterator (memory: the cell and one tile), cached under the scratch directory with a
   JSON sidecar.
2. **Tissue detection alone** on the largest slide, in a fresh process: ``SlideSource(...).tissue`` (what a run
   does once per process: a thumbnail of about 16 um/px read block by block, Otsu on saturation, dilation). Time,
   the process's peak RSS, the tissue share of the scanned area, and the share of the model's tiles (1024 px
   cores) with no tissue at level 0 and at the coarse resolution: the tiles a run would skip.
3. **End to end**: ``segpipe run SLIDE OUT.ome.tif --no-prefect --executor local --device cpu --json`` in a
   subprocess, with ``--tissue otsu`` and ``--tissue none``, on the crops at ``--resolution 0.5um`` (level 0 as it
   is) and on the whole slide at ``--coarse`` (2um: level 1 as it is, 1/16 of the pixels), so the whole gigapixel
   slide goes end to end. Wall time (process start to exit), tiles computed and skipped (from the summary), and
   the peak RSS and PSS of the process tree (sampled, ``bench_pipeline.TreeMemorySampler``).

A full level-0 inference of a gigapixel with the shipped model on 2 CPU cores (about 1 MP/s per core) would take
hours; the crops and the coarse run show how time and memory grow with the pixels processed instead. Run it under
``nice -n 19`` beside other work. Prints a table and writes JSON with the machine's description.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_cluster import ENV, REPO, SHARED, machine
from benchmarks.bench_pipeline import DEFAULT_SCRATCH, mirror_indices, run_measured
from segpipe.core.files import sha256_file

OUT = REPO / "benchmarks" / "results" / "slides.json"
WSI = SHARED / "wsi"
CMU = WSI / "cmu_small_region.svs"
TCGA = WSI / "tcga-cr-7395-01a-01-ts1.svs"
MPP = 0.499
TILE = 512
LEVEL_STEP = 4
CELL_MULTIPLE = 64  # LEVEL_STEP ** 3: levels 1-3 are exact means of level 0
SLIDE_VERSION = 2  # bump when the slide builder changes what it writes
GLASS = 242  # white-ish glass behind the unscanned corners of the TCGA region
GLASS_MARGIN = 2048  # px of glass right of and below the two regions in the cell
GLASS_PATCH = (2000, 50)  # (row, col) of a 512 px patch of bare glass in the CMU region (saturation <= 18)
MIB = 1024**2


# --------------------------------------------------------------------------------------------------- slide


def slide_side(gigapixels: float) -> int:
    """Side of the square slide of a nominal size: ``sqrt(gigapixels) * 32768`` rounded to a tile (512)."""
    if gigapixels <= 0:
        raise ValueError(f"gigapixels must be > 0, got {gigapixels}")
    return max(TILE, round(math.sqrt(gigapixels) * 32768 / TILE) * TILE)


def _level0(path: Path) -> np.ndarray:
    """Level 0 of a slide as (h, w, 3) uint8, transparent (unscanned) pixels composited onto glass."""
    import openslide  # lazy: the tissue worker's process imports nothing before its timer (import_seconds)

    slide = openslide.OpenSlide(str(path))
    try:
        rgba = np.asarray(slide.read_region((0, 0), 0, slide.level_dimensions[0]))
    finally:
        slide.close()
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgba[..., :3] * alpha + GLASS * (255 - alpha)) // 255).astype(np.uint8)


def build_cell() -> np.ndarray:
    """The mirror tiling's unit, (4992, 8640, 3) uint8: the CMU region beside the middle of the TCGA region, with
    :data:`GLASS_MARGIN` px of real glass (a 512 px patch of the CMU region's, itself mirror-tiled) right and
    below."""
    cmu, tcga = _level0(CMU), _level0(TCGA)
    height = min(cmu.shape[0], tcga.shape[0]) // CELL_MULTIPLE * CELL_MULTIPLE
    parts = []
    for image in (cmu, tcga):
        width = image.shape[1] // CELL_MULTIPLE * CELL_MULTIPLE
        top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
        parts.append(image[top : top + height, left : left + width])
    tissue = np.concatenate(parts, axis=1)
    y, x = GLASS_PATCH
    patch = cmu[y : y + TILE, x : x + TILE]
    rows = mirror_indices(0, height + GLASS_MARGIN, TILE)
    cols = mirror_indices(0, tissue.shape[1] + GLASS_MARGIN, TILE)
    cell = patch[np.ix_(rows, cols)]
    cell[:height, : tissue.shape[1]] = tissue
    return cell


def downsample(image: np.ndarray, step: int) -> np.ndarray:
    """Area mean of ``step`` x ``step`` blocks (sides divisible by ``step``), rounded."""
    h, w, c = image.shape
    blocks = image.reshape(h // step, step, w // step, step, c).astype(np.uint32)
    return ((blocks.sum(axis=(1, 3)) + step * step // 2) // (step * step)).astype(np.uint8)


def tiles(cell: np.ndarray, side: int) -> Iterator[np.ndarray]:
    """The ``side`` x ``side`` mirror tiling of ``cell`` in 512 x 512 tiles, row by row (edge tiles padded)."""
    height, width = cell.shape[:2]
    for r0 in range(0, side, TILE):
        rows = mirror_indices(r0, min(TILE, side - r0), height)
        for c0 in range(0, side, TILE):
            cols = mirror_indices(c0, min(TILE, side - c0), width)
            tile = cell[np.ix_(rows, cols)]
            if tile.shape[:2] != (TILE, TILE):
                tile = np.pad(tile, ((0, TILE - tile.shape[0]), (0, TILE - tile.shape[1]), (0, 0)), mode="edge")
            yield tile


def level_sides(side: int) -> list[int]:
    """Level sides: level 0, then by 4 while the previous level is larger than a tile."""
    sides = [side]
    while sides[-1] > TILE and sides[-1] % LEVEL_STEP == 0:
        sides.append(sides[-1] // LEVEL_STEP)
    return sides


def build_slide(side: int, scratch: Path, cell: list[np.ndarray]) -> tuple[Path, bool, float]:
    """Write (or reuse) the ``side`` x ``side`` slide; ``cell`` is filled with the unit on first need.

    Returns:
        ``(path, reused, seconds)``.
    """
    import tifffile  # lazy: the tissue worker's process imports nothing before its timer (import_seconds)

    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"slide-mirror-{side}x{side}.tiff"
    sidecar = path.with_name(path.name + ".json")
    spec = {
        "sources": {p.name: sha256_file(p) for p in (CMU, TCGA)},
        "side": side,
        "levels": level_sides(side),
        "tiling": "mirror (numpy 'symmetric') of cmu 2176x2944 | tcga 4416x2944 (middle crops) + 2048 px glass",
        "tile": TILE,
        "compress": "zlib level 1, horizontal predictor",
        "mpp": MPP,
        "version": SLIDE_VERSION,
    }
    if path.is_file() and sidecar.is_file():
        with contextlib.suppress(ValueError):
            if json.loads(sidecar.read_text()) == spec:
                return path, True, 0.0
    started = time.perf_counter()
    if not cell:
        cell.append(build_cell())
    tmp = path.with_name(f".{path.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            for level, level_side in enumerate(spec["levels"]):
                step = LEVEL_STEP**level
                unit = cell[0] if level == 0 else downsample(cell[0], step)
                tif.write(
                    tiles(unit, level_side),
                    shape=(level_side, level_side, 3),
                    dtype=np.uint8,
                    tile=(TILE, TILE),
                    photometric="rgb",
                    compression="zlib",
                    compressionargs={"level": 1},
                    predictor=True,
                    resolution=(1e4 / (MPP * step), 1e4 / (MPP * step)),
                    resolutionunit="CENTIMETER",
                    subfiletype=1 if level else 0,
                    description=f"segpipe benchmark slide (mirror tiling of real Aperio regions); MPP = {MPP}",
                    metadata=None,
                )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar.write_text(json.dumps(spec, indent=2) + "\n")
    return path, False, time.perf_counter() - started


# --------------------------------------------------------------------------------------------------- tissue


def background_tiles(mask: np.ndarray, mask_factor: float, grid: tuple[int, int], factor: float, tile: int) -> dict:
    """Tiles of ``tile`` px cores on a scene grid of ``factor`` level-0 px per pixel (``grid`` = width, height)
    whose pixel centres all fall on background of the tissue ``mask`` (``mask_factor`` level-0 px per cell): the
    tiles a run skips."""
    sat = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table
    width, height = grid
    last_row, last_col = mask.shape[0] - 1, mask.shape[1] - 1
    total = skipped = 0
    for y in range(0, height, tile):
        h = min(tile, height - y)
        r0 = min(int(((y + 0.5) * factor) // mask_factor), last_row)
        r1 = min(int(((y + h - 0.5) * factor) // mask_factor), last_row)
        for x in range(0, width, tile):
            w = min(tile, width - x)
            c0 = min(int(((x + 0.5) * factor) // mask_factor), last_col)
            c1 = min(int(((x + w - 0.5) * factor) // mask_factor), last_col)
            tissue = sat[r1 + 1, c1 + 1] - sat[r0, c1 + 1] - sat[r1 + 1, c0] + sat[r0, c0]
            total += 1
            skipped += int(tissue == 0)
    return {"tile": tile, "factor": factor, "grid": [width, height], "tiles": total, "background": skipped}


def _hwm_kib() -> int:
    """This process's peak RSS in KiB (VmHWM: unlike ``ru_maxrss``, not inherited from the parent at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def tissue_worker(path: str, resolutions: list[float], tile: int) -> dict[str, Any]:
    """In a fresh process: the tissue detection a run does, timed, with the background tiles per grid."""
    started = time.perf_counter()
    from segpipe.core.pyramid import plan_read  # lazy: timed, the worker's import_seconds
    from segpipe.pipeline.scene import Selection  # lazy: timed, the worker's import_seconds
    from segpipe.pipeline.sources.slide import SlideSource  # lazy: timed, the worker's import_seconds

    imported = time.perf_counter()
    with SlideSource(path, Selection(tissue="otsu")) as src:
        tissue = src.tissue
        pyramid = src.pyramid
    seconds = time.perf_counter() - imported
    assert tissue is not None
    grids = []
    for resolution in resolutions:
        plan = plan_read(pyramid, resolution)
        grids.append({"resolution_um": resolution, **background_tiles(
            tissue.mask, tissue.factor, (plan.width, plan.height), plan.factor, tile
        )})  # fmt: skip
    return {
        "seconds": round(seconds, 2),
        "import_seconds": round(imported - started, 2),
        "peak_rss_mib": round(_hwm_kib() / 1024, 1),
        "mask_shape": list(tissue.mask.shape),
        "mask_factor": round(tissue.factor, 3),
        "threshold": tissue.threshold,
        "tissue_share": round(tissue.share, 4),
        "grids": grids,
    }


# --------------------------------------------------------------------------------------------------- runs


def segpipe_run(slide: Path, out: Path, resolution: str, tissue: str) -> dict[str, Any]:
    cmd = [
        str(Path(sys.executable).with_name("segpipe")), "run", str(slide), str(out), "--no-prefect",
        "--executor", "local", "--device", "cpu", "--json", "--overwrite",
        "--resolution", resolution, "--tissue", tissue,
    ]  # fmt: skip
    measured = run_measured(cmd, env=ENV)
    if measured.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed: {measured.stderr.strip()[-800:]}")
    summary = json.loads(measured.stdout)
    tiles_ = summary["tiles"]
    scene = summary["scene"]
    pixels = int(scene["width"]) * int(scene["height"])
    return {
        "resolution": resolution,
        "tissue": tissue,
        "grid": [scene["width"], scene["height"]],
        "megapixels": round(pixels / 1e6, 2),
        "wall_s": round(measured.seconds, 1),
        "mp_per_s": round(pixels / 1e6 / measured.seconds, 3),
        "tiles": tiles_,
        "peak_rss_mib": round(measured.peak_bytes / MIB),
        "peak_pss_mib": round(measured.peak_pss_bytes / MIB),
        "peak_processes": measured.peak_processes,
        "output_mib": round(out.stat().st_size / MIB, 1),
        "summary": summary,
    }


def _fmt_share(part: int, whole: int) -> str:
    return f"{part} of {whole} ({part / whole:.0%})" if whole else "-"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_slides", description=__doc__.split("\n")[0])
    parser.add_argument("--gigapixels", type=float, default=1.0, help="nominal size of the whole slide")
    parser.add_argument("--crops", default="0.025,0.1", help="nominal gigapixels of the crops run at level 0")
    parser.add_argument("--coarse", default="2um", help="resolution of the whole slide's end-to-end run")
    parser.add_argument("--tile", type=int, default=1024, help="the model's tile core (for the background share)")
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH / "slides")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--skip-runs", action="store_true", help="only build the slide and detect tissue")
    parser.add_argument("--_tissue", dest="tissue_path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_resolutions", dest="resolutions", default="0.5,2", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tissue_path:  # the worker of step 2
        resolutions = [float(v) for v in args.resolutions.split(",")]
        print(json.dumps(tissue_worker(args.tissue_path, resolutions, args.tile)))
        return 0
    crops = [float(v) for v in args.crops.split(",") if v.strip()]
    coarse = float(args.coarse.removesuffix("um"))
    report: dict[str, Any] = {"machine": machine(), "load_average": list(os.getloadavg()), "slides": [], "runs": []}
    started = time.perf_counter()
    slides = build_slides(sorted({*crops, args.gigapixels}), args.scratch, report["slides"])
    measured = run_measured(
        [sys.executable, "-m", "benchmarks.bench_slides", "--_tissue", str(slides[args.gigapixels]), "--tile",
         str(args.tile), "--_resolutions", f"0.5,{coarse:g}"], env=ENV,
    )  # fmt: skip
    if measured.returncode != 0:
        print(measured.stderr[-2000:])
        return 1
    tissue = json.loads(measured.stdout)
    tissue.update(wall_s=round(measured.seconds, 2), sampled_peak_rss_mib=round(measured.peak_bytes / MIB))
    report["tissue"] = tissue
    print(f"tissue detection: {tissue['seconds']} s, {tissue['tissue_share']:.1%} tissue", flush=True)
    if not args.skip_runs:
        plan = [(gp, "0.5um") for gp in crops if gp != args.gigapixels] + [(args.gigapixels, f"{coarse:g}um")]
        report["runs"] = end_to_end(slides, plan)
    report["total_s"] = round(time.perf_counter() - started, 1)
    whole = next(s for s in report["slides"] if s["gigapixels"] == args.gigapixels)
    lines = tissue_table(whole, tissue, args.tile) + (runs_table(report["runs"]) if report["runs"] else [])
    print("\n".join(lines))
    report["table"] = lines
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_s']:.0f} s in all)")
    return 0


def build_slides(sizes: list[float], scratch: Path, rows: list[dict[str, Any]]) -> dict[float, Path]:
    """Build (or reuse) a slide of each nominal size (gigapixels); append each one's row to ``rows``."""
    cell: list[np.ndarray] = []
    slides: dict[float, Path] = {}
    for gp in sizes:
        side = slide_side(gp)
        path, reused, seconds = build_slide(side, scratch, cell)
        slides[gp] = path
        row = {"gigapixels": gp, "side": side, "megapixels": round(side * side / 1e6, 1), "path": str(path),
               "levels": level_sides(side), "file_mib": round(path.stat().st_size / MIB, 1),
               "reused": reused, "build_s": round(seconds, 1)}  # fmt: skip
        rows.append(row)
        print(f"slide {side} x {side}: {row['file_mib']} MiB, {'reused' if reused else f'built in {seconds:.0f} s'}",
              flush=True)  # fmt: skip
    return slides


def end_to_end(slides: dict[float, Path], plan: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """``segpipe run`` of each (slide, resolution) of ``plan``, with tissue detection and without."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-slides-") as tmp:
        for gp, resolution in plan:
            for mode in ("otsu", "none"):
                row = segpipe_run(slides[gp], Path(tmp) / "mask.ome.tif", resolution, mode)
                row["gigapixels"] = gp
                rows.append(row)
                t = row["tiles"]
                print(
                    f"run {gp:g} GP at {resolution}, tissue {mode}: {row['wall_s']} s, "
                    f"{t['skipped_nodata']} of {t['total']} tiles skipped, peak RSS {row['peak_rss_mib']} MiB",
                    flush=True,
                )
    return rows


def tissue_table(whole: dict[str, Any], tissue: dict[str, Any], tile: int) -> list[str]:
    """The lines of the tissue detection's table (Markdown), on the whole slide ``whole``."""
    lines = [
        f"Tissue detection alone on the {whole['side']} x {whole['side']} slide "
        f"({whole['megapixels'] / 1000:.2f} GP, {whole['file_mib'] / 1024:.2f} GiB on disk):",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| time (process start excluded) | {tissue['seconds']:.1f} s |",
        f"| peak RSS of the process (imports included) | {tissue['peak_rss_mib']:.0f} MiB |",
        f"| mask | {tissue['mask_shape'][1]} x {tissue['mask_shape'][0]} ({tissue['mask_factor']:g} level-0 px each) |",
        f"| tissue share of the slide (threshold {tissue['threshold']}) | {tissue['tissue_share']:.1%} |",
    ]
    for grid in tissue["grids"]:
        lines.append(
            f"| {tile} px tiles without tissue at {grid['resolution_um']:g} um "
            f"({grid['grid'][0]} x {grid['grid'][1]}) | {_fmt_share(grid['background'], grid['tiles'])} |"
        )
    return lines


def runs_table(runs: list[dict[str, Any]]) -> list[str]:
    """The lines of the end-to-end runs' table (Markdown), after a blank line."""
    lines = [
        "",
        "| slide | read at | grid (MP) | tissue | tiles computed | tiles skipped | wall (s) | MP/s | "
        "peak RSS (MiB) | peak PSS (MiB) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in runs:
        t = row["tiles"]
        side = slide_side(row["gigapixels"])
        lines.append(
            f"| {side} x {side} | {row['resolution']} | {row['megapixels']:.1f} | {row['tissue']} | "
            f"{t['computed']} | {_fmt_share(t['skipped_nodata'], t['total'])} | {row['wall_s']:.1f} | "
            f"{row['mp_per_s']:.2f} | {row['peak_rss_mib']} | {row['peak_pss_mib']} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
