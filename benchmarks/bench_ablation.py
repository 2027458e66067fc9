"""Does attention help? A seeded, per-mechanism ablation of the attention U-Net on two held-out areas (issue 19).

    .venv/bin/python -m benchmarks.bench_ablation [--epochs 12] [--steps 30] [--seeds 3] [--jobs 1] [--threads 1]
        [--variants plain,se,cbam,gates,global,local,full] [--held-out tile-1,tile-2] [--report]

A *run* is one training run of the default recipe (:mod:`segpipe.models.train_default`: batch 8 of 256 px tiles
sampled by area, colour jitter 0.1, AdamW lr 2e-3 with 30 warm-up steps and cosine decay, inverse-sqrt class
weights, "unlabeled" ignored, bf16 autocast on CPUs that have it) for one (variant, held-out area, seed), with
``--epochs`` x ``--steps`` optimizer steps: the same schedule for every variant. Variants (:data:`VARIANTS`) are
the plain U-Net and the attention U-Net with one mechanism switched on at a time, plus everything at once (the
shipped configuration); all have base width 16 and depth 4, and no mechanism changes a channel width.

Held-out areas (whole tile folders, never single images, so overlapping images of one area cannot leak):

- ``tile-1``: trained on tiles 2-7 (the shipped model's split).
- ``tile-2``: trained on tiles 3-7; tile-1 is never trained on, so neither area's runs see the other's
  held-out tile-1. Class shares of the tiles' labelled pixels (computed from the mask PNGs, 2026-12):

  ======  =====  ======  ========  ====  ====  ==========  =====
  tile    Mpx    share   building  land  road  vegetation  water
  ======  =====  ======  ========  ====  ====  ==========  =====
  tile-1   4.6    6.6 %     5.3    62.4  12.8      4.7      14.0
  tile-2   2.5    3.5 %    12.3    59.7  12.7      5.8       7.3
  tile-3   4.0    5.7 %     3.0    46.1   7.4      4.3      36.6
  tile-4   8.4   11.9 %    40.3    28.9  13.2      6.7      10.9
  tile-5  10.7   15.2 %     1.9    38.1   4.3      2.9      52.4
  tile-6   6.5    9.2 %     1.8    25.0   0.8     32.4      39.8
  tile-7  33.7   47.9 %     8.9    72.8   9.3      7.4       1.5
  ======  =====  ======  ========  ====  ====  ==========  =====

  Why tile-2: tile-7 would take half the training pixels away. Of the other five only tile-2 and tile-4 have every
  class at >= 5 % of their pixels (tile-3 building 3.0 %, tile-5 building 1.9 %, tile-6 road 0.8 %: an IoU of a
  class that small is noise). Holding tile-2 out costs training 3.5 % of the pixels and at most 5.3 % of any
  class's (road), while tile-4 holds 46 % of all building pixels and 19 % of the road pixels, so holding it out
  would change what the networks learn buildings from, not only where they are scored.

Each run is scored on its held-out tile after every epoch (whole images, mIoU over the five real classes). Two
figures per run: the best epoch's mIoU (optimistic: the epoch is picked on the tile it is scored on) and the
*settled* score, the mean mIoU of the last five epochs (at low learning rate; what the run has learnt, not one
epoch's swing). The table gives mean +- std (sample std, n - 1) over the runs per variant and held-out area, and
pooled over both areas. The test (:func:`paired_test`) pairs each mechanism's runs with the plain U-Net's of the
same (seed, held-out area), takes the mean of the paired differences of the settled scores and a percentile
bootstrap 95 % interval of that mean, and compares the mean with the seed spread (:func:`seed_spread`: the std of
the plain U-Net's settled score over seeds, pooled within areas). A mechanism is shown to help only if its mean gain
exceeds the seed spread and its interval excludes 0. The same test is printed against the full attention U-Net.

Per variant, once: parameters and forward time per megapixel (:func:`measure_forward`: batch 1 of 1024 x 1024 px,
inference mode, the training precision, ``--threads`` threads; seconds per megapixel of input).

Records every run in ``--out`` (default ``benchmarks/results/ablation.json``) as a ``runs`` list (variant,
architecture and arguments, seed, held-out tile, training tiles, schedule, per-epoch per-class IoU and mIoU, best
and settled scores, parameters, forward s/MP, wall seconds, machine), written atomically after every run, with the
table and the tests. Work folders go to ``--work-dir/<variant>/<held-out>/seed-<seed>`` (default ``out/ablation``,
git-ignored): a run already in the JSON is skipped, a finished work folder is read back, an interrupted one resumes
after its last epoch; so the same command, re-run, costs only what is left. ``--jobs`` runs train at once, each in
its own process with ``--threads`` torch threads. Runs are ordered seed by seed and area by area, so an interrupted
benchmark leaves complete paired sets. ``--report`` only prints the table and tests from the JSON.

The schedule, its measurements and the expected duration are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_models import machine
from benchmarks.bench_recipes import CLASSES, REPO
from segpipe.core.location import Location
from segpipe.core.runtime import retain_freed_memory
from segpipe.models.data import split_folders
from segpipe.models.registry import build_model
from segpipe.models.train_default import ARGUMENTS, DEFAULT_DATA, HYPERPARAMETERS, build_config
from segpipe.models.training.config import TrainConfig
from segpipe.models.training.loop import train
from segpipe.models.training.optim import pick_precision

log = logging.getLogger("benchmarks.bench_ablation")

#: Variant name -> (architecture, architecture arguments beyond the shared width and depth).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("unet", {}),
    "se": ("attention_unet", {"channel_attention": "se", "self_attention": "none", "attention_gates": False}),
    "cbam": ("attention_unet", {"channel_attention": "cbam", "self_attention": "none", "attention_gates": False}),
    "gates": ("attention_unet", {"channel_attention": "none", "self_attention": "none", "attention_gates": True}),
    "global": ("attention_unet", {"channel_attention": "none", "self_attention": "global", "attention_gates": False}),
    "local": ("attention_unet", {"channel_attention": "none", "self_attention": "local", "attention_gates": False}),
    "full": ("attention_unet", {"channel_attention": "cbam", "self_attention": "local", "attention_gates": True}),
}

DESCRIPTIONS: dict[str, str] = {
    "plain": "plain U-Net",
    "se": "+ SE channel attention in every stage",
    "cbam": "+ CBAM (channel + 7x7 spatial attention) in every stage",
    "gates": "+ attention gates on every skip",
    "global": "+ global multi-head self-attention at the bottleneck",
    "local": "+ local (8x8-window) multi-head self-attention at the bottleneck",
    "full": "attention U-Net: CBAM + local self-attention + gates (shipped)",
}

#: The variant every mechanism is tested against, and the shipped one.
REFERENCE = "plain"
SHIPPED = "full"
#: Held-out tile folders: tile-1 (the shipped split) and tile-2 (see the module docstring for why).
HELD_OUT = ("tile-1", "tile-2")
#: The tile never trained on in any run (held out itself, or left out beside the other held-out tile).
NEVER_TRAINED = "tile-1"
#: Epochs averaged into the settled score.
SETTLED_EPOCHS = 5
#: Bootstrap resamples and their generator's seed (fixed: the same runs give the same interval).
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
#: Side of the square input of the forward-time measurement, in pixels (the shipped inference tile).
FORWARD_SIZE = 1024
#: Schedule defaults (chosen from measured epoch times on a 2-core AMD EPYC; see benchmarks/README.md).
DEFAULT_EPOCHS = 12
DEFAULT_STEPS = 30
DEFAULT_SEEDS = 3

RunKey = tuple[str, str, int]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: a variant trained with one seed, scored on one held-out tile, with the shared schedule."""

    variant: str
    held_out: str
    seed: int
    epochs: int
    steps_per_epoch: int

    @property
    def key(self) -> RunKey:
        return (self.variant, self.held_out, self.seed)

    def work_dir(self, root: Path) -> Path:
        return root / self.variant / self.held_out / f"seed-{self.seed}"


def run_key(record: Mapping[str, Any]) -> RunKey:
    """(variant, held-out tile, seed) of a run record."""
    return (str(record["variant"]), str(record["held_out"]), int(record["seed"]))


def seeds_for(count: int, first: int) -> list[int]:
    """``count`` consecutive seeds from ``first`` (the default recipe's seed)."""
    return [first + i for i in range(count)]


def plan(
    variants: Sequence[str], held_out: Sequence[str], seeds: Sequence[int], epochs: int, steps: int
) -> list[RunSpec]:
    """Every (variant, area, seed), ordered seed by seed, then area, then variant: an interrupted benchmark leaves
    whole paired sets (all variants of a seed and area) done before the next begins."""
    return [RunSpec(v, t, s, epochs, steps) for s in seeds for t in held_out for v in variants]


def pending(planned: Iterable[RunSpec], recorded: Iterable[Mapping[str, Any]]) -> list[RunSpec]:
    """The planned runs not yet recorded (in plan order); a recorded run is read back, not trained again."""
    done = {run_key(r) for r in recorded}
    return [spec for spec in planned if spec.key not in done]


def merge_run(runs: Sequence[Mapping[str, Any]], record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``runs`` with ``record`` added, replacing an earlier record of the same run; sorted by (variant, area, seed)
    in :data:`VARIANTS` order."""
    order = {name: i for i, name in enumerate(VARIANTS)}
    kept = [dict(r) for r in runs if run_key(r) != run_key(record)] + [dict(record)]
    return sorted(kept, key=lambda r: (order.get(r["variant"], len(order)), r["held_out"], r["seed"]))


def schedule_conflicts(report: Mapping[str, Any], epochs: int, steps: int) -> list[str]:
    """Descriptions of recorded runs whose schedule differs from ``epochs`` x ``steps`` (one file, one schedule)."""
    return [
        f"{r['variant']}/{r['held_out']}/seed {r['seed']}: {r['epochs']} x {r['steps_per_epoch']}"
        for r in report.get("runs", [])
        if (r.get("epochs"), r.get("steps_per_epoch")) != (epochs, steps)
    ]


# ---------------------------------------------------------------------------------------------------------- scores


def settled_score(history: Sequence[Mapping[str, Any]], last: int = SETTLED_EPOCHS) -> float | None:
    """Mean validation mIoU of the last ``last`` epochs (None if fewer epochs have a score)."""
    scores = [r["val_miou"] for r in history if r.get("val_miou") is not None]
    if len(scores) < last:
        return None
    return sum(scores[-last:]) / last


def settled_class_scores(history: Sequence[Mapping[str, Any]], last: int = SETTLED_EPOCHS) -> dict[str, float | None]:
    """Per real class (:data:`benchmarks.bench_recipes.CLASSES`), the mean IoU of the last ``last`` epochs (None
    for a class with a missing score among them, or with fewer epochs)."""
    scored = [r for r in history if r.get("val_miou") is not None][-last:]
    out: dict[str, float | None] = {}
    for name in CLASSES:
        values = [(r.get("val_iou") or {}).get(name) for r in scored]
        ok = len(scored) == last and all(v is not None for v in values)
        out[name] = sum(float(v) for v in values if v is not None) / last if ok else None
    return out


def best_score(history: Sequence[Mapping[str, Any]]) -> tuple[int, float] | None:
    """(epoch, mIoU) of the best-scoring epoch (the earliest on a tie), or None without scores."""
    scored = [(r["epoch"], r["val_miou"]) for r in history if r.get("val_miou") is not None]
    if not scored:
        return None
    epoch, score = max(scored, key=lambda item: (item[1], -item[0]))
    return int(epoch), float(score)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = sum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {'–' if std is None else f'{std:.3f}'} ({len(values)})"


def summary(runs: Sequence[Mapping[str, Any]], held_out: Sequence[str] = HELD_OUT) -> list[dict[str, Any]]:
    """Per variant (in :data:`VARIANTS` order, then others): for each held-out area and pooled, the runs' best and
    settled mIoU as ``{"n", "best": [mean, std], "settled": [mean, std], "settled_iou": {class: mean}}`` (std None
    for one run; an area without runs is left out), plus the parameters and forward seconds per megapixel of the
    variant's first run that has them."""
    order = list(VARIANTS) + sorted({r["variant"] for r in runs} - set(VARIANTS))
    rows: list[dict[str, Any]] = []
    for variant in order:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        groups: dict[str, list[Mapping[str, Any]]] = {t: [r for r in mine if r["held_out"] == t] for t in held_out}
        groups["pooled"] = [r for r in mine if r["held_out"] in held_out]
        cells: dict[str, Any] = {}
        for name, group in groups.items():
            best = [r["best_miou"] for r in group if r.get("best_miou") is not None]
            settled = [r["settled_miou"] for r in group if r.get("settled_miou") is not None]
            if best or settled:
                cells[name] = {
                    "n": len(group),
                    "best": list(mean_std(best)) if best else None,
                    "settled": list(mean_std(settled)) if settled else None,
                    "best_values": best,
                    "settled_values": settled,
                    "settled_iou": _class_means(group),
                }
        first = next((r for r in mine if r.get("parameters") is not None), {})
        rows.append(
            {
                "variant": variant,
                "description": DESCRIPTIONS.get(variant, variant),
                "parameters": first.get("parameters"),
                "forward_seconds_per_megapixel": first.get("forward_seconds_per_megapixel"),
                "areas": cells,
            }
        )
    return rows


def _class_means(runs: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Mean over ``runs`` of each class's settled IoU (None where no run has one)."""
    out: dict[str, float | None] = {}
    for name in CLASSES:
        values = [r["settled_iou"][name] for r in runs if (r.get("settled_iou") or {}).get(name) is not None]
        out[name] = sum(values) / len(values) if values else None
    return out


def format_table(rows: Sequence[Mapping[str, Any]], held_out: Sequence[str] = HELD_OUT) -> str:
    """Markdown table of :func:`summary`: mean ± std (runs) of the best epoch's and the settled mIoU."""
    columns = [*held_out, "pooled"]
    head = ["variant", "params", "forward s/MP"]
    for area in columns:
        head += [f"{area} best", f"{area} settled"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        params = row.get("parameters")
        forward = row.get("forward_seconds_per_megapixel")
        cells = [
            f"{row['variant']}: {row['description']}",
            "–" if params is None else f"{params / 1e6:.2f} M",
            "–" if forward is None else f"{forward:.2f}",
        ]
        for area in columns:
            cell = row["areas"].get(area, {})
            cells += [_cell(cell.get("best_values") or []), _cell(cell.get("settled_values") or [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ test


def paired_differences(
    runs: Sequence[Mapping[str, Any]], variant: str, reference: str, score: str = "settled_miou"
) -> list[tuple[str, int, float]]:
    """(held-out area, seed, ``score`` of ``variant`` minus that of ``reference``) for every (area, seed) both have
    scored, sorted by area then seed."""
    scores: dict[str, dict[tuple[str, int], float]] = {variant: {}, reference: {}}
    for r in runs:
        if r["variant"] in scores and r.get(score) is not None:
            scores[r["variant"]][(r["held_out"], int(r["seed"]))] = float(r[score])
    common = sorted(set(scores[variant]) & set(scores[reference]))
    return [(area, seed, scores[variant][(area, seed)] - scores[reference][(area, seed)]) for area, seed in common]


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement; deterministic)."""
    if not values:
        raise ValueError("bootstrap_interval of no values")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def seed_spread(
    runs: Sequence[Mapping[str, Any]], variant: str = REFERENCE, score: str = "settled_miou"
) -> float | None:
    """Std over seeds of ``variant``'s ``score``, pooled within held-out areas: the square root of the mean of the
    per-area sample variances (areas with >= 2 seeds). The areas' own difference is not seed noise, so it is left
    out. None when no area has two seeds."""
    by_area: dict[str, list[float]] = {}
    for r in runs:
        if r["variant"] == variant and r.get(score) is not None:
            by_area.setdefault(r["held_out"], []).append(float(r[score]))
    variances = [statistics.variance(v) for v in by_area.values() if len(v) >= 2]
    return math.sqrt(sum(variances) / len(variances)) if variances else None


def paired_test(
    runs: Sequence[Mapping[str, Any]], variant: str, reference: str = REFERENCE, score: str = "settled_miou"
) -> dict[str, Any]:
    """Is ``variant`` better than ``reference``? Mean paired difference of ``score`` over (seed, area), its
    bootstrap 95 % interval, the reference's seed spread, and the two verdicts (mIoU units throughout)."""
    pairs = paired_differences(runs, variant, reference, score)
    spread = seed_spread(runs, reference, score)
    out: dict[str, Any] = {
        "variant": variant,
        "reference": reference,
        "score": score,
        "pairs": [{"held_out": a, "seed": s, "difference": d} for a, s, d in pairs],
        "n": len(pairs),
        "seed_spread": spread,
        "mean_difference": None,
        "interval_95": None,
        "exceeds_seed_spread": None,
        "interval_excludes_zero": None,
    }
    if pairs:
        diffs = [d for _, _, d in pairs]
        mean = sum(diffs) / len(diffs)
        low, high = bootstrap_interval(diffs)
        out.update(
            mean_difference=mean,
            interval_95=[low, high],
            exceeds_seed_spread=None if spread is None else abs(mean) > spread,
            interval_excludes_zero=low > 0 or high < 0,
        )
    return out


def format_tests(tests: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`paired_test` results."""
    lines = [
        "| variant | vs | pairs | mean difference | bootstrap 95 % | seed spread | beyond seed spread | excludes 0 |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]

    def verdict(value: bool | None) -> str:
        return "–" if value is None else ("yes" if value else "no")

    for t in tests:
        mean, interval, spread = t["mean_difference"], t["interval_95"], t["seed_spread"]
        lines.append(
            f"| {t['variant']} | {t['reference']} | {t['n']} | {'–' if mean is None else f'{mean:+.3f}'} | "
            f"{'–' if interval is None else f'[{interval[0]:+.3f}, {interval[1]:+.3f}]'} | "
            f"{'–' if spread is None else f'{spread:.3f}'} | {verdict(t['exceeds_seed_spread'])} | "
            f"{verdict(t['interval_excludes_zero'])} |"
        )
    return "\n".join(lines)


def all_tests(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`paired_test` of every other recorded variant against :data:`REFERENCE`, then against
    :data:`SHIPPED`."""
    present = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    tests = [paired_test(runs, v, REFERENCE) for v in present if v != REFERENCE]
    if SHIPPED in present:
        tests += [paired_test(runs, v, SHIPPED) for v in present if v != SHIPPED]
    return tests


# ------------------------------------------------------------------------------------------------------- the runs


def split_for(data: Path, held_out: str) -> tuple[list[Path], list[Path]]:
    """(training folders, [held-out folder]): all tiles but ``held_out`` and :data:`NEVER_TRAINED`."""
    left_out = {held_out, NEVER_TRAINED}
    train_dirs, val_dirs = split_folders(data, validation=sorted(left_out))
    return train_dirs, [p for p in val_dirs if p.name == held_out]


def variant_arguments(variant: str) -> tuple[str, dict[str, Any]]:
    """(architecture, full architecture arguments) of ``variant``: the default run's width and depth, plus the
    variant's switches."""
    architecture, switches = VARIANTS[variant]
    return architecture, {**ARGUMENTS, **switches}


def train_run(spec: RunSpec, threads: int, work_root: str, data: str) -> dict[str, Any]:
    """Train one run (or read back a finished one, or resume an interrupted one); returns its record."""
    architecture, arguments = variant_arguments(spec.variant)
    config = run_config(spec, threads, Path(work_root), Path(data))
    train_dirs = config.train_dirs
    log.info("run %s/%s/seed %d: training on %s", spec.variant, spec.held_out, spec.seed, [p.name for p in train_dirs])
    started = time.perf_counter()
    result = train(config)
    history = [
        {k: v for k, v in dataclasses.asdict(r).items() if k != "raw_val_miou" or v is not None} for r in result.history
    ]
    best = best_score(history)
    precision = pick_precision(config.precision, torch.device("cpu"))
    return {
        "variant": spec.variant,
        "description": DESCRIPTIONS[spec.variant],
        "architecture": architecture,
        "arguments": arguments,
        "seed": spec.seed,
        "held_out": spec.held_out,
        "train_tiles": [p.name for p in train_dirs],
        "epochs": spec.epochs,
        "steps_per_epoch": spec.steps_per_epoch,
        "batch_size": config.batch_size,
        "tile_size": config.tile_size,
        "threads": threads,
        "precision": "fp32" if precision is None else str(precision).removeprefix("torch."),
        "best_epoch": None if best is None else best[0],
        "best_miou": None if best is None else best[1],
        "settled_miou": settled_score(history),
        "settled_epochs": SETTLED_EPOCHS,
        "settled_iou": settled_class_scores(history),
        "history": history,
        "wall_seconds": result.train_seconds,
        "cpu_seconds": result.cpu_seconds,
        "this_call_seconds": round(time.perf_counter() - started, 1),
        "work_dir": str(spec.work_dir(work_root)),
    }


def run_config(spec: RunSpec, threads: int, work_root: Path, data: Path) -> TrainConfig:
    """The default recipe's configuration for one run: its variant's network, its training and held-out tiles,
    the shared schedule and its seed, on the CPU with ``threads`` torch threads."""
    architecture, arguments = variant_arguments(spec.variant)
    train_dirs, val_dirs = split_for(data, spec.held_out)
    config = build_config(
        architecture,
        data=data,
        work_dir=spec.work_dir(work_root),
        resume=True,
        num_threads=threads,
        device="cpu",
        progress=False,
    )
    return dataclasses.replace(
        config,
        train_dirs=tuple(train_dirs),
        val_dirs=tuple(val_dirs),
        arguments=arguments,
        epochs=spec.epochs,
        steps_per_epoch=spec.steps_per_epoch,
        seed=spec.seed,
    )


def measure_forward(variant: str, threads: int, size: int = FORWARD_SIZE, repeats: int = 3) -> dict[str, Any]:
    """Parameters and forward seconds per megapixel of input of ``variant``: batch 1 of ``size`` x ``size`` px,
    eval and inference mode, the training precision (bf16 autocast on CPUs with bf16), ``threads`` torch threads,
    malloc thresholds raised as in segpipe's segmenters; median of ``repeats`` passes after one warm-up."""
    torch.set_num_threads(threads)
    retain_freed_memory()
    architecture, arguments = variant_arguments(variant)
    torch.manual_seed(0)
    model = build_model(architecture, arguments).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    precision = pick_precision("auto", torch.device("cpu"))
    x = torch.randn(1, arguments["in_channels"], size, size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_seconds_per_megapixel": seconds / (size * size / 1e6),
        "forward_size": size,
        "forward_threads": threads,
        "forward_precision": "fp32" if precision is None else str(precision).removeprefix("torch."),
    }


def _init_worker() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s")


# ----------------------------------------------------------------------------------------------------------- main


def build_report(
    runs: Sequence[Mapping[str, Any]], *, command: str, machine: Mapping[str, Any], forward: Mapping[str, Any],
    epochs: int, steps: int, failed: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:  # fmt: skip
    """The JSON document: runs, the per-variant forward measurements, the table and the tests."""
    rows = summary(runs)
    tests = all_tests(runs)
    return {
        "command": command,
        "machine": dict(machine),
        "schedule": {"epochs": epochs, "steps_per_epoch": steps, "settled_epochs": SETTLED_EPOCHS},
        "held_out": list(HELD_OUT),
        "forward": dict(forward),
        "runs": [dict(r) for r in runs],
        "failed": [dict(f) for f in failed],
        "summary": rows,
        "table_markdown": format_table(rows),
        "tests": tests,
        "tests_markdown": format_tests(tests),
    }


def _print_report(report: Mapping[str, Any]) -> None:
    schedule = report.get("schedule", {})
    print(
        f"\nmIoU on the held-out tile (5 classes), mean ± std (runs); best = best epoch, settled = mean of the last "
        f"{SETTLED_EPOCHS} epochs; {schedule.get('epochs')} epochs x {schedule.get('steps_per_epoch')} steps; "
        f"{len(report['runs'])} runs\n"
    )
    print(report["table_markdown"])
    print(
        "\nPaired test of the settled score over (seed, held-out area): mean difference, percentile bootstrap 95 % "
        f"interval ({BOOTSTRAP_RESAMPLES} resamples), seed spread = std over seeds of the reference's settled score "
        "(pooled within areas)\n"
    )
    print(report["tests_markdown"])
    for t in report["tests"]:
        if t["mean_difference"] is None:
            continue
        spread = "–" if t["seed_spread"] is None else f"{t['seed_spread']:.3f}"
        print(
            f"{t['variant']} vs {t['reference']}: {t['mean_difference']:+.3f} over {t['n']} pairs, "
            f"{'beyond' if t['exceeds_seed_spread'] else 'within'} the seed spread "
            f"{spread}; the 95 % interval "
            f"{'excludes' if t['interval_excludes_zero'] else 'includes'} 0"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--held-out", default=",".join(HELD_OUT), help=f"comma-separated, of {', '.join(HELD_OUT)}")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="seeds per (variant, area)")
    parser.add_argument("--first-seed", type=int, default=int(HYPERPARAMETERS["seed"]))
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work-dir", type=Path, default=REPO / "out" / "ablation")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ablation.json")
    parser.add_argument("--report", action="store_true", help="only print the table and tests of --out")
    return parser


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _problem(args: argparse.Namespace, previous: Mapping[str, Any]) -> str | None:
    """What is wrong with the command line (and the results file it names), or None."""
    variants, areas = _names(args.variants), _names(args.held_out)
    bad = sorted(set(variants) - set(VARIANTS)) + sorted(set(areas) - set(HELD_OUT))
    if bad or not variants or not areas or args.epochs < SETTLED_EPOCHS or min(args.steps, args.seeds) < 1:
        return (
            f"expected variants among {', '.join(VARIANTS)}, held-out areas among {', '.join(HELD_OUT)}, "
            f"--epochs >= {SETTLED_EPOCHS}, --steps >= 1 and --seeds >= 1; got unknown {bad}, {args.epochs}, "
            f"{args.steps}, {args.seeds}"
        )
    if args.threads < 1 or args.jobs < 1:
        return f"expected --threads >= 1 and --jobs >= 1, got {args.threads} and {args.jobs}"
    if args.report:
        return None if previous else f"{args.out} does not exist"
    conflicts = schedule_conflicts(previous, args.epochs, args.steps)
    if conflicts:
        return (
            f"{args.out} holds runs of another schedule ({'; '.join(conflicts[:3])}"
            f"{', ...' if len(conflicts) > 3 else ''}), not {args.epochs} x {args.steps}; one file holds one "
            "schedule: pass another --out (and --work-dir)"
        )
    return None


@dataclasses.dataclass
class Ledger:
    """What the benchmark has recorded (runs, forward measurements, failures), written to ``out`` after every
    change (:func:`build_report`)."""

    out: Path
    command: str
    machine: dict[str, Any]
    epochs: int
    steps: int
    runs: list[dict[str, Any]]
    forward: dict[str, Any]
    failed: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def save(self) -> None:
        report = build_report(
            self.runs,
            command=self.command,
            machine=self.machine,
            forward=self.forward,
            epochs=self.epochs,
            steps=self.steps,
            failed=self.failed,
        )
        Location(self.out).write_json(report)

    def record(self, spec: RunSpec, future: Future[dict[str, Any]], planned: Sequence[RunSpec]) -> None:
        """Record a finished run (or its failure: one run's failure must not lose the others' results)."""
        try:
            record = future.result()
        except Exception as exc:
            self.failed.append(
                {"variant": spec.variant, "held_out": spec.held_out, "seed": spec.seed, "error": repr(exc)}
            )
            print(f"error: run {spec.key}: {exc}", file=sys.stderr)
            self.save()
            return
        record.update(self.forward.get(spec.variant, {}), machine=self.machine)
        self.runs = merge_run(self.runs, record)
        self.save()
        log.info(
            "recorded %s/%s/seed %d: best %.3f (epoch %s), settled %s, %.0f s (%d of %d planned runs done)",
            spec.variant,
            spec.held_out,
            spec.seed,
            record["best_miou"] or float("nan"),
            record["best_epoch"],
            "–" if record["settled_miou"] is None else f"{record['settled_miou']:.3f}",
            record["wall_seconds"],
            len(planned) - len(pending(planned, self.runs)),
            len(planned),
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s")
    previous: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    problem = _problem(args, previous)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.report:
        _print_report(previous)
        return 0
    ledger = Ledger(
        out=args.out,
        command="python -m benchmarks.bench_ablation " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine(),
        epochs=args.epochs,
        steps=args.steps,
        runs=list(previous.get("runs", [])),
        forward=dict(previous.get("forward", {})),
    )
    variants = _names(args.variants)
    planned = plan(variants, _names(args.held_out), seeds_for(args.seeds, args.first_seed), args.epochs, args.steps)
    todo = pending(planned, ledger.runs)
    measure = [v for v in variants if v not in ledger.forward]
    print(
        f"{len(todo)} runs to train ({len(ledger.runs)} recorded), forward time of {len(measure)} variants to measure"
    )
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state inherited through fork
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context, initializer=_init_worker) as pool:
        for variant in measure:  # one at a time, before any training, so that nothing else runs beside it
            ledger.forward[variant] = pool.submit(measure_forward, variant, args.threads).result()
            log.info("forward %s: %s", variant, ledger.forward[variant])
        ledger.save()
        futures: dict[Future[dict[str, Any]], RunSpec] = {
            pool.submit(train_run, spec, args.threads, str(args.work_dir), str(args.data)): spec for spec in todo
        }
        for future in as_completed(futures):
            ledger.record(futures[future], future, planned)
    _print_report(json.loads(args.out.read_text()))
    print(f"\nJSON: {args.out}")
    return 1 if ledger.failed else 0


if __name__ == "__main__":
    sys.exit(main())
