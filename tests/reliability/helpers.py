"""Helpers for the reliability tests: tiny rasters, hand-made TIFF headers, polling, the CLI as a subprocess."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: ``python HELD_EXPORT segpipe-args...``: the CLI with its export held open (see _held_export.py).
HELD_EXPORT = HERE / "_held_export.py"


def write_raster(path: Path, data: np.ndarray, **profile: Any) -> Path:
    """Write ``data`` (bands, rows, cols) as a GeoTIFF in UTM 33N at 10 m unless ``profile`` says otherwise."""
    options: dict[str, Any] = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype,
        "crs": CRS.from_epsg(32633),
        "transform": Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4100000.0),
        **profile,
    }
    with rasterio.open(path, "w", **options) as dst:
        dst.write(data)
    return path


def rgb_scene(path: Path, width: int = 160, height: int = 128, seed: int = 0, **profile: Any) -> Path:
    """A random 3-band uint8 scene (values around the test models' mean of 100)."""
    rng = np.random.default_rng(seed)
    return write_raster(path, rng.integers(0, 220, (3, height, width), dtype=np.uint8), **profile)


def raw_tiff(path: Path, width: int, height: int, *, tile: int | None = None, deflate: bool = True) -> Path:
    """A baseline little-endian 3-band uint8 TIFF: one strip of the whole image, or tiles of ``tile`` pixels.

    Only the header is real. The DEFLATE payload is a short stream of zeros (GDAL opens and describes the file but
    cannot read all of it), and uncompressed pixels are a sparse hole (zeros). A "huge" TIFF in a few hundred bytes.
    """
    rows, cols = (tile, tile) if tile else (height, width)
    raw = rows * cols * 3
    payload = zlib.compress(bytes(min(raw, 1 << 16))) if deflate else b""
    size = len(payload) if deflate else raw
    layout = [(322, 4, tile), (323, 4, tile), (324, 4, 0), (325, 4, size)] if tile else []
    layout = layout or [(273, 4, 0), (278, 4, height), (279, 4, size)]
    tags = sorted([(256, 4, width), (257, 4, height), (258, 3, 0), (259, 3, 8 if deflate else 1), (262, 3, 2),
                   (277, 3, 3), (284, 3, 1), *layout])
    bits_offset = 8 + 2 + len(tags) * 12 + 4
    data_offset = bits_offset + 8
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(tags)))
    for tag, kind, value in tags:
        if tag == 258:
            out += struct.pack("<HHII", tag, kind, 3, bits_offset)
        elif tag in (273, 324):
            out += struct.pack("<HHII", tag, kind, 1, data_offset)
        elif kind == 3:
            out += struct.pack("<HHIHH", tag, kind, 1, value, 0)
        else:
            out += struct.pack("<HHII", tag, kind, 1, value)
    out += struct.pack("<I4H", 0, 8, 8, 8, 0) + payload
    with open(path, "wb") as handle:
        handle.write(out)
        if not deflate:
            handle.truncate(data_offset + raw)  # a hole: the file system stores nothing
    return path


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment (with the per-test lock directory) for a ``segpipe`` child process."""
    return {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def start_segpipe(*args: str, cwd: Path, held: bool = False, **env: str) -> subprocess.Popen[str]:
    """Start ``segpipe ARGS`` (or the held-export harness) as a child process, output captured."""
    command = [sys.executable, str(HELD_EXPORT)] if held else [sys.executable, "-m", "segpipe.cli"]
    return subprocess.Popen(
        [*command, *args],
        cwd=cwd,
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
