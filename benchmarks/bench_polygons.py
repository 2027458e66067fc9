"""Polygonising a 268 MP mask (``--vector``): time and peak memory, and how memory grows with the mask (issue 18).

    python -m benchmarks.bench_polygons [--sides 4096,8192,16384] [--series as-segmented,water-as-nodata]
        [--block 2048] [--out benchmarks/results/polygons.json] [--scratch /tmp/segpipe-bench]

1. **Source mask.** The shipped model's mask of a real aerial image (``../shared/data/rasterio/cogeo.tif``, 1024 x
   1024 RGB, 0.6 m, EPSG:3857): ``segpipe run cogeo.tif mask.tif --no-prefect --executor local --device cpu``, run
   once and cached under the scratch directory (a JSON sidecar records the source's and the model's checksums).
2. **Masks.** Square mirror tilings of that mask (numpy's "symmetric": flipped alternately, so regions continue
   across every copy's edge) of 4096, 8192 and 16384 px per side (16.8, 67 and 268 MP), on the source's CRS,
   origin and pixel size, with its class names (band tags) and colour table: written window by window (2048 px)
   into a tiled GeoTIFF, then copied by GDAL's COG driver (512 px blocks, DEFLATE, mode overviews), as segpipe's
   export writes a mask. Cached with a sidecar. Two series: ``as-segmented``, and ``water-as-nodata``, the same
   masks with the class ``water`` made nodata (255). Why the second: in the source mask one water region (48 % of
   its pixels, 187 holes) touches all four edges, so in every mirror tiling it is a single polygon across the whole
   mask, whose pieces the polygoniser must hold until the last row (it crosses the lower edge of every row of
   blocks) and union at the end; any class that covers a scene in one connected piece (a background class) does the
   same. Without water no polygon spans the mask, and memory is bounded by a row of blocks and the polygons crossing
   it.
3. **Polygonising**: :func:`segpipe.pipeline.sinks.vector.write_vector` (what ``--vector`` runs after the mask is
   written: GDAL's polygoniser block by block, cut polygons grouped and each unioned once, features written to a
   GeoPackage in batches) in a fresh process per mask. Time of the call, features written, the file's size, and
   memory: the process's peak RSS (VmHWM) and its RSS before the call (the imports: numpy, rasterio, shapely,
   pyogrio), and the peak RSS and PSS of the process sampled every 0.2 s from outside
   (``bench_pipeline.TreeMemorySampler``).

Run it under ``nice -n 19`` beside other work. Prints a table and writes JSON with the machine's description; a
series not run this time (``--series``) is kept from the existing JSON file (with the same ``--block``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import rasterio
import rasterio.shutil
from rasterio.windows import Window

from benchmarks.bench_cluster import ENV, REPO, SHARED, machine
from benchmarks.bench_pipeline import DEFAULT_SCRATCH, mirror_indices, run_measured
from segpipe.core.files import sha256_file
from segpipe.pipeline.sinks.vector import write_vector

OUT = REPO / "benchmarks" / "results" / "polygons.json"
SOURCE = SHARED / "rasterio" / "cogeo.tif"
MODEL = REPO / "models" / "weights" / "default.safetensors"
MASK_VERSION = 1  # bump when the mask builder changes what it writes
WINDOW = 2048
WATER = 4  # the shipped model's class id of "water"
#: Mask series: name -> the class made nodata (None: the mask as segmented).
SERIES: dict[str, int | None] = {"as-segmented": None, "water-as-nodata": WATER}
MIB = 1024**2


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM; VmHWM is not inherited from the parent at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _cached(path: Path, spec: dict[str, Any]) -> bool:
    sidecar = path.with_name(path.name + ".json")
    if path.is_file() and sidecar.is_file():
        with contextlib.suppress(ValueError):
            return bool(json.loads(sidecar.read_text()) == spec)
    return False


def source_mask(scratch: Path) -> tuple[Path, float]:
    """The shipped model's mask of ``cogeo.tif`` (segmented once, then reused): (path, seconds it took)."""
    path = scratch / "cogeo-mask.tif"
    spec = {"source": sha256_file(SOURCE), "model": sha256_file(MODEL), "version": MASK_VERSION}
    if _cached(path, spec):
        return path, 0.0
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cmd = [
        str(Path(sys.executable).with_name("segpipe")), "run", str(SOURCE), str(path), "--no-prefect",
        "--executor", "local", "--device", "cpu", "--overwrite",
    ]  # fmt: skip

    subprocess.run(cmd, check=True, env=ENV, capture_output=True)
    path.with_name(path.name + ".json").write_text(json.dumps(spec, indent=2) + "\n")
    return path, time.perf_counter() - started


def build_mask(source: Path, side: int, scratch: Path, *, drop: int | None = None) -> tuple[Path, bool, float]:
    """Write (or reuse) the ``side`` x ``side`` mirror tiling of the mask ``source`` as a COG (see the module
    docstring), class ``drop`` (if any) made nodata: (path, reused, seconds). Memory: the source mask and one
    window."""

    path = scratch / f"mask-mirror-{side}x{side}{'' if drop is None else f'-no{drop}'}.tif"
    spec: dict[str, Any] = {"source": sha256_file(source), "side": side, "window": WINDOW, "version": MASK_VERSION}
    if drop is not None:
        spec["drop"] = drop
    if _cached(path, spec):
        return path, True, 0.0
    started = time.perf_counter()
    with rasterio.open(source) as src:
        data = src.read(1)
        profile = src.profile
        tags, band_tags = src.tags(), src.tags(1)
        colormap = src.colormap(1)
    if drop is not None:
        data[data == drop] = 255
    height, width = data.shape
    profile.update(
        driver="GTiff", width=side, height=side, tiled=True, blockxsize=512, blockysize=512, compress="DEFLATE"
    )
    for key in ("blocksize", "overview_resampling"):
        profile.pop(key, None)
    tmp = path.with_name(f".{path.name}.partial.tif")
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.update_tags(**tags)
            dst.update_tags(1, **band_tags)
            dst.write_colormap(1, colormap)
            for r0 in range(0, side, WINDOW):
                rows = mirror_indices(r0, min(WINDOW, side - r0), height)
                for c0 in range(0, side, WINDOW):
                    cols = mirror_indices(c0, min(WINDOW, side - c0), width)
                    block = data[rows][:, cols]
                    dst.write(block, 1, window=Window(c0, r0, block.shape[1], block.shape[0]))
        with rasterio.Env(GDAL_CACHEMAX=64):
            rasterio.shutil.copy(
                tmp, path, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE="512", OVERVIEW_RESAMPLING="MODE",
                NUM_THREADS="1",
            )  # fmt: skip
    finally:
        tmp.unlink(missing_ok=True)
    path.with_name(path.name + ".json").write_text(json.dumps(spec, indent=2) + "\n")
    return path, False, time.perf_counter() - started


def worker(mask: str, output: str, block: int) -> dict[str, Any]:
    """In a fresh process: ``write_vector`` of ``mask`` into ``output``, timed, with this process's memory."""

    before = _status_kib("VmRSS")
    started = time.perf_counter()
    result = write_vector(mask, output, block=block)
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "features": result.features,
        "features_by_class": {str(k): v for k, v in result.histogram.items()},
        "output_mib": round(result.bytes / MIB, 1),
        "rss_before_mib": round(before / 1024, 1),
        "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
    }


def polygonise(mask: Path, side: int, block: int, output: Path) -> dict[str, Any]:
    """``write_vector`` of ``mask`` in a fresh process, its memory sampled from outside."""
    measured = run_measured(
        [sys.executable, "-m", "benchmarks.bench_polygons", "--block", str(block), "--_worker", str(mask),
         str(output)], env=ENV,
    )  # fmt: skip
    if measured.returncode != 0:
        raise RuntimeError(f"polygonising {mask} failed: {measured.stderr.strip()[-2000:]}")
    row = {
        "side": side,
        "megapixels": round(side * side / 1e6, 1),
        "mask": str(mask),
        "mask_mib": round(mask.stat().st_size / MIB, 1),
        **json.loads(measured.stdout),
        "wall_s": round(measured.seconds, 1),
        "sampled_peak_rss_mib": round(measured.peak_bytes / MIB),
        "sampled_peak_pss_mib": round(measured.peak_pss_bytes / MIB),
    }
    row["mp_per_s"] = round(row["megapixels"] / row["seconds"], 2)
    return row


def table(series: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| mask | MP | polygons | GeoPackage (MiB) | seconds | MP/s | RSS before (MiB) | peak RSS (MiB) | "
        "peak - before (MiB) | sampled peak PSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in series.items():
        for row in rows:
            lines.append(
                f"| {row['side']} x {row['side']}, {name} | {row['megapixels']:.1f} | {row['features']:,} | "
                f"{row['output_mib']:.1f} | {row['seconds']:.1f} | {row['mp_per_s']:.2f} | "
                f"{row['rss_before_mib']:.0f} | {row['peak_rss_mib']:.0f} | "
                f"{row['peak_rss_mib'] - row['rss_before_mib']:.0f} | {row['sampled_peak_pss_mib']} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_polygons", description=__doc__.split("\n")[0])
    parser.add_argument("--sides", default="4096,8192,16384", help="mask sides in pixels")
    parser.add_argument("--series", default=",".join(SERIES), help=f"which masks: {', '.join(SERIES)}")
    parser.add_argument("--block", type=int, default=2048, help="polygonising block (write_vector's block)")
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH / "polygons")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--_worker", dest="worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.block)))
        return 0
    names = [n for n in args.series.split(",") if n]
    if unknown := set(names) - set(SERIES):
        parser.error(f"unknown series {', '.join(sorted(unknown))}; choose from {', '.join(SERIES)}")
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine(), "load_average": list(os.getloadavg()), "block": args.block}
    source, seconds = source_mask(args.scratch)
    report["source"] = {"path": str(source), "scene": str(SOURCE), "segment_s": round(seconds, 1)}
    print(f"source mask {source} ({'reused' if not seconds else f'segmented in {seconds:.0f} s'})", flush=True)
    series: dict[str, list[dict[str, Any]]] = {}
    with contextlib.suppress(OSError, ValueError, KeyError):
        previous = json.loads(args.out.read_text())
        if previous["block"] == args.block:  # keep the series not run this time
            series = {k: v for k, v in previous["series"].items() if k not in names}
            kept = previous.get("kept_from_previous", {})
            report["kept_from_previous"] = {
                k: kept.get(k, {"machine": previous["machine"], "load_average": previous.get("load_average")})
                for k in series
            }
    with tempfile.TemporaryDirectory(prefix="bench-polygons-") as tmp:
        for name in names:
            rows = series[name] = []
            for side in sorted(int(v) for v in args.sides.split(",")):
                mask, reused, build_s = build_mask(source, side, args.scratch, drop=SERIES[name])
                row = polygonise(mask, side, args.block, Path(tmp) / f"polygons-{side}.gpkg")
                row.update(series=name, mask_reused=reused, mask_build_s=round(build_s, 1))
                rows.append(row)
                print(
                    f"{name} {side} x {side}: {row['features']} polygons in {row['seconds']} s, peak RSS "
                    f"{row['peak_rss_mib']} MiB ({row['rss_before_mib']} MiB before)",
                    flush=True,
                )
    report["series"] = {k: series[k] for k in SERIES if k in series}
    report["total_s"] = round(time.perf_counter() - started, 1)
    lines = table(report["series"])
    print("\n".join(lines))
    report["table"] = lines
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
