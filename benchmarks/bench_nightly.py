"""Two nights of a data set: 20 small real scenes segmented in one night, then a night in which 1 of them changed.

    python -m benchmarks.bench_nightly [--scenes 20] [--out benchmarks/results/nightly.json]

The scenes are the small real rasters of ../shared/data (the georeferenced aerial rasters, then Dubai aerial
images), copied into a folder. Each night is the ``segpipe dataset FOLDER OUT`` command in a subprocess, on the
embedded defaults (the shipped model, Prefect's temporary server), timed from process start to exit.

- **Fixed start**: the wall time of a night over a data set of one scene that is already done (skipped as
  unchanged): process start, Prefect's temporary server, the model, the session, the plan, the collection, exit.
- **Night 1**: all scenes new. Target: wall <= start + the sum of the scenes' compute (the model's forward passes,
  ``segmenter_seconds.compute`` of each summary) + 1 s per scene.
- **Night 2**: one scene's pixels rewritten (flipped left-right, same grid), the others untouched. Target: only
  that scene recomputed, with the reason ``changed scene``; wall <= start + its compute + 0.2 s per skipped scene.

The breakdown printed splits each night into the command's start (to the flow's first line), planning (opening
every scene's header and reading the outputs' keys), the scenes (what each cost beyond its compute: ingest, export,
COG validation, STAC Item) and the rest. Prints a table and writes JSON with the machine's description. Run it on
an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import rasterio

from benchmarks.bench_cluster import ENV, REPO, machine, small_scenes

OUT = REPO / "benchmarks" / "results" / "nightly.json"


def night(folder: Path, out: Path, cwd: Path) -> dict[str, Any]:
    """Run one night; its wall time, the report it printed and each scene's compute from its summary."""
    started = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("segpipe")), "dataset", str(folder), str(out)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"segpipe dataset failed: {done.stderr.strip()[-800:]}")
    report = json.loads(done.stdout)
    computed = {}
    for name in report["done"]:
        summary = json.loads((out / f"{name}.mask.summary.json").read_text())
        computed[name] = summary["segmenter_seconds"]["compute"]
    scene_seconds = sum(r["seconds"] for r in report["scenes"])
    return {
        "wall_s": round(wall, 2),
        "flow_s": report["seconds"],
        "scenes_s": round(scene_seconds, 2),
        "compute_s": computed,
        "done": report["done"],
        "skipped": report["skipped"],
        "failed": report["failed"],
        "reasons": {r["scene"]: r["reason"] for r in report["scenes"]},
        "megapixels": round(sum(r["megapixels"] or 0 for r in report["scenes"]), 2),
    }


def flip(path: Path) -> None:
    """Rewrite a scene's pixels (mirrored left-right) on the same grid, as a re-delivered scene would be."""
    with rasterio.open(path) as src:
        profile, data = src.profile, src.read()
    scratch = path.with_name(f".{path.name}.new")
    with rasterio.open(scratch, "w", **profile) as dst:
        dst.write(data[:, :, ::-1])
    scratch.replace(path)


def breakdown(run: dict[str, Any], label: str) -> str:
    compute = sum(run["compute_s"].values())
    command_start = run["wall_s"] - run["flow_s"]
    per_scene = (run["scenes_s"] - compute) / max(len(run["done"]), 1)
    rest = run["flow_s"] - run["scenes_s"]
    return (
        f"{label}: wall {run['wall_s']:.2f} s = command start and exit {command_start:.2f} s"
        f" + flow {run['flow_s']:.2f} s"
        f" (scenes {run['scenes_s']:.2f} s, of which compute {compute:.2f} s, i.e. {per_scene:.2f} s per computed"
        f" scene beyond compute; planning, session and collection {rest:.2f} s); done {len(run['done'])},"
        f" skipped {len(run['skipped'])}, failed {len(run['failed'])}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_nightly", description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench-nightly-"))
    try:
        sources = small_scenes(args.scenes)
        start, first, second = three_nights(scratch, sources)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    count = len(sources)
    bounds = {
        "night_1": start["wall_s"] + sum(first["compute_s"].values()) + 1.0 * count,
        "night_2": start["wall_s"] + sum(second["compute_s"].values()) + 0.2 * (count - 1),
    }
    lines = table(start, first, second, bounds)
    print("\n".join(lines))
    report = {
        "machine": machine(),
        "scenes": [s.name for s in sources],
        "start": start,
        "night_1": first,
        "night_2": second,
        "bounds_s": {name: round(bound, 2) for name, bound in bounds.items()},
        "met": {"night_1": first["wall_s"] <= bounds["night_1"], "night_2": second["wall_s"] <= bounds["night_2"]},
        "table": lines,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(report["met"].values()) else 1


def three_nights(scratch: Path, sources: list[Path]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The fixed start (a night of one scene, skipped), night 1 (every scene new) and night 2 (the first scene
    changed), each checked: what was computed, skipped, and why."""
    folder, out = scratch / "scenes", scratch / "masks"
    folder.mkdir()
    names = []
    for k, source in enumerate(sources):
        target = folder / f"{k:02d}-{source.stem}{source.suffix}"
        shutil.copyfile(source, target)
        names.append(target.stem)

    one, one_out = scratch / "one", scratch / "one-masks"
    one.mkdir()
    shutil.copyfile(folder / f"{names[0]}{sources[0].suffix}", one / f"{names[0]}{sources[0].suffix}")
    night(one, one_out, scratch)  # done once, so that the timed night below only skips it
    start = night(one, one_out, scratch)
    assert start["skipped"] == [names[0]], start
    print(breakdown(start, "fixed start (1 scene, skipped)"), flush=True)

    first = night(folder, out, scratch)
    assert sorted(first["done"]) == sorted(names) and not first["failed"], first
    print(breakdown(first, f"night 1 ({len(names)} new)"), flush=True)

    changed = names[0]
    flip(folder / f"{changed}{sources[0].suffix}")
    second = night(folder, out, scratch)
    assert second["done"] == [changed] and len(second["skipped"]) == len(names) - 1, second
    assert second["reasons"][changed] == "changed scene", second["reasons"]
    assert all(second["reasons"][n] == "unchanged" for n in names[1:]), second["reasons"]
    print(breakdown(second, "night 2 (1 changed)"), flush=True)
    return start, first, second


def table(start: dict[str, Any], first: dict[str, Any], second: dict[str, Any], bounds: dict[str, float]) -> list[str]:
    """The figures against their targets, as the lines of a Markdown table."""
    count = len(first["done"])
    first_per_scene = (first["wall_s"] - start["wall_s"] - sum(first["compute_s"].values())) / count
    second_per_skip = (second["wall_s"] - start["wall_s"] - sum(second["compute_s"].values())) / (count - 1)
    return [
        "| figure | measured | target |",
        "|---|---:|---:|",
        f"| fixed start (a night of 1 scene, skipped) | {start['wall_s']:.2f} s | - |",
        f"| night 1: {count} new scenes ({first['megapixels']} MP), wall | {first['wall_s']:.2f} s"
        f" | <= {bounds['night_1']:.2f} s |",
        f"| night 1: sum of compute | {sum(first['compute_s'].values()):.2f} s | - |",
        f"| night 1: per scene beyond start and compute | {first_per_scene:.2f} s | <= 1 s |",
        f"| night 2: 1 changed scene recomputed, {count - 1} skipped, wall | {second['wall_s']:.2f} s"
        f" | <= {bounds['night_2']:.2f} s |",
        f"| night 2: per skipped scene beyond start and the changed scene's compute | {second_per_skip:.2f} s"
        f" | <= 0.2 s |",
    ]


if __name__ == "__main__":
    sys.exit(main())
