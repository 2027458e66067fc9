"""The slide mask sink: the work store's ``mask`` as a tiled, pyramidal OME-TIFF (``.ome.tif``), written with
tifffile.

The file: one uint8 plane of class ids (255 = nodata: background, outside the slide), tiles of 512, deflate;
sub-resolutions in SubIFDs (the OME-TIFF pyramid that Bio-Formats, QuPath and tifffile read), each half the one
above by the mode of 2 x 2 pixels, down to one tile. Palette photometric with the model's colours (255
transparent black). The pixel size is the scene grid's (``PhysicalSizeX/Y`` in um in the OME-XML, and the TIFF
resolution tags in centimetres, which OpenSlide reads); the grid's origin is the slide's level-0 origin, so the
mask maps onto level 0 by its pixel size alone (``level-0 pixels per mask pixel`` is also recorded). Class names and
colours are in the OME-XML as a MapAnnotation (namespace :data:`NAMESPACE`: ``class:<id>`` -> name,
``colour:<id>`` -> ``#RRGGBB``, ``nodata`` -> ``255``), and in GDAL's metadata tags (``CLASS_NAMES``, ``CLASS_<id>``,
nodata), so GDAL and ``segpipe quicklook`` read it like a COG mask.

Memory is bounded: tiles stream from zarr arrays (the store's mask, then each sub-resolution, built block by block
into a scratch zarr group); the file is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tifffile
import zarr

from segpipe.core.colours import rgba
from segpipe.core.errors import OutputError
from segpipe.core.files import atomic_output
from segpipe.pipeline import store as ws
from segpipe.pipeline.scene import SceneInfo
from segpipe.pipeline.sinks.base import ExportResult
from segpipe.pipeline.sinks.cog import CogSink

TILE = 512
BLOCK = 2048  # pixels per side of one block when building a sub-resolution (a multiple of 2 and of TILE)
NAMESPACE = "segpipe.org/classes"


def mode_2x2(block: np.ndarray) -> np.ndarray:
    """Each 2 x 2 square of a (h, w) uint8 block (odd edges repeat their last row/column) replaced by its most
    frequent value (ties: the first of the square in raster order)."""
    if block.shape[0] % 2:
        block = np.concatenate([block, block[-1:]], axis=0)
    if block.shape[1] % 2:
        block = np.concatenate([block, block[:, -1:]], axis=1)
    cells = np.stack([block[0::2, 0::2], block[0::2, 1::2], block[1::2, 0::2], block[1::2, 1::2]])
    counts = np.stack([(cells == cells[i]).sum(axis=0) for i in range(4)])
    best = counts.argmax(axis=0)
    return np.take_along_axis(cells, best[None], axis=0)[0]


def _levels(mask: zarr.Array, scratch: Path) -> list[zarr.Array]:
    """The mask and its sub-resolutions (each half the one above, mode of 2 x 2) down to one tile."""
    levels = [mask]
    group = zarr.open_group(str(scratch), mode="w")
    while max(levels[-1].shape) > TILE:
        above = levels[-1]
        h, w = (above.shape[0] + 1) // 2, (above.shape[1] + 1) // 2
        level = group.create_array(
            f"level{len(levels)}", shape=(h, w), chunks=(TILE, TILE), dtype="uint8", fill_value=ws.MASK_NODATA
        )
        for row in range(0, above.shape[0], BLOCK):
            for col in range(0, above.shape[1], BLOCK):
                block = np.asarray(above[row : row + BLOCK, col : col + BLOCK])
                small = mode_2x2(block)
                level[row // 2 : row // 2 + small.shape[0], col // 2 : col // 2 + small.shape[1]] = small
        levels.append(level)
    return levels


def _tiles(array: zarr.Array, progress: Callable[[int], Any] | None = None) -> Iterator[np.ndarray]:
    """The array's TILE x TILE tiles in raster order, edge tiles padded with nodata."""
    h, w = array.shape
    for row in range(0, h, TILE):
        band = np.asarray(array[row : row + TILE, :])
        for col in range(0, w, TILE):
            tile = np.full((TILE, TILE), ws.MASK_NODATA, dtype=np.uint8)
            part = band[:, col : col + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile
        if progress:
            progress(band.size)


def _gdal_metadata(class_names: Sequence[str]) -> str:
    items: list[tuple[str, str, int | None]] = [
        ("CLASS_NAMES", ",".join(class_names), None),
        ("SOFTWARE", "segpipe", None),
    ]
    items += [(f"CLASS_{i}", name, 0) for i, name in enumerate(class_names)]
    items.append(("DESCRIPTION", "class", 0))
    lines = []
    for key, value, sample in items:
        where = f' sample="{sample}" role="description"' if key == "DESCRIPTION" else ""
        where = where or (f' sample="{sample}"' if sample is not None else "")
        text = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f'<Item name="{key}"{where}>{text}</Item>')
    return "<GDALMetadata>" + "".join(lines) + "</GDALMetadata>"


def export_ome_tiff(
    store: ws.WorkStore,
    output: str | Path,
    *,
    scratch_dir: str | Path,
    class_names: Sequence[str],
    colours: Sequence[str] | None = None,
    workers: int = 2,
    progress: Callable[[int], Any] | None = None,
) -> ExportResult:
    """Write the store's ``mask`` as a pyramidal OME-TIFF at ``output`` (see the module docstring)."""
    start = time.perf_counter()
    scene = SceneInfo.from_attrs(store.attrs["scene"])
    mask = store.array(ws.MASK)
    histogram = np.zeros(256, dtype=np.int64)
    for row in range(0, scene.height, BLOCK):
        histogram += np.bincount(np.asarray(mask[row : row + BLOCK, :]).ravel(), minlength=256)
    scratch = Path(scratch_dir) / f".{Path(output).name}.levels.zarr"
    shutil.rmtree(scratch, ignore_errors=True)
    metadata = _ome_metadata(scene, class_names, colours)
    resolution = (1e4 / scene.mpp[0], 1e4 / scene.mpp[1]) if scene.mpp is not None else None
    try:
        levels = _levels(mask, scratch)
        bigtiff = scene.pixels * 4 // 3 > 2**31
        with atomic_output(output) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tif:
            for i, level in enumerate(levels):
                _write_level(tif, level, i, len(levels), resolution, metadata, class_names, colours, workers, progress)
    except OSError as exc:
        raise OutputError(
            f"could not write {output}: {exc.strerror or exc}; check free space and permissions"
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = os.path.getsize(output)
    hist = {int(k): int(v) for k, v in enumerate(histogram) if v}
    return ExportResult(path=str(output), seconds=time.perf_counter() - start, histogram=hist, bytes=size)


def _ome_metadata(scene: SceneInfo, class_names: Sequence[str], colours: Sequence[str] | None) -> dict[str, Any]:
    """The OME-XML of the mask: its channel, the class names and colours as a MapAnnotation, and the pixel size
    (micrometres) when the scene states one."""
    factor = float(scene.transform[0])
    metadata: dict[str, Any] = {
        "axes": "YX",
        "Name": Path(scene.path).name,
        "Channel": {"Name": "class"},
        "MapAnnotation": {
            "Namespace": NAMESPACE,
            **{f"class:{i}": n for i, n in enumerate(class_names)},
            **{f"colour:{i}": c for i, c in enumerate(colours or ())},
            "nodata": str(ws.MASK_NODATA),
            "level-0 pixels per mask pixel": f"{factor:.17g}",
            "source": str(scene.path),
        },
    }
    if scene.mpp is not None:
        metadata.update(
            PhysicalSizeX=scene.mpp[0], PhysicalSizeXUnit="µm", PhysicalSizeY=scene.mpp[1], PhysicalSizeYUnit="µm"
        )
    return metadata


def _write_level(
    tif: tifffile.TiffWriter,
    level: zarr.Array,
    index: int,
    count: int,
    resolution: tuple[float, float] | None,
    metadata: dict[str, Any],
    class_names: Sequence[str],
    colours: Sequence[str] | None,
    workers: int,
    progress: Callable[[int], Any] | None,
) -> None:
    """Write pyramid level ``index`` of ``count`` (0: full resolution, with the OME-XML, GDAL's tags and the
    sub-resolutions as SubIFDs; ``resolution``: pixels per centimetre of level 0)."""
    colormap = np.zeros((3, 256), dtype=np.uint16)
    for i, colour in enumerate(colours or ()):
        colormap[:, i] = [257 * v for v in rgba(colour)[:3]]
    extratags = [
        (42112, "s", 0, _gdal_metadata(class_names), True),  # GDAL_METADATA
        (42113, "s", 0, str(ws.MASK_NODATA), True),  # GDAL_NODATA
    ]
    scale = 2**index
    tif.write(
        _tiles(level, progress if index == 0 else None),
        shape=level.shape,
        dtype=np.uint8,
        subifds=count - 1 if index == 0 else None,
        subfiletype=1 if index else 0,
        resolution=(resolution[0] / scale, resolution[1] / scale) if resolution else None,
        resolutionunit="CENTIMETER" if resolution else None,
        metadata=metadata if index == 0 else None,
        extratags=extratags if index == 0 else (),
        tile=(TILE, TILE),
        photometric="palette",
        colormap=colormap,
        compression="zlib",
        maxworkers=max(1, workers),
    )


@dataclass(frozen=True)
class OmeTiffSink(CogSink):
    """The work store's ``mask`` as a pyramidal OME-TIFF; see the module docstring. ``path`` is a local path or
    an object-storage URL (built in the local scratch folder and uploaded as one object when complete, as every
    :class:`~segpipe.pipeline.sinks.cog.CogSink` is)."""

    scratch_suffix: ClassVar[str] = ".ome.tif"

    def build(
        self,
        store: ws.WorkStore,
        target: Path,
        *,
        scratch_dir: Path,
        class_names: Sequence[str],
        colours: Sequence[str],
        workers: int,
        progress: Callable[[int], Any] | None,
    ) -> ExportResult:
        return export_ome_tiff(
            store,
            target,
            scratch_dir=scratch_dir,
            class_names=class_names,
            colours=colours,
            workers=workers,
            progress=progress,
        )
