"""Fixed costs and distribution: the one-scene CLI's overhead, a warm session's per-scene overhead, the bytes that
cross the driver, and the tile rate on one and on two Ray nodes.

    python -m benchmarks.bench_cluster [--repeat 3] [--scenes 20] [--out benchmarks/results/cluster.json]

1. **One-scene CLI overhead** on the embedded defaults: ``segpipe run lausanne-1091-322_00.tif`` (875 x 600 real
   aerial RGB, one tile of the shipped model) in a subprocess, with Prefect and with ``--no-prefect``, ``--repeat``
   times each. Overhead = the command's wall time (process start to exit) minus the model's compute inside it
   (``segmenter_seconds.compute`` of the summary).
2. **Warm session**: ``segpipe dataset`` over ``--scenes`` small real scenes (the georeferenced aerial rasters of
   ../shared/data, then Dubai aerial images), and over the first scene alone. Marginal overhead per scene =
   (wall of N scenes - wall of 1 scene - compute of scenes 2..N) / (N - 1): what one more scene costs beyond its
   compute once the session is warm.
3. **Bytes through the driver** and **2 nodes vs 1 node**: a 4096 x 4096 mirror tiling of ``cogeo.tif`` on an
   S3-compatible server on 127.0.0.1 (moto), segmented by the shipped model on Ray's multi-node harness (two
   raylets of one CPU each, then one raylet of two CPUs, on this machine): the summary's ``driver_bytes`` scaled to a
   gigapixel, and tiles per second of the infer stage. Both runs share the same 2 cores: this checks that work is
   distributed, not that it is faster.

Prints a table and writes JSON with the machine's description. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_pipeline import DEFAULT_SOURCE, build_scene
from segpipe.core import objects

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results" / "cluster.json"
ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0"}


def segpipe(*args: str, cwd: Path) -> tuple[float, str]:
    """Run the ``segpipe`` command; (wall seconds, stdout)."""
    started = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("segpipe")), *args], cwd=cwd, env=ENV, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"segpipe {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return wall, done.stdout


def cli_overhead(repeat: int, scratch: Path) -> list[dict[str, Any]]:
    scene = REPO / "tests" / "data" / "lausanne-1091-322_00.tif"
    rows = []
    for mode, extra in (("prefect", []), ("no-prefect", ["--no-prefect"])):
        for k in range(repeat):
            wall, out = segpipe("run", str(scene), "m.tif", "--overwrite", "--json", *extra, cwd=scratch)
            summary = json.loads(out)
            compute = summary["segmenter_seconds"]["compute"]
            rows.append(
                {
                    "mode": mode,
                    "repeat": k,
                    "wall_s": round(wall, 2),
                    "summary_wall_s": summary["seconds"]["wall"],
                    "compute_s": compute,
                    "overhead_s": round(wall - compute, 2),
                    "seconds": summary["seconds"],
                }
            )
            print(
                f"cli {mode:<10} wall {wall:6.2f} s  compute {compute:5.2f} s  overhead {wall - compute:5.2f} s",
                flush=True,
            )
    return rows


def small_scenes(count: int) -> list[Path]:
    found = [
        SHARED / "swissimage" / "lausanne-1091-322_00.tif",
        SHARED / "rasterio" / "RGB.byte.tif",
        SHARED / "rasterio" / "cogeo.tif",
        *sorted((SHARED / "rasterio").glob("rgb[1-4].tif")),
    ]
    found = [p for p in found if p.is_file()]
    for folder in sorted((SHARED / "dubai-aerial").glob("tile-*")):
        found += sorted((folder / "images").glob("*.jpg"))
    if len(found) < count:
        raise RuntimeError(f"only {len(found)} small scenes under {SHARED}")
    return found[:count]


def warm_session(count: int, scratch: Path) -> dict[str, Any]:
    scenes = small_scenes(count)
    results = {}
    for n in (1, count):
        folder = scratch / f"scenes-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for k, scene in enumerate(scenes[:n]):
            (folder / f"{k:02d}-{scene.stem}{scene.suffix if scene.suffix == '.tif' else '.tif'}").symlink_to(scene)
        out = scratch / f"masks-{n}"
        shutil.rmtree(out, ignore_errors=True)
        wall, _ = segpipe("dataset", str(folder), str(out), cwd=scratch)
        summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*.summary.json"))]
        results[n] = {
            "wall_s": round(wall, 2),
            "compute_s": [s["segmenter_seconds"]["compute"] for s in summaries],
            "megapixels": round(sum(s["scene"]["megapixels"] for s in summaries), 2),
        }
        print(f"dataset of {n:2d} scenes: {wall:6.2f} s, compute {sum(results[n]['compute_s']):6.2f} s", flush=True)
    one, many = results[1], results[count]
    marginal = (many["wall_s"] - one["wall_s"] - sum(many["compute_s"][1:])) / (count - 1)
    print(f"warm session: {marginal:.2f} s per scene beyond its compute", flush=True)
    return {"scenes": count, "runs": results, "overhead_per_scene_s": round(marginal, 3)}


def cluster_runs(scratch: Path) -> dict[str, Any]:
    from tests.cluster.conftest import S3_ENV, S3Server  # lazy: the test extra (moto's S3 server)

    scene, _ = build_scene(DEFAULT_SOURCE, 4096, scratch / "scenes")
    server = S3Server()
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": server.url, "SEGPIPE_CACHE_DIR": str(scratch / "cache")})
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    results: dict[str, Any] = {}
    try:
        for bucket in ("scenes", "work", "out"):
            server.bucket(bucket)
        objects.upload_file(scene, "s3://scenes/in/mirror4096.tif")
        for name, layout in (("2 nodes x 1 CPU", [1, 1]), ("1 node x 2 CPUs", [2])):
            results[name] = one_cluster_run(layout, scratch)
            r = results[name]
            print(
                f"{name}: {r['tiles_per_s']:.3f} tiles/s, tiles by node {sorted(r['nodes'].values())}, "
                f"driver {r['driver_bytes']} B = {r['driver_bytes_per_gigapixel']:.0f} B/GP",
                flush=True,
            )
    finally:
        server.stop()
    return results


def ingest_compare(scratch: Path, repeat: int) -> dict[str, Any]:
    """Ingest of the 4096 px scene into a work store on S3 by the cluster's workers (two raylets of one CPU): as Ray
    tasks (segpipe's way, :meth:`Session.map`) and as a dask graph of the same region tasks run by Ray's dask
    scheduler (``ray.util.dask.ray_dask_get``, which needs pandas)."""
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    import ray  # lazy: 0.5 s; bench_slides and bench_nightly import this module, and bench_slides measures its worker

    from segpipe.pipeline.read import describe_scene  # lazy: bench_slides' worker times the pipeline's imports
    from tests.cluster.conftest import S3_ENV, S3Server  # lazy: the test extra (moto's S3 server)

    scene_path, _ = build_scene(DEFAULT_SOURCE, 4096, scratch / "scenes")
    server = S3Server()
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": server.url})
    cluster = start_cluster([1, 1])
    try:
        server.bucket("work")
        server.bucket("scenes")
        objects.upload_file(scene_path, "s3://scenes/in/mirror4096.tif")
        timings = ingest_both_ways(describe_scene("s3://scenes/in/mirror4096.tif"), cluster.address, repeat)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        server.stop()
    return {
        name: {"seconds": [round(t, 2) for t in values], "median_s": round(statistics.median(values), 2)}
        for name, values in timings.items()
    }


def start_cluster(layout: list[int]) -> Any:
    """Ray's multi-node harness on this machine: one raylet per entry of ``layout`` (its CPUs), on 127.0.0.1."""
    from ray._private import ray_constants  # lazy: as ray in ingest_compare
    from ray.cluster_utils import Cluster  # lazy: as ray in ingest_compare

    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": layout[0], "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    for cpus in layout[1:]:
        cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    return cluster


def ingest_both_ways(scene: Any, address: str, repeat: int) -> dict[str, list[float]]:
    """Seconds of each ingest of ``scene`` (a SceneInfo) on the cluster at ``address``, ``repeat`` times: as Ray
    tasks of a segpipe session, and as a dask graph of the same region tasks on Ray's dask scheduler."""
    import dask  # lazy: the bench extra (dask[dataframe]), for --compare-dask only
    from ray.util.dask import ray_dask_get  # lazy: needs dask and pandas, for --compare-dask only

    from segpipe.pipeline import store as ws  # lazy: bench_slides' worker times the pipeline's imports
    from segpipe.pipeline.ingest import copy_region, ingest, regions  # lazy: as the store above
    from segpipe.pipeline.session import Session  # lazy: as the store above

    timings: dict[str, list[float]] = {"ray tasks": [], "dask on ray": []}
    with Session(address=address) as session:
        for k in range(repeat):
            store = ws.WorkStore(f"s3://work/ray-{k}.zarr")
            started = time.perf_counter()
            ingest(scene, store, chunk_size=1024, session=session)
            timings["ray tasks"].append(time.perf_counter() - started)
            store = ws.WorkStore(f"s3://work/dask-{k}.zarr")
            started = time.perf_counter()
            store.create_scene_arrays(
                shape=(scene.count, scene.height, scene.width), dtype=scene.dtype, chunk=1024, region=2048
            )
            tasks = [dask.delayed(copy_region)(scene, store.url, w, 1024) for w in regions(4096, 4096, 2048)]
            dask.compute(*tasks, scheduler=ray_dask_get)
            timings["dask on ray"].append(time.perf_counter() - started)
            print(
                f"ingest 16.8 MP: ray tasks {timings['ray tasks'][-1]:.2f} s, "
                f"dask on ray {timings['dask on ray'][-1]:.2f} s",
                flush=True,
            )
    return timings


def one_cluster_run(layout: list[int], scratch: Path) -> dict[str, Any]:
    import ray  # lazy: as in ingest_compare

    from segpipe.pipeline.run import run_scene  # lazy: bench_slides' worker times the pipeline's imports
    from segpipe.pipeline.settings import RunSettings  # lazy: as run_scene above

    cluster = start_cluster(layout)
    try:
        out = f"s3://out/{len(layout)}-nodes/mask.tif"
        summary = run_scene(
            RunSettings(
                input="s3://scenes/in/mirror4096.tif",
                output=out,
                work_dir=f"s3://work/{len(layout)}-nodes",
                ray_address=cluster.address,
                overwrite=True,
            )
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    gigapixels = summary["scene"]["megapixels"] / 1000
    return {
        "layout": layout,
        "nodes": summary["nodes"],
        "tiles": summary["tiles"]["computed"],
        "infer_s": summary["seconds"]["infer"],
        "tiles_per_s": summary["tiles"]["computed"] / summary["seconds"]["infer"],
        "driver_bytes": summary["driver_bytes"],
        "driver_bytes_per_gigapixel": summary["driver_bytes"] / gigapixels,
        "seconds": summary["seconds"],
    }


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--skip-cluster", action="store_true", help="only the CLI and warm-session figures")
    parser.add_argument(
        "--compare-dask",
        action="store_true",
        help="only ingest on the cluster: Ray tasks vs dask on Ray (needs pandas)",
    )
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    if args.compare_dask:
        try:
            found = ingest_compare(scratch, args.repeat)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(json.dumps(found, indent=2))
        path = args.out.with_name("cluster-ingest.json")
        path.write_text(json.dumps({"machine": machine(), "ingest_16_8_mp_on_2_nodes": found}, indent=2) + "\n")
        print(f"wrote {path}")
        return 0
    try:
        report: dict[str, Any] = {"machine": machine(), "cli": cli_overhead(args.repeat, scratch)}
        report["warm_session"] = warm_session(args.scenes, scratch)
        if not args.skip_cluster:
            report["cluster"] = cluster_runs(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cli = report["cli"]
    lines = ["| figure | value | target |", "|---|---:|---:|"]
    for mode in ("prefect", "no-prefect"):
        values = [r["overhead_s"] for r in cli if r["mode"] == mode]
        lines.append(
            f"| one-scene CLI overhead, {mode} (median of {len(values)}) | {statistics.median(values):.2f} s | <= 8 s |"
        )
    lines.append(
        f"| warm session, per scene beyond compute | {report['warm_session']['overhead_per_scene_s']:.2f} s | <= 1 s |"
    )
    for name, r in report.get("cluster", {}).items():
        lines.append(
            f"| bytes through the driver, {name} | {r['driver_bytes_per_gigapixel'] / 1e6:.3f} MB/GP | <= 1 MB/GP |"
        )
        lines.append(f"| tile rate, {name} | {r['tiles_per_s']:.3f} tiles/s | - |")
    print("\n".join(lines))
    report["table"] = lines
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
