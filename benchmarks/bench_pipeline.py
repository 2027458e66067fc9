"""End-to-end benchmark: ``segpipe run`` against the model-only limit and two peers, on the same scene and model.

    python -m benchmarks.bench_pipeline [--sizes 16,64,256] [--gigapixel] [--model default]
        [--out benchmarks/results/pipeline.json] [--skip-peers] [--workers-sweep 1,2]

For every scene size, in one run:

1. **Scene.** A square GeoTIFF of about N megapixels (side ``sqrt(N) * 1024`` pixels, so 16 -> 4096 x 4096,
   16.8 MP) built by mirror-tiling a real aerial image (``../shared/data/rasterio/cogeo.tif``, 1024 x 1024 RGB,
   0.6 m, EPSG:3857) with the source's CRS, origin and resolution; tiled 512 x 512, DEFLATE + horizontal
   predictor (lossless, so the pixels are exactly the source's). It is written window by window and cached
   under the scratch directory (a JSON sidecar records how it was built; a matching one is reused).
2. **Model-only limit.** The model's forward pass on in-memory tensors (real pixels of the scene, normalised)
   at segpipe's batch size, tile input size and precision, torch threads = cores: a few batches are timed and
   the time for exactly the scene's pixel count is extrapolated from them. The limit and the peers run with
   the same malloc thresholds as segpipe's segmenters (``segpipe.core.runtime.retain_freed_memory``;
   ``--plain-allocator`` turns that off), so that no method gains from the allocator alone.
3. **segpipe.** ``segpipe run SCENE OUT.tif --json`` as a subprocess (Prefect flow, Ray actors, zarr work
   store, COG out), and ``--no-prefect`` to separate Prefect's fixed start-up cost.
4. **Peers**, same model and scene: MONAI's ``sliding_window_inference`` (gaussian, overlap 0.25, roi = segpipe's
   tile input, sw_batch_size = segpipe's batch size; the whole scene in memory, blended softmax, then written
   as a GeoTIFF with rasterio), and a plain rasterio window loop without overlap (read window, forward, write).

Every method runs in its own process; a sampler adds up the RSS of that process and all its descendants (Ray's
raylet, GCS and workers, Prefect's server) every 0.2 s. RSS counts shared pages once per process, so the sum
over-counts shared libraries: it is an upper bound that is the same for every method.

Seam quality: on a 2048 x 2048 crop in the middle of the scene, the model is run once on the whole crop (with
a margin of real scene context around it, mirror-padded only where the margin leaves the scene), and each
method's output is compared with it: the fraction of pixels whose class differs.

Checks (not timings; a failure makes the run exit 1): segpipe's output is on exactly the input's grid (size,
CRS, transform); every output covers every pixel with a class.

Imports: every method's worker process imports this module (``python -m benchmarks.bench_pipeline _worker``), and
so does bench_slides' tissue worker, which times its own imports; so rasterio, torch and segpipe's stages are
imported by the functions that use them, and a worker loads only what it measures (the floor worker no torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.core.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "rasterio" / "cogeo.tif"
DEFAULT_SCRATCH = Path(os.environ.get("SEGPIPE_BENCH_DIR", "/tmp/segpipe-bench"))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "pipeline.json"
SCENE_VERSION = 1  # bump when the scene builder changes what it writes
GIB = 1024**3


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------- scenes


def scene_side(megapixels: float, multiple: int = 16) -> int:
    """Side in pixels of the square scene for a nominal size: ``sqrt(megapixels) * 1024``, rounded to
    ``multiple`` (16 -> 4096, 64 -> 8192, 256 -> 16384, 1024 -> 32768)."""
    if megapixels <= 0:
        raise ValueError(f"megapixels must be > 0, got {megapixels}")
    return max(multiple, round(math.sqrt(megapixels) * 1024 / multiple) * multiple)


def mirror_indices(start: int, count: int, size: int) -> np.ndarray:
    """Source indices of positions ``start .. start+count-1`` of an endless mirror tiling of a source of
    ``size`` pixels: 0 1 .. size-1 size-1 .. 1 0 0 1 .. (numpy's "symmetric" padding, period ``2*size``)."""
    i = np.arange(start, start + count, dtype=np.int64) % (2 * size)
    return np.where(i < size, i, 2 * size - 1 - i)


def build_scene(source: Path, side: int, scratch: Path, *, window: int = 2048, block: int = 512) -> tuple[Path, bool]:
    """Write (or reuse) a ``side x side`` mirror tiling of ``source`` as a tiled, compressed GeoTIFF.

    The scene keeps the source's CRS, origin and resolution (its extent grows to the right and down). It is
    written window by window (``window`` pixels square): memory holds the source and one window, never the
    scene. A JSON sidecar records source checksum and parameters; a scene whose sidecar matches is reused.

    Returns:
        ``(path, reused)``.
    """
    import rasterio  # lazy: measured workers import this module (see its docstring)

    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"{source.stem}-mirror-{side}x{side}.tif"
    sidecar = path.with_name(path.name + ".json")
    spec = {
        "source": str(source.resolve()),
        "source_sha256": sha256_file(source),
        "side": side,
        "tiling": "mirror (numpy 'symmetric'), period 2 x source size",
        "block": block,
        "compress": "DEFLATE, predictor 2",
        "version": SCENE_VERSION,
    }
    if path.is_file() and sidecar.is_file():
        with contextlib.suppress(ValueError):
            if json.loads(sidecar.read_text()) == spec:
                return path, True
    with rasterio.open(source) as src:
        data = src.read()
        profile = _scene_profile(src, side, block)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        _write_mirrored(tmp, data, profile, window)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar.write_text(json.dumps(spec, indent=2) + "\n")
    return path, False


def _scene_profile(src: Any, side: int, block: int) -> dict[str, Any]:
    """The GeoTIFF profile of a ``side`` x ``side`` scene with the bands, CRS and transform of the open ``src``:
    tiled in ``block`` px, DEFLATE with horizontal predictor (lossless)."""
    profile = {
        "driver": "GTiff",
        "width": side,
        "height": side,
        "count": src.count,
        "dtype": src.dtypes[0],
        "crs": src.crs,
        "transform": src.transform,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "DEFLATE",
        "predictor": 2,
        "interleave": "pixel",
        "bigtiff": "IF_SAFER",
        "num_threads": "ALL_CPUS",
    }
    if src.count == 3:
        profile["photometric"] = "RGB"
    return profile


def _write_mirrored(path: Path, data: np.ndarray, profile: dict[str, Any], window: int) -> None:
    """Write the endless mirror tiling of ``data`` (bands, h, w) onto the profile's grid, ``window`` px at a time."""
    import rasterio  # lazy: measured workers import this module (see its docstring)
    from rasterio.windows import Window  # lazy: as rasterio

    side = profile["width"]
    _, height, width = data.shape
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, side, window):
            rows = mirror_indices(r0, min(window, side - r0), height)
            for c0 in range(0, side, window):
                cols = mirror_indices(c0, min(window, side - c0), width)
                dst.write(
                    data[:, rows[:, None], cols[None, :]],
                    window=Window(c0, r0, len(cols), len(rows)),
                )


# --------------------------------------------------------------------------------------------------- memory


class TreeMemorySampler:
    """Peak RSS of a process and all its descendants, sampled every ``interval`` seconds on a thread.

    Use as a context manager around the work; ``peak_bytes`` is the largest sum seen, ``peak_processes`` the
    number of processes in that sample. The RSS sum counts shared pages once per process (an upper bound: every
    Ray worker maps torch's libraries). Every ``pss_every``-th sample also sums PSS (proportional set size:
    shared pages split between the processes that map them), the tree's actual share of RAM; reading it walks
    page tables, so it is sampled less often; ``peak_pss_bytes`` is its largest sum.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.2, pss_every: int = 5) -> None:
        import psutil  # lazy: the bench extra (psutil)

        self._psutil = psutil
        self.root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.peak_bytes = 0
        self.peak_processes = 0
        self.peak_pss_bytes = 0
        self.pss_every = pss_every
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """One sample: RSS of the root and every descendant now alive, in bytes (also updates the peak)."""
        psutil = self._psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        pss = 0
        alive = 0
        with_pss = self.samples % self.pss_every == 0
        for proc in procs:
            try:
                if with_pss:
                    full = proc.memory_full_info()
                    total += full.rss
                    pss += getattr(full, "pss", full.rss)
                else:
                    total += proc.memory_info().rss
                alive += 1
            except psutil.Error:
                continue
        self.samples += 1
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, alive
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemorySampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Measured:
    """One subprocess: wall seconds, peak RSS of its process tree, exit status, captured output."""

    seconds: float
    peak_bytes: int
    peak_processes: int
    peak_pss_bytes: int
    returncode: int
    stdout: str
    stderr: str


def run_measured(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float | None = None) -> Measured:
    """Run ``cmd``, sampling its process tree's RSS every 0.2 s; wall time from start to exit."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=REPO)
        sampler = TreeMemorySampler(proc.pid)
        with sampler:
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                returncode = proc.wait()
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return Measured(
            seconds,
            sampler.peak_bytes,
            sampler.peak_processes,
            sampler.peak_pss_bytes,
            returncode,
            out.read(),
            err.read(),
        )


# --------------------------------------------------------------------------------------------------- workers
# Each method runs in its own process: ``python -m benchmarks.bench_pipeline _worker METHOD --config JSON``.
# The worker writes a JSON result to config["result"].


@dataclass(frozen=True)
class Setup:
    """What every method shares: the scene, the model and segpipe's inference settings for it."""

    scene: str
    model: str
    tile_size: int
    halo: int
    batch_size: int
    width: int
    height: int
    bands: int
    device: str = "cpu"
    plain_allocator: bool = False

    @property
    def input_size(self) -> int:
        return self.tile_size + 2 * self.halo

    @property
    def pixels(self) -> int:
        return self.width * self.height


_ALLOCATOR: dict[str, Any] = {"retain_freed_memory": None}


def _torch_setup(device: str, plain_allocator: bool = False) -> Any:
    """torch with segpipe's CPU process setup: threads = cores and, unless ``plain_allocator``, the same malloc
    thresholds as segpipe's segmenters (so the limit and the peers get the same allocator as segpipe)."""
    import torch  # lazy: the floor worker must not load torch (RSS measured)

    if device == "cpu":
        torch.set_num_threads(cores())
        if not plain_allocator:
            try:
                from segpipe.core.runtime import retain_freed_memory  # lazy: older segpipes lack it (guarded)
            except ImportError:  # a segpipe without it
                _ALLOCATOR["retain_freed_memory"] = False
            else:
                _ALLOCATOR["retain_freed_memory"] = retain_freed_memory()
    return torch


def _load(setup: Setup) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """(torch, module, mean (bands,1,1), std (bands,1,1))."""
    torch = _torch_setup(setup.device, setup.plain_allocator)
    from segpipe.models.checkpoint import load_model  # lazy: the floor worker must not load torch (RSS measured)

    loaded = load_model(setup.model, device=setup.device)
    module = loaded.module
    if setup.device == "cuda":
        module = module.to(memory_format=torch.channels_last)
    mean = np.asarray(loaded.metadata.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(loaded.metadata.std, dtype=np.float32)[:, None, None]
    return torch, module, mean, std


def _forward(torch: Any, module: Any, x: Any, device: str) -> Any:
    """Logits, with segpipe's precision: float32 on CPU, bf16/fp16 autocast + channels_last on CUDA."""
    if device == "cuda":
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            return module(x)
    return module(x)


def _read_padded(src: Any, row: int, col: int, size: int) -> np.ndarray:
    """``size x size`` pixels at (row, col) (may leave the scene), mirror-padded ("reflect") outside it."""
    from rasterio.windows import Window  # lazy: workers import this module (see its docstring)

    r0, c0 = max(0, row), max(0, col)
    r1, c1 = min(src.height, row + size), min(src.width, col + size)
    data = src.read(window=Window(c0, r0, c1 - c0, r1 - r0))
    pad = ((0, 0), (r0 - row, row + size - r1), (c0 - col, col + size - c1))
    if any(p for pair in pad for p in pair):
        data = np.pad(data, pad, mode="reflect")
    return data


def worker_limit(setup: Setup, config: dict[str, Any]) -> dict[str, Any]:
    """Model-only limit: time ``batches`` forward passes of a (B, bands, S, S) in-memory batch; extrapolate."""
    import rasterio  # lazy: workers import this module (see its docstring)

    torch, module, mean, std = _load(setup)
    s, b = setup.input_size, setup.batch_size
    with rasterio.open(setup.scene) as src:
        # real pixels: B windows along the diagonal of the scene
        step = max(0, min(src.width, src.height) - s) // max(1, b - 1) if b > 1 else 0
        tiles = [_read_padded(src, k * step, k * step, s) for k in range(b)]
    x = torch.from_numpy(((np.stack(tiles).astype(np.float32) - mean) / std).astype(np.float32))
    times = []
    with torch.inference_mode():
        _forward(torch, module, x, setup.device)  # warm-up (allocator, kernels)
        sync = torch.cuda.synchronize if setup.device == "cuda" else (lambda: None)
        sync()
        deadline = time.perf_counter() + float(config.get("min_seconds", 0))
        while len(times) < int(config.get("batches", 3)) or time.perf_counter() < deadline:
            t = time.perf_counter()
            _forward(torch, module, x, setup.device)
            sync()
            times.append(time.perf_counter() - t)
        bf16: list[float] = []
        if config.get("bf16") and setup.device == "cpu":  # what bf16 autocast would give (not segpipe's precision)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                module(x)
                for _ in range(int(config.get("batches", 3))):
                    t = time.perf_counter()
                    module(x)
                    bf16.append(time.perf_counter() - t)
    per_batch = float(np.median(times))
    px_per_batch = b * s * s
    return {
        "cpu_bf16_batch_seconds": bf16,
        "batch_seconds": times,
        "median_batch_seconds": per_batch,
        "pixels_per_batch": px_per_batch,
        "seconds": setup.pixels / px_per_batch * per_batch,
        "threads": torch.get_num_threads(),
        "extrapolated_from_batches": len(times),
    }


def crop_window(width: int, height: int, size: int = 2048, multiple: int = 16) -> tuple[int, int, int]:
    """``(row, col, side)`` of the seam-quality crop: ``size`` square (smaller scenes: the largest multiple of
    ``multiple`` that fits) in the middle of the scene, origin on a multiple of ``multiple``."""
    side = min(size, width // multiple * multiple, height // multiple * multiple)
    if side < multiple:
        raise ValueError(f"scene {width}x{height} is too small for a crop")
    row = (height - side) // 2 // multiple * multiple
    col = (width - side) // 2 // multiple * multiple
    return row, col, side


def worker_reference(setup: Setup, config: dict[str, Any]) -> dict[str, Any]:
    """Whole-image inference on the crop: one forward pass over the crop plus ``margin`` pixels of real scene
    context (mirror-padded where the margin leaves the scene); saves the crop's class ids as .npy."""
    import rasterio  # lazy: workers import this module (see its docstring)

    torch, module, mean, std = _load(setup)
    row, col, side = config["crop"]
    margin = int(config["margin"])
    with rasterio.open(setup.scene) as src:
        data = _read_padded(src, row - margin, col - margin, side + 2 * margin)
    x = torch.from_numpy(((data.astype(np.float32) - mean) / std).astype(np.float32))[None]
    t = time.perf_counter()
    with torch.inference_mode():
        probs = torch.softmax(_forward(torch, module, x, setup.device).float(), dim=1)
    classes = torch.argmax(probs[0, :, margin : margin + side, margin : margin + side], dim=0)
    np.save(config["reference"], classes.to(torch.uint8).cpu().numpy())
    return {"seconds": time.perf_counter() - t, "input": side + 2 * margin}


def _mask_profile(src: Any, block: int) -> dict[str, Any]:
    return {
        "driver": "GTiff",
        "width": src.width,
        "height": src.height,
        "count": 1,
        "dtype": "uint8",
        "crs": src.crs,
        "transform": src.transform,
        "nodata": 255,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "DEFLATE",
        "bigtiff": "IF_SAFER",
    }


def monai_memory_bytes(pixels: int, bands: int, classes: int) -> int:
    """Rough peak of the MONAI peer: scene (uint8 + float32 input), float32 output and count map, mask."""
    return pixels * (bands * 1 + bands * 4 + classes * 4 + 4 + 1)


def worker_monai(setup: Setup, config: dict[str, Any]) -> dict[str, Any]:
    """MONAI's sliding_window_inference on the whole scene in memory, then a GeoTIFF with rasterio."""
    import rasterio  # lazy: workers import this module (see its docstring)
    from monai.inferers import sliding_window_inference  # lazy: the bench extra (monai, a peer)

    torch, module, mean, std = _load(setup)
    t0 = time.perf_counter()
    with rasterio.open(setup.scene) as src:
        image = src.read()
        profile = _mask_profile(src, 512)
    x = torch.from_numpy(image).unsqueeze(0).float()  # (1, bands, H, W) float32
    del image
    x.sub_(torch.from_numpy(mean)).div_(torch.from_numpy(std))
    t1 = time.perf_counter()

    def predictor(batch: Any) -> Any:
        return torch.softmax(_forward(torch, module, batch, setup.device).float(), dim=1)

    s = setup.input_size
    with torch.inference_mode():
        out = sliding_window_inference(
            x,
            roi_size=(s, s),
            sw_batch_size=setup.batch_size,
            predictor=predictor,
            overlap=0.25,
            mode="gaussian",
            padding_mode="reflect",
        )
    del x
    t2 = time.perf_counter()
    mask = np.empty((setup.height, setup.width), dtype=np.uint8)
    for r in range(0, setup.height, 1024):  # argmax in strips: no int64 copy of the whole scene
        mask[r : r + 1024] = torch.argmax(out[0, :, r : r + 1024], dim=0).to(torch.uint8).numpy()
    del out
    with rasterio.open(config["output"], "w", **profile) as dst:
        dst.write(mask[None])
    t3 = time.perf_counter()
    return {"stages": {"read": t1 - t0, "sliding_window": t2 - t1, "argmax_write": t3 - t2}}


def worker_loop(setup: Setup, config: dict[str, Any]) -> dict[str, Any]:
    """Plain rasterio window loop without overlap: read a batch of S x S windows (mirror-padded at the
    edge), forward, argmax, write each window's classes."""
    import rasterio  # lazy: workers import this module (see its docstring)
    from rasterio.windows import Window  # lazy: workers import this module (see its docstring)

    torch, module, mean, std = _load(setup)
    s, b = setup.input_size, setup.batch_size
    with rasterio.open(setup.scene) as src:
        profile = _mask_profile(src, math.gcd(s, 512))
        windows = [
            Window(c, r, min(s, src.width - c), min(s, src.height - r))
            for r in range(0, src.height, s)
            for c in range(0, src.width, s)
        ]
        with rasterio.open(config["output"], "w", **profile) as dst, torch.inference_mode():
            for k in range(0, len(windows), b):
                batch = windows[k : k + b]
                tiles = [_read_padded(src, int(w.row_off), int(w.col_off), s) for w in batch]
                x = torch.from_numpy(((np.stack(tiles).astype(np.float32) - mean) / std).astype(np.float32))
                logits = _forward(torch, module, x, setup.device)
                classes = torch.argmax(logits.float(), dim=1).to(torch.uint8).cpu().numpy()
                for w, c in zip(batch, classes, strict=True):
                    dst.write(c[None, : int(w.height), : int(w.width)], window=w)
    return {"windows": len(windows)}


def worker_floor(setup: Setup, config: dict[str, Any]) -> dict[str, Any]:
    """The I/O floor: read the scene once, window by window (2048 px, aligned to its blocks), one per-pixel op
    (band 1 > band 2), write a tiled GeoTIFF (512 px, ZSTD 1, as segpipe's scratch file), then the COG with
    overviews (DEFLATE, MODE), GDAL threads = cores. What any pipeline must pay to turn the scene into a mask."""
    import rasterio  # lazy: workers import this module (see its docstring)
    import rasterio.shutil  # lazy: workers import this module (see its docstring)
    from rasterio.windows import Window  # lazy: workers import this module (see its docstring)

    n = str(cores())
    scratch = Path(config["output"]).with_suffix(".scratch.tif")
    t0 = time.perf_counter()
    with rasterio.open(setup.scene) as src:
        profile = {**_mask_profile(src, 512), "compress": "ZSTD", "zstd_level": 1, "num_threads": n}
        with rasterio.open(scratch, "w", **profile) as dst:
            for r in range(0, src.height, 2048):
                for c in range(0, src.width, 2048):
                    w = Window(c, r, min(2048, src.width - c), min(2048, src.height - r))
                    data = src.read((1, 2), window=w)
                    dst.write((data[0] > data[1]).astype(np.uint8)[None], window=w)
    t1 = time.perf_counter()
    rasterio.shutil.copy(
        scratch,
        config["output"],
        driver="COG",
        COMPRESS="DEFLATE",
        BLOCKSIZE="512",
        OVERVIEW_RESAMPLING="MODE",
        NUM_THREADS=n,
    )
    scratch.unlink()
    return {"stages": {"windows": t1 - t0, "cog": time.perf_counter() - t1}, "threads": int(n)}


WORKERS = {
    "limit": worker_limit,
    "reference": worker_reference,
    "monai": worker_monai,
    "loop": worker_loop,
    "floor": worker_floor,
}


def worker_main(argv: Sequence[str]) -> int:
    method, config_path = argv[0], argv[1]
    config = json.loads(Path(config_path).read_text())
    setup = Setup(**config["setup"])
    result = WORKERS[method](setup, config)
    result["retain_freed_memory"] = _ALLOCATOR["retain_freed_memory"]
    Path(config["result"]).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------------- checks


def grid_of(path: str | Path) -> dict[str, Any]:
    import rasterio  # lazy: workers import this module (see its docstring)

    with rasterio.open(path) as src:
        return {
            "width": src.width,
            "height": src.height,
            "crs": src.crs.to_wkt() if src.crs else None,
            "transform": list(src.transform)[:6],
        }


def same_grid(a: str | Path, b: str | Path) -> tuple[bool, str]:
    """Whether two rasters have the same size, CRS and transform (transform within 1e-9 relative)."""
    ga, gb = grid_of(a), grid_of(b)
    problems = [k for k in ("width", "height", "crs") if ga[k] != gb[k]]
    if not np.allclose(ga["transform"], gb["transform"], rtol=1e-9, atol=0):
        problems.append("transform")
    return not problems, ", ".join(f"{k}: {ga[k]} != {gb[k]}" for k in problems)


def output_stats(path: str | Path, crop: tuple[int, int, int], reference: np.ndarray | None) -> dict[str, Any]:
    """Disagreement with the reference on the crop, and the count of nodata (255) pixels, block by block."""
    import rasterio  # lazy: workers import this module (see its docstring)
    from rasterio.windows import Window  # lazy: workers import this module (see its docstring)

    row, col, side = crop
    nodata = 0
    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            nodata += int((src.read(1, window=window) == 255).sum())
        crop_classes = src.read(1, window=Window(col, row, side, side))
    stats: dict[str, Any] = {"nodata_pixels": nodata}
    if reference is not None:
        ok = (crop_classes != 255) & (reference != 255)
        stats["disagreement"] = float((crop_classes[ok] != reference[ok]).mean()) if ok.any() else None
    return stats


# --------------------------------------------------------------------------------------------------- report


def machine_description() -> dict[str, Any]:
    """CPU model, cores, RAM, library versions, GPU (if any)."""
    import psutil  # lazy: the bench extra (psutil)
    import rasterio  # lazy: workers import this module (see its docstring)
    import torch  # lazy: the floor worker must not load torch (RSS measured)

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("numpy", "rasterio", "zarr", "ray", "prefect", "monai"):
        with contextlib.suppress(Exception):
            versions[name] = __import__(name).__version__
    versions["gdal"] = rasterio.__gdal_version__
    gpu = None
    if torch.cuda.is_available():
        gpu = {
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1),
        }
    return {
        "cpu": cpu,
        "cores": cores(),
        "logical_cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "gpu": gpu,
        "platform": platform.platform(),
        "versions": versions,
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of result rows (keys: megapixels, method, seconds, mp_per_s, ratio_to_limit,
    peak_rss_gib, disagreement, notes); missing values print as '–'."""
    head = (
        "| scene MP | method | wall s | MP/s | x limit | x I/O floor | overhead s/MP | peak RSS GiB | peak PSS GiB "
        "| disagreement % | notes |"
    )
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        dis = r.get("disagreement")
        extra = r.get("overhead") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    _fmt(r.get("megapixels"), 1),
                    str(r.get("method", "")),
                    _fmt(r.get("seconds"), 1),
                    _fmt(r.get("mp_per_s"), 3),
                    _fmt(r.get("ratio_to_limit"), 2),
                    _fmt(r.get("ratio_to_floor"), 2),
                    _fmt(extra.get("overhead_s_per_mp"), 3),
                    _fmt(r.get("peak_rss_gib"), 2),
                    _fmt(r.get("peak_pss_gib"), 2),
                    _fmt(100 * dis if dis is not None else None, 2),
                    str(r.get("notes", "")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- driver


@dataclass
class Bench:
    """State of one benchmark run."""

    args: argparse.Namespace
    scratch: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    scenes: list[dict[str, Any]] = field(default_factory=list)

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        if not ok:
            self.log(f"CHECK FAILED: {name}: {detail}")

    def worker(self, method: str, setup: Setup, **config: Any) -> tuple[Measured, dict[str, Any]]:
        """Run a benchmark worker in its own process; returns its measurement and JSON result."""
        work = self.scratch / "work"
        work.mkdir(parents=True, exist_ok=True)
        result = work / f"{method}-{os.getpid()}.result.json"
        cfg = work / f"{method}-{os.getpid()}.config.json"
        result.unlink(missing_ok=True)
        cfg.write_text(json.dumps({**config, "setup": asdict(setup), "result": str(result)}))
        cmd = [sys.executable, "-m", "benchmarks.bench_pipeline", "_worker", method, str(cfg)]
        measured = run_measured(cmd)
        if measured.returncode != 0:
            raise RuntimeError(f"{method} worker failed ({measured.returncode}): {measured.stderr[-2000:]}")
        return measured, json.loads(result.read_text())


def segpipe_command() -> list[str]:
    exe = Path(sys.executable).with_name("segpipe")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "segpipe.cli"]


def plan_setup(scene: Path, model: str, device: str, plain_allocator: bool = False) -> Setup:
    """segpipe's own resolution of tile size, halo and batch size for this scene and model."""
    from segpipe.pipeline.plan import make_plan  # lazy: workers import this module (see its docstring)
    from segpipe.pipeline.settings import RunSettings  # lazy: workers import this module (see its docstring)

    with tempfile.TemporaryDirectory() as tmp:
        plan = make_plan(RunSettings(input=str(scene), output=str(Path(tmp) / "plan.tif"), model=model))
    return Setup(
        scene=str(scene),
        model=model,
        tile_size=plan.recipe.tile_size,
        halo=plan.recipe.halo,
        batch_size=plan.recipe.batch_size,
        width=plan.scene.width,
        height=plan.scene.height,
        bands=plan.scene.count,
        device=device,
        plain_allocator=plain_allocator,
    )


def _row(
    setup: Setup, nominal: float, method: str, seconds: float, limit: float | None, **extra: Any
) -> dict[str, Any]:
    mp = setup.pixels / 1e6
    row = {
        "nominal_mp": nominal,
        "megapixels": mp,
        "method": method,
        "seconds": seconds,
        "mp_per_s": mp / seconds if seconds > 0 else None,
        "ratio_to_limit": (limit / seconds) if limit and seconds > 0 else None,
    }
    row.update(extra)
    return row


def _prepare(bench: Bench, nominal: float, model: str) -> tuple[Path, Setup]:
    """The mirror-tiled scene of ``nominal`` megapixels (built or reused) and segpipe's settings for it."""
    args = bench.args
    side = scene_side(nominal)
    t = time.perf_counter()
    scene, reused = build_scene(args.source, side, bench.scratch / "scenes")
    bench.log(
        f"scene {scene} ({side}x{side}, {side * side / 1e6:.1f} MP): mirror-tiled from {args.source}, "
        + ("reused from the cache" if reused else f"built in {time.perf_counter() - t:.1f} s")
    )
    setup = plan_setup(scene, model, "cuda" if _cuda() else "cpu", args.plain_allocator)
    bench.scenes.append(
        {
            "nominal_mp": nominal,
            "path": str(scene),
            "width": side,
            "height": side,
            "megapixels": setup.pixels / 1e6,
            "built_from": f"mirror tiling of {args.source} (real imagery)",
            "reused_from_cache": reused,
            "model": model,
            "tile_size": setup.tile_size,
            "halo": setup.halo,
            "batch_size": setup.batch_size,
        }
    )
    return scene, setup


def _limit_row(bench: Bench, setup: Setup, nominal: float) -> dict[str, Any]:
    """The model-only limit: the model's forward passes on in-memory tensors, extrapolated to the scene."""
    args = bench.args
    measured, res = bench.worker(
        "limit", setup, batches=args.limit_batches, min_seconds=args.limit_seconds, bf16=args.limit_bf16
    )
    limit = float(res["seconds"])
    bench.log(f"model-only limit: {limit:.1f} s ({setup.pixels / 1e6 / limit:.3f} MP/s)")
    return _row(
        setup,
        nominal,
        "model-only limit",
        limit,
        limit,
        peak_rss_gib=measured.peak_bytes / GIB,
        peak_pss_gib=measured.peak_pss_bytes / GIB,
        notes=f"extrapolated from {res['extrapolated_from_batches']} batches of {setup.batch_size}x"
        f"{setup.input_size}² ({res['median_batch_seconds']:.2f} s each), {res['threads']} threads"
        + (", segpipe's malloc thresholds" if res.get("retain_freed_memory") else ", default malloc"),
        detail=res,
    )


def _floor_row(bench: Bench, setup: Setup, nominal: float, limit: float | None) -> dict[str, Any]:
    """The I/O floor (:func:`worker_floor`)."""
    out = bench.scratch / "outputs" / f"floor-{setup.width}.tif"
    out.parent.mkdir(parents=True, exist_ok=True)
    measured, res = bench.worker("floor", setup, output=str(out))
    ok, detail = same_grid(setup.scene, out)
    bench.check(f"I/O floor output grid equals input grid at {nominal} MP", ok, detail)
    out.unlink(missing_ok=True)
    st = res["stages"]
    bench.log(f"I/O floor: {measured.seconds:.1f} s (windows {st['windows']:.1f} s, COG {st['cog']:.1f} s)")
    return _row(
        setup,
        nominal,
        "I/O floor",
        measured.seconds,
        limit,
        peak_rss_gib=measured.peak_bytes / GIB,
        peak_pss_gib=measured.peak_pss_bytes / GIB,
        notes=f"read 2048 px windows, band1 > band2, tiled GeoTIFF {st['windows']:.1f} s + COG with overviews "
        f"{st['cog']:.1f} s, GDAL threads {res['threads']}",
        detail=res,
    )


def overhead(summary: dict[str, Any]) -> dict[str, Any]:
    """segpipe's own cost in inference: the infer stage's seconds minus the segmenters' compute, in total, per
    megapixel and per computed tile."""
    infer = float(summary["seconds"]["infer"])
    compute = float(summary.get("segmenter_seconds", {}).get("compute", 0.0))
    mp = summary["scene"]["width"] * summary["scene"]["height"] / 1e6
    tiles = max(1, int(summary["tiles"]["computed"]))
    return {
        "infer_s": infer,
        "compute_s": compute,
        "overhead_s": infer - compute,
        "overhead_s_per_mp": (infer - compute) / mp,
        "overhead_s_per_tile": (infer - compute) / tiles,
    }


def _segpipe_run(
    bench: Bench,
    setup: Setup,
    nominal: float,
    limit: float | None,
    method: str,
    extra: list[str],
    reference: tuple[tuple[int, int, int], np.ndarray] | None,
) -> dict[str, Any] | None:
    """One ``segpipe run`` of the scene as a measured subprocess; its row (None when it failed)."""
    args = bench.args
    side = setup.width
    out = bench.scratch / "outputs" / f"segpipe-{side}-{method.replace(' ', '_')}.tif"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*segpipe_command(), "run", setup.scene, str(out), "--json", "--overwrite", "--model", args.model, *extra]
    bench.log(f"{method}: {' '.join(cmd)}")
    m = run_measured(cmd)
    if m.returncode != 0:
        bench.check(f"{method} exit status at {nominal} MP", False, m.stderr.strip()[-500:])
        return None
    summary = json.loads(m.stdout)
    ok, detail = same_grid(setup.scene, out)
    bench.check(f"{method} output grid equals input grid at {nominal} MP", ok, detail)
    stats = output_stats(out, *reference) if reference else output_stats(out, crop_window(side, side), None)
    bench.check(
        f"{method} output has no nodata pixels at {nominal} MP",
        stats["nodata_pixels"] == 0,
        f"{stats['nodata_pixels']} nodata pixels",
    )
    sec, tiles = summary["seconds"], summary["tiles"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in sec.items() if k not in ("total",))
    row = _row(
        setup,
        nominal,
        method,
        m.seconds,
        limit,
        peak_rss_gib=m.peak_bytes / GIB,
        peak_pss_gib=m.peak_pss_bytes / GIB,
        peak_processes=m.peak_processes,
        disagreement=stats.get("disagreement") if reference else None,
        notes=f"{tiles['tile_size']}+{tiles['halo']} px {tiles['blend']}, batch {tiles['batch_size']}, "
        f"{summary['workers']} worker(s), scene {'copied' if summary.get('scene_copied', True) else 'read in place'}"
        f"; in-process {sec['total']:.1f} s: {stages}",
        overhead=overhead(summary),
        fixed_s=m.seconds - sec["total"],
        mask_sha256=sha256_file(out),
        summary=summary,
        command=cmd,
    )
    bench.log(f"{method}: {m.seconds:.1f} s, peak {m.peak_bytes / GIB:.2f} GiB ({m.peak_processes} processes)")
    if not args.keep_outputs:
        out.unlink(missing_ok=True)
        out.with_name(out.stem + ".summary.json").unlink(missing_ok=True)
    return row


def _same_mask(bench: Bench, rows: list[dict[str, Any]], a: str, b: str, nominal: float) -> None:
    """Check that two segpipe rows wrote byte-identical masks."""
    found = {r["method"]: r.get("mask_sha256") for r in rows if r["method"] in (a, b)}
    if len(found) == 2:
        bench.check(f"{a} and {b} masks byte-identical at {nominal} MP", found[a] == found[b], str(found))


def bench_null(bench: Bench, nominal: float) -> None:
    """The pipeline's own cost: the I/O floor against segpipe with the null model (scene read in place, and
    copied into the work store first), in-process and with Ray."""
    _, setup = _prepare(bench, nominal, "null")
    rows = [_floor_row(bench, setup, nominal, None)]
    for method, extra in (
        ("segpipe null model", ["--model", "null", "--no-prefect"]),
        ("segpipe null model, --ingest always", ["--model", "null", "--no-prefect", "--ingest", "always"]),
        ("segpipe null model, in-process", ["--model", "null", "--no-prefect", "--executor", "local"]),
    ):
        row = _segpipe_run(bench, setup, nominal, None, method, extra, None)
        if row is not None:
            row["ratio_to_floor"] = rows[0]["seconds"] / row["seconds"]
            rows.append(row)
    _same_mask(bench, rows, "segpipe null model", "segpipe null model, --ingest always", nominal)
    bench.rows.extend(rows)
    print(format_table(rows), flush=True)


def bench_size(bench: Bench, nominal: float, *, first: bool) -> None:
    """Every method on one scene with the bench's model: the model-only limit, segpipe (with Prefect, without,
    with the scene copied), the peers, and the I/O floor."""
    args = bench.args
    scene, setup = _prepare(bench, nominal, args.model)
    rows = [_limit_row(bench, setup, nominal)]
    limit = float(rows[0]["seconds"])
    crop = crop_window(setup.width, setup.height)
    reference_path = bench.scratch / "work" / f"reference-{setup.width}.npy"
    _, res = bench.worker(
        "reference", setup, crop=list(crop), margin=args.reference_margin, reference=str(reference_path)
    )
    reference = np.load(reference_path)
    bench.log(f"reference: crop {crop} + {args.reference_margin} px context, {res['seconds']:.1f} s")
    runs: list[tuple[str, list[str]]] = [("segpipe", [])]
    if args.no_prefect == "all" or (first and args.no_prefect == "first"):
        runs += [("segpipe --no-prefect", ["--no-prefect"]), ("segpipe --ingest always", ["--ingest", "always"])]
    runs += [(f"segpipe {n}", extra.split()) for n, _, extra in (v.partition("=") for v in args.variant)]
    runs += [(f"segpipe --workers {n}", ["--workers", str(n)]) for n in (args.workers_sweep if first else [])]
    for method, extra in runs:
        row = _segpipe_run(bench, setup, nominal, limit, method, extra, (crop, reference))
        if row is not None:
            rows.append(row)
    _same_mask(bench, rows, "segpipe", "segpipe --ingest always", nominal)
    if not args.skip_peers:
        _peer_rows(bench, rows, setup, nominal, limit, crop, reference, scene)
    rows.append(_floor_row(bench, setup, nominal, limit))
    for row in rows[1:-1]:
        if row.get("seconds"):
            row["ratio_to_floor"] = rows[-1]["seconds"] / row["seconds"]
    bench.rows.extend(rows)
    print(format_table(rows), flush=True)


def _peer_rows(
    bench: Bench,
    rows: list[dict[str, Any]],
    setup: Setup,
    nominal: float,
    limit: float,
    crop: tuple[int, int, int],
    reference: np.ndarray,
    scene: Path,
) -> None:
    """MONAI's sliding window (skipped when the scene would not fit in memory) and the plain window loop."""
    import psutil  # lazy: the bench extra (psutil)

    outputs = bench.scratch / "outputs"
    need = monai_memory_bytes(setup.pixels, setup.bands, 6)
    available = psutil.virtual_memory().available
    if need > 0.8 * available:
        rows.append(
            _row(
                setup,
                nominal,
                "MONAI sliding window",
                float("nan"),
                limit,
                notes=f"skipped: needs about {need / GIB:.1f} GiB, {available / GIB:.1f} GiB available",
            )
        )
        rows[-1]["seconds"] = rows[-1]["mp_per_s"] = rows[-1]["ratio_to_limit"] = None
        bench.log(rows[-1]["notes"])
    else:
        notes = "gaussian, overlap 0.25, whole scene in RAM, GeoTIFF out"
        peer(
            bench, rows, setup, nominal, limit, crop, reference, "monai", "MONAI sliding window", notes, outputs, scene
        )
    notes = f"{setup.input_size}² windows, no overlap, batch {setup.batch_size}, GeoTIFF out"
    peer(bench, rows, setup, nominal, limit, crop, reference, "loop", "rasterio window loop", notes, outputs, scene)


def peer(
    bench: Bench,
    rows: list[dict[str, Any]],
    setup: Setup,
    nominal: float,
    limit: float,
    crop: tuple[int, int, int],
    reference: np.ndarray,
    method: str,
    name: str,
    notes: str,
    outputs: Path,
    scene: Path,
) -> None:
    out = outputs / f"{method}-{setup.width}.tif"
    bench.log(f"{name} ...")
    measured, res = bench.worker(method, setup, output=str(out))
    ok, detail = same_grid(scene, out)
    bench.check(f"{name} output grid equals input grid at {nominal} MP", ok, detail)
    stats = output_stats(out, crop, reference)
    rows.append(
        _row(
            setup,
            nominal,
            name,
            measured.seconds,
            limit,
            peak_rss_gib=measured.peak_bytes / GIB,
            peak_pss_gib=measured.peak_pss_bytes / GIB,
            disagreement=stats.get("disagreement"),
            notes=notes,
            detail=res,
        )
    )
    bench.log(f"{name}: {measured.seconds:.1f} s, peak {measured.peak_bytes / GIB:.2f} GiB")
    if not bench.args.keep_outputs:
        out.unlink(missing_ok=True)


def _cuda() -> bool:
    import torch  # lazy: the floor worker must not load torch (RSS measured)

    return bool(torch.cuda.is_available())


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes", type=_float_list, default=[16.0, 64.0, 256.0], help="nominal megapixels (default 16,64,256)"
    )
    p.add_argument("--gigapixel", action="store_true", help="also run a 1-gigapixel scene (32768 x 32768)")
    p.add_argument(
        "--null-sizes",
        type=_float_list,
        default=[],
        help="nominal megapixels at which to time the I/O floor against segpipe with the null model (e.g. 64,256)",
    )
    p.add_argument("--model", default="default", help="model name or checkpoint (default: the shipped model)")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(REPO)})"
    )
    p.add_argument("--skip-peers", action="store_true", help="skip MONAI and the rasterio window loop")
    p.add_argument("--workers-sweep", type=_int_list, default=[], help="segpipe --workers N runs (smallest size)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="extra segpipe run with these CLI options, e.g. 'tile1024=--tile-size 1024' (repeatable)",
    )
    p.add_argument(
        "--no-prefect",
        choices=("first", "all", "none"),
        default="first",
        help="sizes at which to also time segpipe --no-prefect (default: the first size only)",
    )
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="real image to mirror-tile")
    p.add_argument(
        "--scratch", type=Path, default=DEFAULT_SCRATCH, help=f"scene cache and outputs (default {DEFAULT_SCRATCH})"
    )
    p.add_argument("--limit-batches", type=int, default=5, help="timed batches for the model-only limit")
    p.add_argument("--limit-seconds", type=float, default=20.0, help="...and at least this many seconds")
    p.add_argument("--limit-bf16", action="store_true", help="also time bf16 autocast batches (CPU, for reference)")
    p.add_argument(
        "--plain-allocator",
        action="store_true",
        help="run the limit and the peers without segpipe's malloc thresholds "
        "(segpipe.core.runtime.retain_freed_memory)",
    )
    p.add_argument("--reference-margin", type=int, default=128, help="context pixels around the reference crop")
    p.add_argument("--keep-outputs", action="store_true", help="keep the masks under the scratch dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":
        return worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sizes = list(args.sizes) + ([1024.0] if args.gigapixel else [])
    bench = Bench(args=args, scratch=args.scratch)
    machine = machine_description()
    bench.log(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB, GPU {machine['gpu']}")
    load = os.getloadavg()
    if load[0] > 0.5 * machine["cores"]:
        bench.log(
            f"WARNING: load average {load[0]:.1f} on {machine['cores']} cores: other work is running, "
            "timings will be low"
        )
    bench.log(f"scenes are mirror tilings of real imagery ({args.source}), cached under {bench.scratch / 'scenes'}")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for k, nominal in enumerate(sizes):
        bench_size(bench, nominal, first=k == 0)
    for nominal in args.null_sizes:
        bench_null(bench, nominal)
    result = {
        "benchmark": "segpipe end to end vs model-only limit vs peers",
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m benchmarks.bench_pipeline " + " ".join(argv),
        "machine": machine,
        "load_average_at_start": load,
        "scenes": bench.scenes,
        "rows": bench.rows,
        "checks": bench.checks,
        "notes": [
            "scenes are mirror tilings of real imagery, not synthetic noise",
            "model-only limit: forward passes on in-memory tensors at segpipe's batch size, input size and "
            "precision, all cores; a few batches timed and extrapolated to the scene's pixel count",
            "peak RSS: sum over the method's process and all descendants (Ray workers, Prefect server), "
            "sampled every 0.2 s; shared pages are counted once per process",
            "disagreement: fraction of pixels of the crop whose class differs from one forward pass over "
            "the whole crop with real context around it",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(
        f"\nmachine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM, "
        f"torch {machine['versions']['torch']}, GPU: {machine['gpu']['name'] if machine['gpu'] else 'none'}"
    )
    print(format_table(bench.rows))
    failed = [c for c in bench.checks if not c["ok"]]
    print(f"\nchecks: {len(bench.checks) - len(failed)} passed, {len(failed)} failed; JSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
