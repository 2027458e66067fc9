"""One scene on a cluster of one node, then of two, where the nodes share no disk, /tmp or loopback (network and
mount namespaces on this machine, :mod:`tests.cluster.netns`; needs root).

    python -m benchmarks.bench_netns_cluster [--side 3072] [--tile-size 256] [--out FILE.json]

The scene is a ``side x side`` mirror tiling of ``cogeo.tif`` (real 0.6 m aerial RGB of ../shared/data, built as
``benchmarks.bench_pipeline`` builds its scenes), put on the cluster's S3 server (moto) and segmented by the shipped
model with ``segpipe run --ray-address HEAD:6379 --no-prefect`` run on the head, the work store on S3 too: first
with the head alone (one CPU), then with a worker (one CPU) joined. Per run: the command's wall time, the summary's
seconds per stage, tiles computed per node and the bytes that crossed the driver (per gigapixel too); the two masks
must be byte-identical. Every node, the S3 server and the driver share this machine's cores: two nodes have twice
the CPUs of one, not twice the machine.

Prints a table and writes JSON with the machine's description.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_cluster import machine
from benchmarks.bench_pipeline import DEFAULT_SOURCE, build_scene
from segpipe.core import objects
from tests.cluster.netns import S3_ENV, NetnsCluster, namespaces_problem

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "netns-cluster.json"
SCENE = "s3://scenes/bench/mirror.tif"


def one_run(cluster: Any, nodes: int, tile_size: int) -> dict[str, Any]:
    """``segpipe run`` on the head over the cluster as it is now; its figures."""
    output, work = f"s3://out/{nodes}-nodes/mask.tif", f"s3://work/{nodes}-nodes"
    argv = [
        str(Path(sys.executable).with_name("segpipe")),
        "run",
        SCENE,
        output,
        "--work-dir",
        work,
        "--tile-size",
        str(tile_size),
        "--no-prefect",
        "--json",
        "--ray-address",
        cluster.gcs_address,
    ]
    started = time.perf_counter()
    done = cluster.run(cluster.head, argv, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"segpipe run on {nodes} node(s) failed: {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    names = cluster.node_ids()
    gigapixels = summary["scene"]["megapixels"] / 1000
    return {
        "nodes": nodes,
        "wall_s": round(wall, 2),
        "seconds": summary["seconds"],
        "tiles": summary["tiles"]["computed"],
        "tiles_per_node": {names.get(k, k): v for k, v in summary["nodes"].items()},
        "tiles_per_s": round(summary["tiles"]["computed"] / summary["seconds"]["infer"], 3),
        "megapixels_per_second": summary["megapixels_per_second"],
        "driver_bytes": summary["driver_bytes"],
        "driver_bytes_per_gigapixel": round(summary["driver_bytes"] / gigapixels),
        "mask_sha256": hashlib.sha256(objects.read_bytes(output)).hexdigest(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_netns_cluster", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--side", type=int, default=3072, help="scene side in pixels (default: 3072, 9.4 MP)")
    parser.add_argument("--tile-size", type=int, default=256, help="tile core in pixels (default: 256)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    problem = namespaces_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    scene, _ = build_scene(DEFAULT_SOURCE, args.side, Path(tempfile.gettempdir()) / "segpipe-bench-netns")
    cluster = NetnsCluster()
    runs = []
    try:
        cluster.start()
        os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": cluster.s3_url})
        for bucket in ("scenes", "work", "out"):
            cluster.bucket(bucket)
        objects.upload_file(scene, SCENE)
        cluster.add_node("head", head=True)
        cluster.wait_for_nodes()
        runs.append(one_run(cluster, 1, args.tile_size))
        cluster.add_node("worker1")
        cluster.wait_for_nodes()
        runs.append(one_run(cluster, 2, args.tile_size))
    finally:
        cluster.stop()
    one, two = runs
    identical = one["mask_sha256"] == two["mask_sha256"]
    lines = [
        f"scene: {args.side} x {args.side} mirror tiling of {DEFAULT_SOURCE.name}, tiles of {args.tile_size} px, "
        "the shipped model; masks byte-identical: " + ("yes" if identical else "NO"),
        "| nodes | wall of `segpipe run` | infer | tiles per node | tiles/s (infer) | driver bytes | per GP |",
        "|---:|---:|---:|---|---:|---:|---:|",
        *[
            f"| {r['nodes']} | {r['wall_s']:.1f} s | {r['seconds']['infer']:.1f} s | "
            + ", ".join(f"{k} {v}" for k, v in sorted(r["tiles_per_node"].items()))
            + f" | {r['tiles_per_s']:.2f} | {r['driver_bytes']} | {r['driver_bytes_per_gigapixel'] / 1e3:.1f} kB |"
            for r in runs
        ],
    ]
    print("\n".join(lines))
    report = {
        "machine": machine(),
        "side": args.side,
        "tile_size": args.tile_size,
        "runs": runs,
        "identical": identical,
        "table": lines,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
