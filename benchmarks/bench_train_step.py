"""Time one training step of the default networks on the CPU, with and without segpipe's CPU settings.

    .venv/bin/python -m benchmarks.bench_train_step [--architectures attention_unet,unet] [--steps 5] [--threads 2]

A step is what :func:`segpipe.models.training.train` does per batch: forward, weighted cross-entropy, backward and
an AdamW update, on a batch of 8 tiles of 256 x 256 px (BCHW, random pixels and labels: the cost does not depend on
them) with the default model's arguments (:data:`segpipe.models.train_default.ARGUMENTS`). Each configuration runs in
its own process, because the malloc setting (:func:`segpipe.core.runtime.retain_freed_memory`) cannot be undone:

- ``malloc``: glibc's mmap and trim thresholds raised, as :func:`segpipe.models.training.train` does on the CPU;
- ``channels_last``: model and inputs in channels-last memory format, as :func:`segpipe.models.training.train` does;
- precision ``fp32``, and ``bf16`` autocast where the CPU has bf16 instructions (what ``precision="auto"`` picks).

Prints a markdown table of the median step time over ``--steps`` steps (after 2 warm-up steps) and writes JSON
(``--out``, default ``benchmarks/results/train-step.json``) with the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.bench_models import machine
from segpipe.core.runtime import cpu_has_bf16, retain_freed_memory
from segpipe.models.registry import ARCHITECTURES, build_model
from segpipe.models.train_default import ARGUMENTS

REPO = Path(__file__).resolve().parents[1]
BATCH, TILE, WARMUP = 8, 256, 2


def time_steps(
    architecture: str, *, malloc: bool, channels_last: bool, precision: str, steps: int, threads: int
) -> list[float]:
    """Seconds of each of ``steps`` training steps (after the warm-up), in this process."""

    torch.set_num_threads(threads)
    if malloc:
        retain_freed_memory()
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(architecture, ARGUMENTS).to(memory_format=memory_format).train()  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss(weight=torch.rand(ARGUMENTS["num_classes"]) + 0.5, ignore_index=255)
    x = torch.rand(BATCH, ARGUMENTS["in_channels"], TILE, TILE).contiguous(memory_format=memory_format)
    y = torch.randint(0, ARGUMENTS["num_classes"], (BATCH, TILE, TILE))
    seconds = []
    for step in range(WARMUP + steps):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= WARMUP:
            seconds.append(time.perf_counter() - started)
    return seconds


def run_one(config: dict[str, Any], steps: int, threads: int) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; returns it with its step times."""
    command = [sys.executable, "-m", "benchmarks.bench_train_step", "--one", json.dumps(config)]
    command += ["--steps", str(steps), "--threads", str(threads)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{config}: exit {result.returncode}: {result.stderr.strip()[-500:]}")
    seconds = json.loads(result.stdout.strip().splitlines()[-1])
    return {**config, "seconds": seconds, "median_s": statistics.median(seconds)}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of median step times, with the speed-up over neither setting at the same precision."""
    lines = [
        "| network | precision | malloc | channels-last | median step (s) | speed-up |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        base = next(
            b["median_s"]
            for b in rows
            if (b["architecture"], b["precision"]) == (r["architecture"], r["precision"])
            and not b["malloc"]
            and not b["channels_last"]
        )
        lines.append(
            f"| {r['architecture']} | {r['precision']} | {'yes' if r['malloc'] else 'no'} | "
            f"{'yes' if r['channels_last'] else 'no'} | {r['median_s']:.2f} | {base / r['median_s']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--architectures", default="attention_unet,unet")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train-step.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration, in this process
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        print(f"error: expected --steps >= 1 and --threads >= 1, got {args.steps} and {args.threads}", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(time_steps(**json.loads(args.one), steps=args.steps, threads=args.threads)))
        return 0

    architectures = [a.strip() for a in args.architectures.split(",") if a.strip()]
    unknown = sorted(set(architectures) - set(ARCHITECTURES))
    if unknown or not architectures:
        print(f"error: expected architectures among {', '.join(ARCHITECTURES)}, got {unknown}", file=sys.stderr)
        return 2
    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    rows = []
    for architecture, precision, (malloc, channels_last) in itertools.product(
        architectures, precisions, [(False, False), (True, False), (True, True)]
    ):
        config = dict(architecture=architecture, precision=precision, malloc=malloc, channels_last=channels_last)
        rows.append(run_one(config, args.steps, args.threads))
        print(f"{config}: {rows[-1]['median_s']:.2f} s", file=sys.stderr)
    report = {
        "command": "python -m benchmarks.bench_train_step " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "batch": BATCH,
        "tile": TILE,
        "threads": args.threads,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
