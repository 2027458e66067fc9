"""The GPU check: what segpipe does with one GPU node, in one short run, for the day a GPU is lent.

    python -m benchmarks.gpu_check                  # on a GPU node (H100/H200 class): under 8 minutes
    python -m benchmarks.gpu_check --cpu-sized --out /tmp/gpu-check.json   # the same steps, CPU-sized (tests)

Records to ``benchmarks/results/gpu.json`` (``--out``):

1. **Segmenters on GPUs**: a Ray session plans its pool as a run does (one segmenter per GPU); each segmenter
   reports the device it holds, Ray's GPU ids and ``CUDA_VISIBLE_DEVICES``. Check: one segmenter per GPU, no GPU
   held twice.
2. **bf16 against fp32**: the shipped model on real tiles of the scene (its tile input size), fp32 and bf16
   autocast (what segmenters run on a GPU). Check: the class ids agree on >= 99.5 % of pixels.
3. **Throughput** on a mirror tiling of real imagery (268 MP on a GPU, 1 MP CPU-sized; built as
   ``benchmarks.bench_pipeline`` builds its scenes): the model-only limit, ``segpipe run --no-prefect`` with the
   shipped model, the same with the null model (the pipeline's own ceiling with all cores), and the I/O floor.
   GPU busy share: ``nvidia-smi``'s utilisation sampled every 0.2 s during the shipped model's run, and the
   segmenters' compute seconds (CUDA-synchronised) over the infer stage's.
4. **Training on CUDA**: a few optimizer steps of ``segpipe train``'s loop (``segpipe.models.training.loop.train``) on
   the Dubai pair in ``tests/data/dubai``, with the precision it picks; seconds per step and the losses.

Exit status 1 when a check fails. Without a GPU the full check refuses to start (use ``--cpu-sized``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from benchmarks import bench_pipeline as bp
from segpipe.core.pixels import normalise
from segpipe.models.checkpoint import load_model
from segpipe.models.training import TrainConfig, train
from segpipe.models.training.optim import pick_precision
from segpipe.pipeline.infer import ModelSpec
from segpipe.pipeline.session import Session

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu.json"
SMALL_SOURCE = REPO / "tests" / "data" / "lausanne-1091-322_00.tif"
DUBAI_PAIR = REPO / "tests" / "data" / "dubai"
MIN_AGREEMENT = 0.995


def check_segmenters(device: str) -> dict[str, Any]:
    """Start the segmenters a run would start on this node and ask each what it holds."""

    with Session(ray=True) as session:
        resolved = session.device(device)
        workers, threads, resources = session.plan_pool(resolved, None)
        spec = ModelSpec("null", None, resolved, threads)
        pool = session.segmenters(spec, workers, resources)
        held = session.ray.get([actor.placement.remote() for actor in pool.actors])
        gpus = int(session.ray.cluster_resources().get("GPU", 0))
    ids = [tuple(h["gpu_ids"]) for h in held]
    expected = gpus if resolved == "cuda" else 1
    return {
        "device": resolved,
        "gpus": gpus,
        "segmenters": held,
        "threads_each": threads,
        "ok": len(held) == expected and len(set(ids)) == len(ids),
    }


def _tiles(scene: str, size: int, count: int) -> np.ndarray:
    """``count`` real windows of ``size`` pixels spread along the scene's diagonal, (count, bands, size, size)."""

    with rasterio.open(scene) as src:
        side = min(size, src.width // 16 * 16, src.height // 16 * 16)  # the model's size multiple
        step = (min(src.width, src.height) - side) // max(1, count - 1)
        return np.stack([src.read(window=Window(k * step, k * step, side, side)) for k in range(count)])


def check_precision(scene: str, device: str, tiles: int) -> dict[str, Any]:
    """Class ids of the shipped model in fp32 and with bf16 autocast on real tiles, compared pixel by pixel."""

    loaded = load_model("default", device=device)
    meta = loaded.metadata
    raw = _tiles(scene, meta.tile_size + 2 * meta.halo, tiles)
    x = torch.from_numpy(np.stack([normalise(t, meta.mean, meta.std) for t in raw])).to(device)
    with torch.inference_mode():
        fp32 = [loaded.module(x[k : k + 1]).argmax(1) for k in range(len(x))]
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = [loaded.module(x[k : k + 1]).argmax(1) for k in range(len(x))]
    same = sum(int((a == b).sum()) for a, b in zip(fp32, bf16, strict=True))
    total = sum(a.numel() for a in fp32)
    agreement = same / total
    return {"tiles": len(x), "pixels": total, "agreement": agreement, "ok": agreement >= MIN_AGREEMENT}


@contextlib.contextmanager
def gpu_utilisation() -> Iterator[dict[str, Any]]:
    """Sample ``nvidia-smi``'s GPU utilisation every 0.2 s while the block runs; the mean and samples land in the
    yielded dict (empty without ``nvidia-smi``)."""
    found: dict[str, Any] = {}
    exe = shutil.which("nvidia-smi")
    if exe is None:
        yield found
        return
    cmd = [exe, "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    samples: list[float] = []

    def collect() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError, IndexError):
                samples.append(float(line.split(",")[1]))

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        yield found
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        reader.join(timeout=5)
        found.update(samples=len(samples), mean_percent=float(np.mean(samples)) if samples else None)


def check_throughput(bench: bp.Bench, nominal: float) -> dict[str, Any]:
    """Model-only limit, segpipe with the shipped model, with the null model, and the I/O floor on one scene."""
    _, setup = bp._prepare(bench, nominal, "default")
    limit = bp._limit_row(bench, setup, nominal)
    with gpu_utilisation() as busy:
        shipped = bp._segpipe_run(bench, setup, nominal, limit["seconds"], "segpipe", ["--no-prefect"], None)
    null = bp._segpipe_run(bench, setup, nominal, None, "segpipe null model", ["--no-prefect", "--model", "null"], None)
    floor = bp._floor_row(bench, setup, nominal, limit["seconds"])
    rows = [r for r in (limit, shipped, null, floor) if r is not None]
    for row in rows[1:]:
        row.pop("summary", None)
        if row is not floor and row.get("seconds"):
            row["ratio_to_floor"] = floor["seconds"] / row["seconds"]
    share = None
    if shipped is not None:
        over = shipped["overhead"]
        share = over["compute_s"] / over["infer_s"] if over["infer_s"] > 0 else None
    return {
        "scene": bench.scenes[-1],
        "rows": rows,
        "table": bp.format_table(rows),
        "gpu_busy": {"nvidia_smi": busy, "compute_share_of_infer": share},
        "ok": shipped is not None and null is not None,
    }


def check_training(device: str, steps: int, scratch: Path) -> dict[str, Any]:
    """A few optimizer steps of the training loop on ``device``, with the precision it picks."""

    data = scratch / "dubai"
    for kind, suffix in (("images", ".jpg"), ("masks", ".png")):
        (data / kind).mkdir(parents=True, exist_ok=True)
        shutil.copy(DUBAI_PAIR / f"image_part_005{suffix}", data / kind / f"image_part_005{suffix}")
    config = TrainConfig(
        train_dirs=(data,),
        out_dir=scratch / "train",
        epochs=1,
        steps_per_epoch=steps,
        batch_size=4,
        tile_size=256,
        device=device,  # type: ignore[arg-type]
        unknown_colours="ignore",
    )
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    dtype = pick_precision(config.precision, torch.device(device))
    loss = result.history[-1].train_loss if result.history else None
    return {
        "device": device,
        "steps": steps,
        "precision": str(dtype).removeprefix("torch.") if dtype else "fp32",
        "seconds": seconds,
        "seconds_per_step": result.history[-1].seconds / steps if result.history else None,
        "train_loss": loss,
        "ok": loss is not None and bool(np.isfinite(loss)),
    }


def _bench(args: argparse.Namespace, scratch: Path) -> bp.Bench:
    """A bench_pipeline run state with this check's settings (its scene cache, limits and source)."""
    argv = ["--source", str(args.source), "--scratch", str(scratch), "--limit-batches", str(args.limit_batches)]
    argv += ["--limit-seconds", str(args.limit_seconds)]
    return bp.Bench(args=bp.build_parser().parse_args(argv), scratch=scratch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default: benchmarks/results/gpu.json)")
    p.add_argument("--cpu-sized", action="store_true", help="the same steps on CPU, sized for the test suite")
    p.add_argument("--scene-mp", type=float, default=None, help="scene size (default 256 nominal, 1 CPU-sized)")
    p.add_argument("--source", type=Path, default=None, help="real image to mirror-tile (default: cogeo.tif)")
    p.add_argument("--scratch", type=Path, default=None, help="scene cache and outputs (default: a temporary folder)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default 20, 2 CPU-sized)")
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    small = args.cpu_sized
    args.scene_mp = args.scene_mp or (1.0 if small else 256.0)
    args.train_steps = args.train_steps or (2 if small else 20)
    if args.source is None:
        args.source = SMALL_SOURCE if small or not bp.DEFAULT_SOURCE.is_file() else bp.DEFAULT_SOURCE
    args.limit_batches, args.limit_seconds = (1, 0.0) if small else (10, 10.0)
    args.tiles = 2 if small else 16
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _resolve(build_parser().parse_args(argv))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_sized:
        print("error: no CUDA GPU here; run on a GPU node, or pass --cpu-sized", file=sys.stderr)
        return 2
    device = "cuda" if cuda and not args.cpu_sized else "cpu"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segpipe-gpu-check-") as tmp:
        scratch = args.scratch or Path(tmp)
        bench = _bench(args, scratch)
        record: dict[str, Any] = {"machine": bp.machine_description(), "device": device, "cpu_sized": args.cpu_sized}
        record["segmenters"] = check_segmenters(device)
        bench.log(f"segmenters: {record['segmenters']['segmenters']}")
        scene, _ = bp.build_scene(args.source, bp.scene_side(args.scene_mp), scratch / "scenes")
        record["precision"] = check_precision(str(scene), device, args.tiles)
        bench.log(f"bf16 vs fp32 agreement: {record['precision']['agreement']:.5f}")
        record["throughput"] = check_throughput(bench, args.scene_mp)
        print(record["throughput"]["table"], flush=True)
        record["training"] = check_training(device, args.train_steps, scratch)
        bench.log(f"training: {record['training']}")
    record["checks"] = bench.checks
    record["seconds"] = time.perf_counter() - started
    failed = [k for k in ("segmenters", "precision", "throughput", "training") if not record[k]["ok"]]
    failed += [c["check"] for c in bench.checks if not c["ok"]]
    record["failed"] = failed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"gpu check on {device}: {record['seconds']:.0f} s, {len(failed)} failed {failed}; JSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
