"""Screen training recipes of the default model on the held-out Dubai tile: short runs, one table.

    .venv/bin/python -m benchmarks.bench_recipes [--variants base,ds2,...] [--epochs 12] [--threads 1] [--jobs 2]

Each variant is the default training run (:mod:`segpipe.models.train_default`: data split, seed, schedule
shape) with the plain U-Net, ``--epochs`` epochs and a few settings changed (:data:`VARIANTS`). ``--jobs``
variants run at once,
each in its own process with ``--threads`` torch threads (on 2 cores, two one-thread runs get more done than one
two-thread run). Work folders go to ``--work-dir/<variant>`` (default ``out/recipes``): a finished variant is read
back, an interrupted one resumes.

The validation mIoU of the held-out tile swings by up to 0.2 from one epoch to the next (its water and vegetation
flip class), so the table gives, beside the best epoch, the mean over epochs 4..N: a recipe that only raises the
best epoch by a few hundredths has not been shown to help. On the CPU a run is deterministic for a given thread
count, so the same command gives the same figures.

Prints a markdown table, then the best IoU each class reached in any epoch of any variant and their mean
(:func:`oracle`: an upper bound of what choosing among these runs' epochs could score), and writes JSON
(``--out``, default ``benchmarks/results/recipes.json``) with the machine and every epoch's record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.bench_models import machine
from segpipe.models.train_default import ARGUMENTS, DEFAULT_DATA, build_config
from segpipe.models.training import train

REPO = Path(__file__).resolve().parents[1]

#: Variant name -> (architecture, training-config overrides, architecture-argument overrides).
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "base": ("unet", {}, {}),
    "ds2": ("unet", {"tile_size": 512}, {"downsample": 2}),
    "cj3": ("unet", {"colour_jitter": 0.3}, {}),
    "cj3s1": ("unet", {"colour_jitter": 0.3, "saturation_jitter": 1.0}, {}),
    "uniform": ("unet", {"sample_by_area": False}, {}),
    "nocw": ("unet", {"class_weighting": "none"}, {}),
    "lovasz": ("unet", {"lovasz_weight": 1.0}, {}),
    "attention": ("attention_unet", {}, {}),
}

DESCRIPTIONS: dict[str, str] = {
    "base": "plain U-Net, default recipe (colour jitter 0.1, inverse-sqrt class weights, 256 px tiles)",
    "ds2": "network at half resolution (downsample 2), 512 px tiles: same cost, 4x the context",
    "cj3": "colour jitter 0.3 (per-band gain 0.7-1.3, offset +-38)",
    "cj3s1": "colour jitter 0.3 + saturation jitter 1.0 (some tiles nearly grey)",
    "uniform": "images sampled uniformly instead of by area (tile-7 is 48 % of the pixels)",
    "nocw": "no class weights",
    "lovasz": "cross-entropy + Lovasz-softmax (weight 1)",
    "attention": "attention U-Net (the shipped architecture), default recipe",
}


def run_variant(name: str, epochs: int, threads: int, work_dir: str, data: str) -> dict[str, Any]:
    """Train one variant (or read it back / resume it); returns its summary and per-epoch history."""

    architecture, overrides, arguments = VARIANTS[name]
    config = build_config(
        architecture,
        data=Path(data),
        work_dir=Path(work_dir) / name,
        resume=True,
        num_threads=threads,
        device="cpu",
        progress=False,
    )
    config = dataclasses.replace(config, arguments={**ARGUMENTS, **arguments}, epochs=epochs, **overrides)
    started = time.perf_counter()
    result = train(config)
    history = [dataclasses.asdict(r) for r in result.history]
    settled = [r["val_miou"] for r in history if r["epoch"] >= 4 and r["val_miou"] is not None]
    return {
        "variant": name,
        "description": DESCRIPTIONS[name],
        "architecture": architecture,
        "overrides": overrides,
        "arguments": arguments,
        "epochs": epochs,
        "threads": threads,
        "best_epoch": result.best_epoch,
        "best_miou": result.best_miou,
        "best_iou": dict(result.per_class_iou),
        "mean_miou_from_epoch_4": sum(settled) / len(settled) if settled else None,
        "train_seconds": result.train_seconds,
        "this_call_seconds": round(time.perf_counter() - started, 1),
        "history": history,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the variants' results."""
    lines = [
        "| variant | what | best mIoU (epoch) | mean mIoU, epochs 4-N | building | land | road | vegetation | water |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        iou = r["best_iou"]
        cells = " | ".join(f"{iou.get(c) or 0:.3f}" for c in CLASSES)
        mean = r["mean_miou_from_epoch_4"]
        lines.append(
            f"| {r['variant']} | {r['description']} | {r['best_miou']:.3f} ({r['best_epoch']}) | "
            f"{'-' if mean is None else f'{mean:.3f}'} | {cells} |"
        )
    return "\n".join(lines)


CLASSES = ("building", "land", "road", "vegetation", "water")


def oracle(histories: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Best IoU each class reached in any epoch of any run, and their mean.

    An upper bound of what picking epochs could give, not a score of one model: each class may come from another
    epoch and run. A mean below the target says no run's epoch (nor a choice among them) reaches it.
    """
    best: dict[str, float] = {}
    for history in histories:
        for record in history:
            for name, iou in (record.get("val_iou") or {}).items():
                if name in CLASSES and iou is not None:
                    best[name] = max(best.get(name, 0.0), float(iou))
    per_class = {name: best.get(name, 0.0) for name in CLASSES}
    epochs = sum(1 for history in histories for r in history if r.get("val_iou"))
    return {"per_class_iou": per_class, "miou": sum(per_class.values()) / len(CLASSES), "epochs": epochs}


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_recipes", description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work-dir", type=Path, default=REPO / "out" / "recipes")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recipes.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names or args.epochs < 4 or args.threads < 1 or args.jobs < 1:
        print(
            f"error: expected variants among {', '.join(VARIANTS)}, --epochs >= 4, --threads >= 1 and --jobs >= 1; "
            f"got unknown {unknown}, {args.epochs}, {args.threads}, {args.jobs}",
            file=sys.stderr,
        )
        return 2
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(run_variant, name, args.epochs, args.threads, str(args.work_dir), str(args.data))
            for name in names
        ]
        rows, failed = [], []
        for name, future in zip(names, futures, strict=True):
            try:
                rows.append(future.result())
            except Exception as exc:  # one variant's failure must not lose the others' results
                failed.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
                print(f"error: variant {name}: {exc}", file=sys.stderr)
    best_of_all = oracle([r["history"] for r in rows])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python -m benchmarks.bench_recipes " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "variants": rows,
        "failed": failed,
        "oracle": best_of_all,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    cells = ", ".join(f"{name} {iou:.3f}" for name, iou in best_of_all["per_class_iou"].items())
    print(
        f"\nBest IoU of each class in any of the {best_of_all['epochs']} epochs: {cells}; "
        f"mean {best_of_all['miou']:.3f}"
    )
    print(f"\nJSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
