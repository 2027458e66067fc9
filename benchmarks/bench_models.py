"""Forward throughput and peak memory of each network at 512 and 1024 px tiles.

    python -m benchmarks.bench_models [--sizes 512,1024] [--repeats 3] [--device cpu|cuda] [--out FILE.json]

Each (network, size) runs in a fresh subprocess so its peak memory is its own: on CPU the peak resident set size
minus the RSS after the model is built; on CUDA ``torch.cuda.max_memory_allocated``. Throughput is megapixels of
input per second over ``--repeats`` timed forward passes (batch 1, inference mode, fp32 on CPU / bf16 autocast on
CUDA) after one warm-up pass. On CPU the malloc thresholds are raised as in segpipe's segmenters
(:func:`segpipe.core.runtime.retain_freed_memory`). Inputs are random normal tensors: the networks' cost does not
depend on content.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from segpipe.core.runtime import retain_freed_memory
from segpipe.models.registry import build_model

NETWORKS: dict[str, tuple[str, dict[str, Any]]] = {
    "unet (plain, ablation)": ("unet", {}),
    "unet + SE": (
        "attention_unet",
        {"channel_attention": "se", "self_attention": "none", "attention_gates": False},
    ),
    "unet + CBAM": ("attention_unet", {"self_attention": "none", "attention_gates": False}),
    "unet + gates": ("attention_unet", {"channel_attention": "none", "self_attention": "none"}),
    "unet + global self-attn": (
        "attention_unet",
        {"channel_attention": "none", "self_attention": "global", "attention_gates": False},
    ),
    "attention_unet (CBAM + local self-attn + gates, shipped)": ("attention_unet", {}),
}


def measure(architecture: str, extra: dict[str, Any], size: int, repeats: int, device: str) -> dict[str, Any]:
    """Run in the child process: build, warm up, time, and report peak memory."""

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if device == "cpu":
        retain_freed_memory()  # as segpipe's segmenters do: no page-fault churn per forward
    arguments = {"in_channels": 3, "num_classes": 6, "base_channels": 16, "depth": 4, **extra}
    model = build_model(architecture, arguments).eval().to(device)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, size, size, device=device)
    base_rss = _rss_bytes()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    with torch.inference_mode(), autocast:
        model(x)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {
        "parameters": params,
        "seconds_per_forward": seconds,
        "megapixels_per_second": size * size / 1e6 / seconds,
        "peak_memory_mib": peak / 2**20,
        "threads": threads,
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine() -> dict[str, Any]:

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| network | params | tile | s / forward | MP/s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['parameters'] / 1e6:.2f} M | {r['size']} | {r['seconds_per_forward']:.3f} | "
            f"{r['megapixels_per_second']:.3f} | {r['peak_memory_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="benchmarks/results/models.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["architecture"], spec["extra"], spec["size"], args.repeats, args.device)))
        return 0
    rows = []
    for name, (architecture, extra) in NETWORKS.items():
        for size in (int(s) for s in args.sizes.split(",")):
            spec = json.dumps({"architecture": architecture, "extra": extra, "size": size})
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_models",
                    "--child",
                    spec,
                    "--repeats",
                    str(args.repeats),
                    "--device",
                    args.device,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append({"network": name, "size": size, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(f"{name} @ {size}: {rows[-1]['megapixels_per_second']:.3f} MP/s", file=sys.stderr)
    report = {"machine": machine(), "device": args.device, "repeats": args.repeats, "rows": rows}
    print(f"machine: {report['machine']}\n")
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
