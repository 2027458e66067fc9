"""A long night: N small real scenes (256 px windows of real rasters, each its own scene) segmented by one
``segpipe dataset`` run, a warm session for the whole night, watched from outside: after each scene, the RSS and
open file descriptors of the run's whole process tree (the command, Prefect's temporary server, Ray's processes when
Ray is used) and the shared memory in use (/dev/shm, where Ray's object store lives). Memory and descriptors must
be flat: the slope from scene 20 to the last is printed, per scene.

    python -m benchmarks.bench_long_night --scenes 300 --out benchmarks/results/long-night.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from benchmarks.bench_pipeline import machine_description

MIB = 2**20
SOURCES = ("RGB.byte.tif", "lausanne-1091-322_00.tif")
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def cut_scenes(folder: Path, count: int, size: int = 256, step: int = 24) -> list[Path]:
    """``count`` GeoTIFFs of ``size`` px windows of the real rasters in tests/data, each at its own offset (so each
    is a scene of its own content), georeferenced as the window."""

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    k = 0
    while len(paths) < count:
        source = DATA / SOURCES[k % len(SOURCES)]
        with rasterio.open(source) as src:
            cols, rows = (src.width - size) // step + 1, (src.height - size) // step + 1
            n = k // len(SOURCES)
            window = Window((n % cols) * step, (n // cols % rows) * step, size, size)
            profile = {**src.profile, "width": size, "height": size, "transform": src.window_transform(window),
                       "tiled": False, "compress": "deflate"}  # fmt: skip
            for key in ("blockxsize", "blockysize", "photometric", "jpeg_quality"):  # lausanne is YCbCr JPEG
                profile.pop(key, None)
            path = folder / f"s{k:04d}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(window=window))
        paths.append(path)
        k += 1
    return paths


def _tree(pid: int) -> tuple[int, int, int]:
    """(RSS bytes, open descriptors, processes) of ``pid`` and its descendants."""
    import psutil  # lazy: the bench extra (psutil)

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0
    rss = fds = alive = 0
    for proc in procs:
        try:
            rss += proc.memory_info().rss
            fds += proc.num_fds()
            alive += 1
        except psutil.Error:
            continue
    return rss, fds, alive


def _sample(run: subprocess.Popen[str], out: Path, started: float, timeout: float) -> list[dict[str, Any]]:
    """Sample the run's process tree each time another mask appears in ``out``, until it ends or times out."""
    samples: list[dict[str, Any]] = []
    seen = 0
    while run.poll() is None and time.perf_counter() - started < timeout:
        done = len(list(out.glob("*.mask.tif"))) if out.exists() else 0
        if done > seen:
            rss, fds, procs = _tree(run.pid)
            shm = shutil.disk_usage("/dev/shm").used if os.path.isdir("/dev/shm") else 0  # Ray's object store
            samples.append({
                "scene": done, "rss_mib": round(rss / MIB, 1), "fds": fds, "processes": procs,
                "shm_mib": round(shm / MIB, 1), "seconds": round(time.perf_counter() - started, 2),
            })  # fmt: skip
            seen = done
        time.sleep(0.05)
    return samples


def watch_night(scenes: Path, out: Path, options: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run ``segpipe dataset`` on ``scenes`` and sample its process tree each time another mask appears."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}
    command = [sys.executable, "-m", "segpipe.cli", "dataset", str(scenes), str(out), *options]
    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:  # not a pipe: the night's report fills one and the run blocks
        run = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        samples = _sample(run, out, started, timeout)
        if run.poll() is None:
            run.kill()
        run.wait()
        log.seek(0)
        output = log.read()
    return {"returncode": run.returncode, "samples": samples, "output_tail": output[-2000:],
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def slopes(samples: list[dict[str, Any]], start: int) -> dict[str, float]:
    """Least-squares slope per scene of RSS (MiB) and descriptors from scene ``start`` on."""
    tail = [s for s in samples if s["scene"] >= start]
    if len(tail) < 3:
        return {"rss_mib_per_scene": float("nan"), "fds_per_scene": float("nan")}
    x = np.array([s["scene"] for s in tail], dtype=float)
    return {
        "rss_mib_per_scene": float(np.polyfit(x, [s["rss_mib"] for s in tail], 1)[0]),
        "fds_per_scene": float(np.polyfit(x, [s["fds"] for s in tail], 1)[0]),
        "shm_mib_per_scene": float(np.polyfit(x, [s.get("shm_mib", 0.0) for s in tail], 1)[0]),
        "rss_mib_first": tail[0]["rss_mib"],
        "rss_mib_last": tail[-1]["rss_mib"],
        "fds_first": tail[0]["fds"],
        "fds_last": tail[-1]["fds"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--model", default="default")
    p.add_argument("--executor", default="local", choices=("local", "ray"))
    p.add_argument("--from-scene", type=int, default=20, help="the slopes start here (warm-up before)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="long-night-") as tmp:
        scenes = Path(tmp) / "scenes"
        cut_scenes(scenes, args.scenes)
        options = ["--model", args.model, "--executor", args.executor, "--tile-size", "256", "--halo", "32"]
        night = watch_night(scenes, Path(tmp) / "out", options, timeout=args.scenes * 30 + 300)
        collection = (Path(tmp) / "out" / "collection.json").is_file()
    given = sys.argv[1:] if argv is None else list(argv)
    result = {
        "machine": machine_description(),
        "scenes": args.scenes,
        "model": args.model,
        "executor": args.executor,
        **night,
        "collection": collection,
        "slopes": slopes(night["samples"], args.from_scene),
        "command": "python -m benchmarks.bench_long_night " + " ".join(given),
    }
    for s in night["samples"]:
        if s["scene"] in (1, 10, 20, 40, 80, 160, 300) or s is night["samples"][-1]:
            print(f"scene {s['scene']:4d}: RSS {s['rss_mib']:8.1f} MiB, {s['fds']:4d} fds, {s['processes']} processes, "
                  f"shm {s['shm_mib']:7.1f} MiB, {s['seconds']:7.1f} s")  # fmt: skip
    print(json.dumps(result["slopes"], indent=2), "collection:", collection, "exit:", night["returncode"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if night["returncode"] == 0 and collection else 1


if __name__ == "__main__":
    raise SystemExit(main())
