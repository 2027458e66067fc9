"""Check that ``segpipe run`` still writes byte-identical outputs: masks and probabilities against recorded hashes.

    python -m benchmarks.check_identical            # compare with benchmarks/results/identical.json
    python -m benchmarks.check_identical --record   # (re)write the reference hashes
    python -m benchmarks.check_identical --cases rgb-crop,rgb-cosine   # a subset

A refactoring that promises "outputs unchanged" runs this before and after. Every case is one ``segpipe run
INPUT OUTPUT --no-prefect`` (a local Ray instance, the shipped model, the model's default tile size and halo)
in a subprocess; the SHA-256 of every file it writes (mask COG, probabilities COG) is compared with the recorded
one. The summary JSON is not compared: it holds timings.

Cases: ``RGB.byte.tif`` (tests/data, Landsat 7, 791 x 718, nodata 0) with crop + probabilities and with cosine;
``cogeo.tif`` (../shared/data/rasterio, 1024 x 1024 aerial RGB) with crop and cosine; a 4096 x 4096 mirror
tiling of cogeo.tif (built as in ``benchmarks.bench_pipeline``) with crop and cosine. The hashes are those of
this machine's GDAL, zarr and torch builds: a different library version may change bytes without any change in
segpipe, and so may another CPU (its float kernels sum in another order: on a 2-core Intel Xeon the probabilities of
``rgb-crop-probabilities`` differ from the AMD EPYC's, with the same mask, for the code of the recording commit
too). The results file therefore keeps one reference per CPU model (``references``, keyed by ``/proc/cpuinfo``'s
model name); a CPU without one is "no reference" until ``--record`` adds it. Exit status 1 when any case differs or
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_pipeline import DEFAULT_SOURCE, build_scene
from segpipe.core.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "identical.json"


@dataclass(frozen=True)
class Case:
    name: str
    scene: str  # "rgb", "cogeo" or "mirror4096"
    options: tuple[str, ...]
    probabilities: bool = False


CASES = (
    Case("rgb-crop-probabilities", "rgb", ("--blend", "crop"), probabilities=True),
    Case("rgb-cosine", "rgb", ("--blend", "cosine")),
    Case("cogeo-crop", "cogeo", ("--blend", "crop")),
    Case("cogeo-cosine", "cogeo", ("--blend", "cosine")),
    Case("mirror4096-crop", "mirror4096", ("--blend", "crop")),
    Case("mirror4096-cosine", "mirror4096", ("--blend", "cosine")),
)


def scene_path(kind: str, scratch: Path) -> Path:
    if kind == "rgb":
        return REPO / "tests" / "data" / "RGB.byte.tif"
    if kind == "cogeo":
        return DEFAULT_SOURCE
    if kind == "mirror4096":
        return build_scene(DEFAULT_SOURCE, 4096, scratch / "scenes")[0]
    raise ValueError(f"unknown scene {kind!r}")


def run_case(case: Case, scratch: Path) -> dict[str, object]:
    scene = scene_path(case.scene, scratch)
    out = scratch / case.name / "mask.tif"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("segpipe")), "run", str(scene), str(out), "--no-prefect", "--overwrite"]
    cmd += list(case.options)
    files = {"mask": out}
    if case.probabilities:
        files["probabilities"] = out.with_name("probabilities.tif")
        cmd += ["--probabilities", str(files["probabilities"])]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "seconds": seconds}
    return {"sha256": {k: sha256_file(v) for k, v in files.items()}, "seconds": seconds}


def cpu_model() -> str:
    """This machine's CPU model name (``/proc/cpuinfo``), or ``platform.processor()`` elsewhere."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_references(path: Path) -> dict[str, dict[str, object]]:
    """CPU model -> {machine, recorded, cases}. The first format (one ``cases`` table) was recorded on an AMD EPYC."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if "references" in saved:
        references: dict[str, dict[str, object]] = saved["references"]
        return references
    return {"AMD EPYC": saved}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check_identical", description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", help="write the reference hashes instead of comparing")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--scratch", type=Path, default=Path(os.environ.get("SEGPIPE_BENCH_DIR", "/tmp/segpipe-bench")))
    args = parser.parse_args(argv)
    chosen = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    references = load_references(args.results)
    cpu = cpu_model()
    # the first reference names only the CPU family ("AMD EPYC"): a model name that starts with it uses it
    mine = references.get(cpu) or next((v for k, v in references.items() if cpu.startswith(k)), {})
    reference: dict[str, Any] = dict(mine.get("cases", {}))  # type: ignore[call-overload]
    print(f"CPU {cpu}: {'comparing with its reference of ' + str(mine.get('recorded')) if mine else 'no reference'}")
    failures = 0
    found: dict[str, object] = {}
    args.scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="check-identical-", dir=args.scratch) as tmp:
        for case in chosen:
            result = run_case(case, Path(tmp))
            found[case.name] = result
            if "error" in result:
                status = f"FAILED: {result['error']}"
                failures += 1
            elif args.record:
                status = "recorded"
            elif case.name not in reference:
                status = "no reference"
                failures += 1
            elif reference[case.name]["sha256"] == result["sha256"]:
                status = "identical"
            else:
                status = "DIFFERENT"
                failures += 1
            print(f"{case.name:<26} {result['seconds']:>7} s  {status}", flush=True)
    if args.record and not failures:
        references[cpu] = {
            "machine": f"{cpu}, {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "recorded": time.strftime("%Y-%m-%d"),
            "cases": {**reference, **found},
        }
        args.results.write_text(json.dumps({"references": references}, indent=2) + "\n")
        print(f"wrote {args.results}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
