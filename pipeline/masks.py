"""Masks as lazy xarray: a mask COG written by segpipe (and its probabilities COG) opened with rioxarray, chunked
on the file's blocks, so no pixel is read until asked (:func:`open_mask`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import rasterio

from segpipe.core.errors import InputError
from segpipe.core.raster import open_raster
from segpipe.pipeline.names import summary_path
from segpipe.pipeline.store import MASK_NODATA, PROBABILITY_NODATA, PROBABILITY_SCALE


def _open_lazy(path: str) -> Any:
    """The COG at ``path`` as a dask-backed DataArray (band, y, x), one dask chunk per block."""
    import rioxarray  # lazy: the optional xarray extra

    with open_raster(path, role="mask", hint="give a mask COG that segpipe wrote") as src:
        rows, cols = src.block_shapes[0]
        tags, count = src.tags(), src.count
        colormap = src.colormap(1) if count == 1 and _has_colormap(src) else None
    if tags.get("SOFTWARE") != "segpipe":
        raise InputError(f"{path!r} is not a mask segpipe wrote (no SOFTWARE=segpipe tag)")
    array = rioxarray.open_rasterio(path, chunks={"band": 1, "y": rows, "x": cols}, mask_and_scale=False)
    names = [n for n in tags.get("CLASS_NAMES", "").split(",") if n]
    return array, names, colormap


def _has_colormap(src: rasterio.DatasetReader) -> bool:
    try:
        src.colormap(1)
    except ValueError:  # "NULL color table"
        return False
    return True


def mask_array(path: str) -> Any:
    """The mask COG as a lazy DataArray ``mask`` (y, x) uint8: class ids, ``_FillValue`` 255 where nodata, with
    ``class_names`` and ``colours`` (``#rrggbb`` per class id) attributes."""
    array, names, colormap = _open_lazy(path)
    mask = array.squeeze("band", drop=True).rename("mask")
    mask.attrs.update(_FillValue=MASK_NODATA, class_names=names)
    if colormap is not None:
        mask.attrs["colours"] = ["#{:02x}{:02x}{:02x}".format(*colormap[k][:3]) for k in range(len(names))]
    return mask


def probability_array(path: str, class_names: Any) -> Any:
    """The probabilities COG as a lazy DataArray ``probabilities`` (class, y, x) uint8, probability x 254
    (``scale_factor`` 1/254), ``_FillValue`` 255; the ``class`` coordinate holds the class names."""
    array, names, _ = _open_lazy(path)
    probabilities = array.rename({"band": "class"}).rename("probabilities")
    chosen = list(class_names) or names
    if len(chosen) == probabilities.sizes["class"]:
        probabilities = probabilities.assign_coords({"class": chosen})
    probabilities.attrs.update(_FillValue=PROBABILITY_NODATA, scale_factor=1 / PROBABILITY_SCALE)
    return probabilities


def probabilities_path(mask: str) -> str | None:
    """The probabilities COG the mask's run summary names, when it exists; else None."""
    summary = Path(summary_path(mask))
    if not summary.is_file():
        return None
    found = json.loads(summary.read_text()).get("probabilities")
    return str(found) if found and Path(found).is_file() else None


def open_mask(path: str | os.PathLike[str], *, probabilities: str | os.PathLike[str] | None = None) -> Any:
    """A mask COG (and its probabilities) as a lazy, dask-backed, georeferenced ``xarray.Dataset``; no pixel is
    read until asked.

    Variables: ``mask`` (y, x) uint8 class ids, ``_FillValue`` 255 (nodata), ``class_names`` and ``colours``
    attributes; ``probabilities`` (class, y, x) uint8, probability x 254, 255 nodata, when given (or named in the
    mask's summary). Coordinates ``x``/``y`` are pixel centres in the scene's CRS (``.rio.crs``).

    Raises:
        InputError: the file is not a mask segpipe wrote.
    """
    import rioxarray  # noqa: F401  # lazy: the optional xarray extra; the .rio accessor
    import xarray as xr  # lazy: the optional xarray extra

    mask = mask_array(str(path))
    data = {"mask": mask}
    chosen = str(probabilities) if probabilities is not None else probabilities_path(str(path))
    if chosen:
        data["probabilities"] = probability_array(chosen, mask.attrs.get("class_names", ()))
    ds = xr.Dataset(data)
    ds.attrs["source"] = str(path)
    return ds
