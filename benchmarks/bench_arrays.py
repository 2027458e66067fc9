"""Arrays in, side by side with files, in one run: the same mirror-tiled real scene segmented as a file, as a
dask-backed DataArray (rioxarray, chunked) and as a numpy-backed one, with the driver's peak memory of each; and
the block map that an array source needs, its copy into the work store, done two ways: segpipe's ingest (regions
on threads, :func:`segpipe.pipeline.ingest.ingest`) and dask (``dask.array.store`` on dask's threaded scheduler).

Each row runs in a fresh Python process, so its peak RSS (sampled every 0.1 s, process and children) is its own.
Masks must be identical between the rows; the run fails otherwise.

    python -m benchmarks.bench_arrays --mp 64 --out benchmarks/results/arrays.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from benchmarks.bench_pipeline import DEFAULT_SOURCE, TreeMemorySampler, build_scene, machine_description, scene_side

MIB = 2**20
ROWS = ("file", "dask array", "numpy array", "ingest: segpipe regions", "ingest: dask store", "stitch")


def _segment_row(row: str, scene: Path, out: Path, chunk: int, model: str) -> dict[str, Any]:
    import rioxarray  # lazy: each row's process loads only what it measures

    import segpipe  # lazy: each row's process loads only what it measures

    options = {"model": model, "executor": "local", "work_dir": str(out.parent / f"work-{row.replace(' ', '-')}")}
    t = time.perf_counter()
    if row == "file":
        segpipe.segment(scene, out, **options)
    else:
        chunks = {"band": -1, "y": chunk, "x": chunk} if row == "dask array" else None
        array = rioxarray.open_rasterio(scene, chunks=chunks)
        if row == "numpy array":
            array = array.load()
        segpipe.segment(array, out, **options)
    return {"seconds": time.perf_counter() - t}


def _ingest_row(row: str, scene: Path, out: Path, chunk: int) -> dict[str, Any]:
    import dask.array as da  # lazy: each row's process loads only what it measures
    import rioxarray  # lazy: each row's process loads only what it measures

    from segpipe.pipeline import store as ws  # lazy: each row's process loads only what it measures
    from segpipe.pipeline.ingest import ingest  # lazy: each row's process loads only what it measures
    from segpipe.pipeline.read import describe_scene  # lazy: each row's process loads only what it measures
    from segpipe.pipeline.sources.array import stage_array  # lazy: each row's process loads only what it measures

    array = rioxarray.open_rasterio(scene, chunks={"band": -1, "y": chunk, "x": chunk})
    staged = stage_array(array, out.parent)
    info = describe_scene(staged)
    store = ws.WorkStore(str(out.parent / f"{row.split(': ')[1].replace(' ', '-')}.zarr"))
    t = time.perf_counter()
    if row == "ingest: segpipe regions":
        ingest(info, store, chunk_size=chunk, workers=2)
    else:
        store.create_scene_arrays(
            shape=(info.count, info.height, info.width), dtype=info.dtype, chunk=chunk, region=chunk
        )
        data = array.data
        valid = (data != info.nodata).any(axis=0).astype("uint8") if info.nodata is not None else None
        targets = [store.array(ws.IMAGE)] + ([store.array(ws.VALID)] if valid is not None else [])
        da.store(
            [data] + ([valid] if valid is not None else []), targets, lock=False, scheduler="threads", num_workers=2
        )
    seconds = time.perf_counter() - t
    image = np.asarray(store.array(ws.IMAGE)[:, :: chunk // 2, :: chunk // 2])
    return {"seconds": seconds, "checksum": int(image.astype(np.int64).sum())}


def _stitch_row(scene: Path, out: Path, model: str, repeat: int = 3) -> dict[str, Any]:
    """Blend (cosine) a segmented scene's tiles into its mask with segpipe's stitch (blocks of tiles on a thread
    pool) and with the same block function as dask delayed tasks on dask's threaded scheduler, alternately; the
    median of ``repeat`` each, and whether both masks are identical."""

    import dask  # lazy: each row's process loads only what it measures

    from segpipe.pipeline import store as ws  # lazy: each row's process loads only what it measures
    from segpipe.pipeline.plan import make_plan  # lazy: each row's process loads only what it measures
    from segpipe.pipeline.run import run_scene  # lazy: each row's process loads only what it measures
    from segpipe.pipeline.settings import RunSettings  # lazy: each row's process loads only what it measures
    from segpipe.pipeline.stitch import stitch, stitch_block  # lazy: each row's process loads only what it measures

    work = out.parent / "work"
    settings = RunSettings(
        input=str(scene), output=str(out), model=model, blend="cosine", executor="local", work_dir=str(work)
    )
    plan = make_plan(settings)
    summary = run_scene(settings, plan=plan)
    store = ws.WorkStore(summary["work_store"])
    grid, block = plan.grid, 4
    origins = [(r, c) for r in range(0, grid.rows, block) for c in range(0, grid.cols, block)]
    times: dict[str, list[float]] = {"segpipe": [], "dask": []}
    digests = set()
    for _ in range(repeat):
        for way in times:
            t = time.perf_counter()
            if way == "segpipe":
                stitch(store, grid, "cosine", workers=2, block=block)
            else:
                tasks = [dask.delayed(stitch_block)(store, grid, "cosine", o, block) for o in origins]
                dask.compute(*tasks, scheduler="threads", num_workers=2)
            times[way].append(time.perf_counter() - t)
            digests.add(hashlib.sha256(np.asarray(store.array(ws.MASK)[:]).tobytes()).hexdigest())
    return {
        "seconds": statistics.median(times["segpipe"]),
        "dask_seconds": statistics.median(times["dask"]),
        "runs": times,
        "identical": len(digests) == 1,
        "tiles": len(grid),
    }


def run_row(row: str, scene: Path, out: Path, chunk: int, model: str) -> dict[str, Any]:
    """One row, in this process (the benchmark calls it in a child process)."""
    with TreeMemorySampler(interval=0.1, pss_every=10**9) as sampler:
        if row.startswith("ingest"):
            result = _ingest_row(row, scene, out, chunk)
        elif row == "stitch":
            result = _stitch_row(scene, out, model)
        else:
            result = _segment_row(row, scene, out, chunk, model)
    return {**result, "peak_rss_mib": round(sampler.peak_bytes / MIB)}


def _child(row: str, scene: Path, out: Path, chunk: int, model: str) -> dict[str, Any]:
    code = (
        "import json,sys; from pathlib import Path; from benchmarks.bench_arrays import run_row; "
        f"print(json.dumps(run_row({row!r}, Path({str(scene)!r}), Path({str(out)!r}), {chunk}, {model!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"row {row!r} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _same_masks(paths: Sequence[Path]) -> bool:

    masks = []
    for path in paths:
        with rasterio.open(path) as src:
            masks.append(src.read(1))
    return all(np.array_equal(masks[0], m) for m in masks[1:])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mp", type=float, default=64.0, help="scene size in megapixels")
    p.add_argument("--chunk", type=int, default=1024, help="dask chunk and work-store chunk, pixels")
    p.add_argument("--model", default="null", help="model (default: the null model, so I/O is what is measured)")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="real image to mirror-tile")
    p.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated rows to run (default: all: {', '.join(ROWS)})"
    )
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    side = scene_side(args.mp)
    with tempfile.TemporaryDirectory(prefix="bench-arrays-") as tmp:
        scratch = Path(tmp)
        scene, _ = build_scene(args.source, side, scratch / "scenes")
        rows: dict[str, dict[str, Any]] = {}
        chosen = [r for r in ROWS if r in args.rows.split(",")]
        for row in chosen:
            folder = scratch / row.replace(" ", "-").replace(":", "")
            folder.mkdir()
            rows[row] = _child(row, scene, folder / "mask.tif", args.chunk, args.model)
            extra = f"  dask {rows[row]['dask_seconds']:.2f} s" if "dask_seconds" in rows[row] else ""
            print(f"{row:<26} {rows[row]['seconds']:7.2f} s  peak RSS {rows[row]['peak_rss_mib']:6d} MiB{extra}")
        masks = [scratch / r.replace(" ", "-") / "mask.tif" for r in ROWS[:3] if r in rows]
        checks = {f"masks identical ({', '.join(r for r in ROWS[:3] if r in rows)})": _same_masks(masks)}
        if ROWS[3] in rows and ROWS[4] in rows:
            checks["ingest copies identical"] = rows[ROWS[3]]["checksum"] == rows[ROWS[4]]["checksum"]
        if "stitch" in rows:
            checks["stitch masks identical (segpipe, dask)"] = rows["stitch"]["identical"]
    report = {
        "machine": machine_description(),
        "scene": {
            "side": side,
            "megapixels": round(side * side / 1e6, 1),
            "bytes": side * side * 3,
            "chunk": args.chunk,
            "model": args.model,
        },
        "rows": rows,
        "checks": checks,
        "command": "python -m benchmarks.bench_arrays " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
