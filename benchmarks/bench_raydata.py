"""Ray Data's streaming batch inference against segpipe's own segmenter pool, on the same scene, model and tiles.

    python -m benchmarks.bench_raydata [--mp 16] [--model null] [--out benchmarks/results/raydata.json]

Each method runs in its own process on a mirror tiling of real imagery (built as ``benchmarks.bench_pipeline``
builds its scenes), the scene read in place, the same plan, batches and COG export:

- **pool**: ``segpipe run SCENE OUT --no-prefect --executor ray --model M``: the driver hands each segmenter actor
  calls of a few batches of tile indices; the actor reads, decodes and normalises tiles on its reader threads while
  the model runs, and writes on its writer thread.
- **Ray Data**: ``ray.data.from_items(tile indices).map_batches(read)`` as CPU tasks (read, decode, normalise;
  the pixels go through Ray's object store) ``.map_batches(Segment, concurrency=1)`` (an actor with the model,
  which runs it and the merger's aggregate into the work store), with Ray Data's backpressure and ordered
  batches (``preserve_order``: the same batches, so the same bytes); then the same export.

Both masks must be byte-identical (a check; exit 1 otherwise). Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import bench_pipeline as bp
from segpipe.core.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "raydata.json"


class _Read:
    """Ray Data CPU task body: a batch of tile indices -> normalised inputs, validity and the indices."""

    def __init__(self, scene: Any, grid: Any, mean: Sequence[float], std: Sequence[float]) -> None:
        self.scene, self.grid, self.mean, self.std = scene, grid, mean, std

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from segpipe.core.pixels import normalise  # lazy: timed, in run_raydata's validate
        from segpipe.pipeline.tile_reader import SceneTiles  # lazy: timed, in run_raydata's validate

        reader = SceneTiles(self.scene)
        try:
            xs, oks = [], []
            for index in batch["index"]:
                pixels, ok = reader.read(self.grid.tile_at(int(index)))
                xs.append(normalise(pixels, self.mean, self.std, ok))
                oks.append(ok)
        finally:
            reader.close()
        return {"x": np.stack(xs), "ok": np.stack(oks), "index": np.asarray(batch["index"])}


class _Segment:
    """Ray Data actor body: the model (a segpipe segmenter) runs each batch and aggregates it into the store."""

    def __init__(self, spec: Any, store_url: str, recipe: Any) -> None:
        from segpipe.pipeline.infer import TileSegmenter  # lazy: timed, in run_raydata's validate

        self.segmenter = TileSegmenter(spec)
        self.segmenter._open(store_url, recipe)
        self.compute = 0.0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = self.segmenter
        start = time.perf_counter()
        scores = seg._forward(batch["x"])
        self.compute += time.perf_counter() - start
        seg.merger.aggregate([seg.grid.tile_at(int(i)) for i in batch["index"]], scores, batch["ok"])
        return {"tiles": np.asarray([len(batch["index"])]), "compute": np.asarray([self.compute])}


def run_raydata(scene: str, model: str, out: str, work: str) -> dict[str, Any]:
    """The Ray Data method, in this process; returns its stage seconds."""
    t0 = time.perf_counter()
    import ray  # lazy: timed, in run_raydata's validate

    from segpipe.pipeline import store as ws  # lazy: timed, in run_raydata's validate
    from segpipe.pipeline.ingest import index_scene  # lazy: timed, in run_raydata's validate
    from segpipe.pipeline.plan import make_plan  # lazy: timed, in run_raydata's validate
    from segpipe.pipeline.session import Session  # lazy: timed, in run_raydata's validate
    from segpipe.pipeline.settings import RunSettings  # lazy: timed, in run_raydata's validate
    from segpipe.pipeline.tile import plan_tiles  # lazy: timed, in run_raydata's validate

    plan = make_plan(RunSettings(input=scene, output=out, model=model, ingest="never", overwrite=True))
    meta_mean, meta_std = _normalisation(plan.model.path)
    seconds: dict[str, float] = {"validate": time.perf_counter() - t0}
    with Session(ray=True) as session:
        seconds["session"] = time.perf_counter() - t0 - sum(seconds.values())
        store = ws.WorkStore(ws.store_url(work, scene))
        recipe = plan.recipe
        index_scene(plan.scene, store, chunk_size=recipe.tile_size)
        store.prepare_run(recipe.digest(), plan.grid, len(plan.model.classes), probabilities=False,
                          tile_probabilities=False)  # fmt: skip
        tiles = [i for batch in plan_tiles(store, plan.grid, recipe.batch_size).batches for i in batch]
        cores = int(session.ray.cluster_resources().get("CPU", 1))
        spec = plan.model.spec("cpu", cores)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        t = time.perf_counter()
        results = (
            ray.data.from_items([{"index": i} for i in tiles])
            .map_batches(_Read, fn_constructor_args=(plan.scene, plan.grid, meta_mean, meta_std),
                         batch_size=recipe.batch_size, num_cpus=1, concurrency=max(1, cores - 1))
            .map_batches(_Segment, fn_constructor_args=(spec, store.url, recipe), batch_size=recipe.batch_size,
                         num_cpus=1, concurrency=1)
            .take_all()
        )  # fmt: skip
        store.finish_run(recipe.digest())
        seconds["infer"] = time.perf_counter() - t
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            plan.sinks[0].write(store, class_names=plan.model.classes, colours=plan.model.colours,
                                scratch_dir=Path(scratch), workers=cores)  # fmt: skip
        seconds["export"] = time.perf_counter() - t
    computed = sum(int(r["tiles"]) for r in results)
    compute = max((float(r["compute"]) for r in results), default=0.0)
    return {"seconds": seconds, "tiles": computed, "compute_s": compute}


def _normalisation(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from segpipe.models.metadata import find_metadata, read_metadata  # lazy: timed, in run_raydata's validate

    meta = read_metadata(find_metadata(path))
    return tuple(meta.mean), tuple(meta.std)


def _measure_raydata(bench: bp.Bench, setup: bp.Setup, model: str, out: Path) -> dict[str, Any]:
    config = bench.scratch / "work" / "raydata.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="raydata-", dir=bench.scratch / "work")
    config.write_text(json.dumps({"scene": setup.scene, "model": model, "out": str(out), "work": work}))
    m = bp.run_measured([sys.executable, "-m", "benchmarks.bench_raydata", "_raydata", str(config)])
    if m.returncode != 0:
        raise RuntimeError(f"Ray Data run failed: {m.stderr[-2000:]}")
    res = json.loads(m.stdout.strip().splitlines()[-1])
    stages = ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items())
    return bp._row(
        setup, setup.pixels / 1e6, "Ray Data streaming", m.seconds, None, peak_rss_gib=m.peak_bytes / bp.GIB,
        peak_pss_gib=m.peak_pss_bytes / bp.GIB, notes=f"read tasks + 1 model actor; {stages}",
        overhead={"overhead_s_per_mp": (res["seconds"]["infer"] - res["compute_s"]) / (setup.pixels / 1e6)},
        mask_sha256=sha256_file(out), detail=res,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_raydata":
        config = json.loads(Path(argv[1]).read_text())
        print(json.dumps(run_raydata(config["scene"], config["model"], config["out"], config["work"])))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_raydata", description=__doc__.split("\n\n")[0])
    p.add_argument("--mp", type=float, default=16.0, help="scene size, nominal megapixels (default 16)")
    p.add_argument("--model", default="null", help="model (default: the null model)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    p.add_argument("--scratch", type=Path, default=bp.DEFAULT_SCRATCH, help="scene cache and outputs")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    bench = bp.Bench(args=bp.build_parser().parse_args(["--model", args.model]), scratch=args.scratch)
    _, setup = bp._prepare(bench, args.mp, args.model)
    pool = bp._segpipe_run(bench, setup, args.mp, None, "segpipe pool", ["--no-prefect", "--executor", "ray"], None)
    out = bench.scratch / "outputs" / f"raydata-{setup.width}.tif"
    rows = [r for r in (pool, _measure_raydata(bench, setup, args.model, out)) if r is not None]
    if pool is not None:
        bench.check("Ray Data mask byte-identical to the pool's", rows[1]["mask_sha256"] == pool["mask_sha256"])
        pool.pop("summary", None)
    out.unlink(missing_ok=True)
    print(bp.format_table(rows))
    machine = bp.machine_description()
    record = {"machine": machine, "scene": bench.scenes[-1], "rows": rows, "checks": bench.checks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    failed = [c for c in bench.checks if not c["ok"]]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; checks failed: {len(failed)}; JSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
