"""The whole crash-point matrix: ``segpipe run`` and ``segpipe dataset`` SIGKILLed at every point of
:mod:`tests.reliability.crash_matrix`, each then run again; prints a Markdown table and writes the JSON.

    .venv/bin/python -m benchmarks.crash_matrix                          # every case (about 15 min on 2 cores)
    .venv/bin/python -m benchmarks.crash_matrix --points infer:inside,summary:before --kinds single

Each case: the command killed at the point (``tests/reliability/_crash_at.py``) while a watcher opens every visible
file of the output folder every 10 ms; the run's locks taken at once after the kill; its processes given
``REAP_SECONDS`` to be gone; the same command run again and its output folder compared with a clean run's (COGs
byte for byte, the GeoPackage but for its time stamp, JSON but for time fields and resume counters). Table columns,
per command: killed (at the point: exit -9 and the harness's mark), re-run identical, half-written file seen,
processes or locks left (with how many processes the run had and how long they took to go).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from segpipe.models.checkpoint import ClassInfo, ModelMetadata, save_checkpoint
from segpipe.models.registry import build_model
from tests.reliability.crash_matrix import KINDS, POINTS, CaseResult, Matrix, Point, lock_folder

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "crash-matrix.json"


def build_checkpoint(folder: Path) -> Path:
    """The tests' ``rgb_checkpoint`` (``tests/conftest.py``): a seeded, untrained RGB U-Net, base 4, depth 2."""

    torch.manual_seed(0)
    arguments = {"in_channels": 3, "num_classes": 3, "base_channels": 4, "depth": 2}
    module = build_model("unet", arguments).eval()
    metadata = ModelMetadata(
        architecture="unet",
        arguments=arguments,
        classes=tuple(ClassInfo(f"class{i}", c) for i, c in enumerate(("#E6194B", "#3CB44B", "#FFE119"))),
        bands=("red", "green", "blue"),
        mean=(100.0, 100.0, 100.0),
        std=(50.0, 50.0, 50.0),
        tile_size=64,
        halo=16,
        size_multiple=int(getattr(module, "size_multiple", 4)),
        input=None,
        provenance={"trained": False, "note": "crash matrix"},
    )
    folder.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(module, metadata, folder / "rgb.safetensors")


def _yes(value: bool) -> str:
    return "yes" if value else "**NO**"


def cells(result: CaseResult | None) -> list[str]:
    """killed? | re-run identical? | half-written seen? | processes/locks left, for one command's case."""
    if result is None:
        return ["n/a"] * 4
    if result.rerun_exit_code != 0:
        identical = f"**NO**: re-run exit {result.rerun_exit_code}"
    else:
        identical = "yes" if result.identical else "**NO**: " + "; ".join(result.differences)[:120]
    half = "none" if not result.half_written else "**SEEN**: " + "; ".join(result.half_written)[:120]
    left = [*result.processes_left, *result.locks_left, *(f"temporary {t}" for t in result.temporary_left)]
    gone = f"{result.processes_seen} process(es) gone in {result.reaped_seconds:.1f} s"
    leftover = f"none ({gone})" if not left else f"**{len(left)} left**: " + "; ".join(left)[:120]
    return [_yes(result.killed), identical, half, leftover]


def table(results: dict[tuple[str, str], CaseResult]) -> str:
    head = ["fault point (SIGKILL)", "state at the kill"]
    for kind in ("single scene", "data set"):
        head += [f"{kind}: killed?", "re-run identical?", "half-written seen?", "processes/locks left"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for at in POINTS:
        if not any((at.name, kind) in results for kind in KINDS):
            continue
        label = f"{at.when} {at.stage}" + (" (Ray)" if at.ray else "")
        row = [label, at.what]
        for kind in KINDS:
            row += cells(results.get((at.name, kind)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", help="comma-separated point names (default: all), e.g. infer:inside")
    parser.add_argument("--kinds", default=",".join(KINDS), help="single, dataset or both (default)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--scratch", type=Path, help="where the runs go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    wanted = set(args.points.split(",")) if args.points else {p.name for p in POINTS}
    unknown = wanted - {p.name for p in POINTS}
    if unknown:
        parser.error(f"unknown point(s) {', '.join(sorted(unknown))}; one of {', '.join(p.name for p in POINTS)}")
    kinds = [k for k in args.kinds.split(",") if k]
    todo: list[tuple[Point, str]] = [(p, k) for p in POINTS if p.name in wanted for k in p.kinds if k in kinds]
    root = args.scratch or Path(tempfile.mkdtemp(prefix="segpipe-crash-matrix-"))
    root.mkdir(parents=True, exist_ok=True)
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("RAY_USAGE_STATS_ENABLED", "0"),
                        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")):  # fmt: skip
        os.environ.setdefault(name, value)
    model = build_checkpoint(root / "model")
    matrix = Matrix(root, model)
    results: dict[tuple[str, str], CaseResult] = {}
    started = time.perf_counter()
    with lock_folder(root / "locks"):
        for at, kind in todo:
            t = time.perf_counter()
            result = matrix.case(at, kind)
            results[(at.name, kind)] = result
            problems = result.problems()
            print(f"{kind:8} {at.name:20} {time.perf_counter() - t:6.1f} s  {problems or 'ok'}",
                  file=sys.stderr, flush=True)  # fmt: skip
    seconds = time.perf_counter() - started
    text = table(results)
    print(text)
    failed = [f"{kind} {name}" for (name, kind), r in results.items() if r.problems()]
    report = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 1),
        "clean_run_seconds": matrix.clean_seconds,
        "cases": [r.to_dict() for r in results.values()],
        "failed": failed,
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{len(results)} cases in {seconds:.0f} s; {len(failed)} with problems; JSON: {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
