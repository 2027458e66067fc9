"""The array scene source: an ``xarray.DataArray`` (dims ``band, y, x``; numpy- or dask-backed) as a scene.

A user's array lives in the user's process; segmenters (threads, Ray actors) open scenes by name. So the array is
*staged* once by :func:`stage_array`: a folder ``<name>.segpipe-array`` holding ``scene.json`` (the scene's
:class:`~segpipe.pipeline.scene.SceneInfo` as computed on the driver, fingerprint included) and either
``pixels.npy`` (a numpy-backed array, memory-mapped by every reader: no copy per thread) or ``graph.pkl`` (a
dask-backed array's task graph, cloudpickled: a few kilobytes for stackstac or odc-stac, and no pixel is computed
on the driver). :class:`ArraySource` opens that folder and reads windows by slicing: a dask array computes only
the chunks a window touches, with dask's synchronous scheduler (the reader threads are the parallelism).

Georeferencing comes from the array: the CRS from rioxarray's accessor (``spatial_ref`` coordinate, as rioxarray
and odc-stac write it) or a ``crs`` attribute (stackstac's); the transform from the ``x``/``y`` pixel-centre
coordinates (regular spacing required), else ``transform`` attribute. Band names come from the ``band``
coordinate (matched to the model's bands as a file's descriptions are), nodata from ``_FillValue`` or ``nodata``
attributes (rioxarray's ``rio.nodata`` too). Validity is that of a file: a pixel is nodata where every band equals
nodata, and a float pixel must be finite in every band.

``graph.pkl`` is a pickle: open only folders this process's user staged (segpipe writes them under its work
directory). The source is chosen by name (``.segpipe-array`` suffix and its ``scene.json``), never by guessing.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import cloudpickle
import numpy as np
from rasterio.crs import CRS

from segpipe.core.errors import InputError
from segpipe.core.tiles import Window
from segpipe.pipeline.scene import Layout, SceneInfo, Selection
from segpipe.pipeline.sources.gdal import SUPPORTED_DTYPES

SUFFIX = ".segpipe-array"
SCENE_FILE = "scene.json"
PIXELS_FILE = "pixels.npy"
GRAPH_FILE = "graph.pkl"
DIMS = ("band", "y", "x")


def _crs_wkt(array: Any) -> str | None:
    """The array's CRS as WKT (rioxarray's accessor, else a ``crs`` attribute), or None."""
    crs = None
    try:
        import rioxarray  # noqa: F401  # lazy: the optional xarray extra; registers the .rio accessor

        crs = array.rio.crs
    except Exception:  # no rioxarray, or coordinates it cannot read: fall back on the attribute
        crs = None
    if crs is None and array.attrs.get("crs") is not None:
        try:
            crs = CRS.from_user_input(array.attrs["crs"])
        except Exception as exc:
            raise InputError(f"the array's crs attribute {array.attrs['crs']!r} is not a CRS ({exc})") from None
    return CRS.from_user_input(crs).to_wkt() if crs is not None else None


def _spacing(values: np.ndarray, axis: str) -> float:
    steps = np.diff(values.astype(np.float64))
    step = float(steps[0])
    if step == 0 or not np.allclose(steps, step, rtol=1e-9, atol=abs(step) * 1e-9):
        raise InputError(
            f"the array's {axis} coordinate is not regularly spaced; segpipe needs a regular grid (reproject or "
            "resample it first, e.g. with odc-stac or rioxarray's reproject)"
        )
    return step


def _transform(array: Any) -> tuple[tuple[float, float, float, float, float, float], bool]:
    """The affine (a, b, c, d, e, f) from pixel-centre ``x``/``y`` coordinates (CRS units), and whether the array
    is georeferenced; an identity transform for an array with neither coordinates nor a ``transform``
    attribute."""
    if "x" in array.coords and "y" in array.coords and array.sizes["x"] > 1 and array.sizes["y"] > 1:
        xs, ys = np.asarray(array["x"].values), np.asarray(array["y"].values)
        dx, dy = _spacing(xs, "x"), _spacing(ys, "y")
        stated = _stated_transform(array)
        if stated is not None and np.allclose(stated, (dx, 0.0, xs[0] - dx / 2, 0.0, dy, ys[0] - dy / 2)):
            return stated, True  # the file's own numbers, not their round trip through pixel centres
        return (dx, 0.0, float(xs[0]) - dx / 2, 0.0, dy, float(ys[0]) - dy / 2), True
    if array.attrs.get("transform") is not None:
        a, b, c, d, e, f = (float(v) for v in tuple(array.attrs["transform"])[:6])
        return (a, b, c, d, e, f), True
    return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), False


def _stated_transform(array: Any) -> tuple[float, float, float, float, float, float] | None:
    """The transform rioxarray recorded when it opened a file (``GeoTransform`` of ``spatial_ref``), or None."""
    ref = array.coords.get("spatial_ref")
    text = ref.attrs.get("GeoTransform") if ref is not None else None
    if not text:
        return None
    c, a, b, f, d, e = (float(v) for v in str(text).split())  # GDAL's order
    return (a, b, c, d, e, f)


def _nodata(array: Any) -> float | None:
    for key in ("_FillValue", "nodata"):
        for where in (array.attrs, array.encoding):
            if where.get(key) is not None:
                return float(where[key])
    return None


def _band_names(array: Any) -> tuple[str, ...]:
    """Per band, its name: the ``band`` coordinate's labels, else rioxarray's ``long_name`` (a file's band
    descriptions), else "" (numbers are not names)."""
    count = array.sizes["band"]
    long_name = array.attrs.get("long_name")
    numbered = "band" not in array.coords or all(
        isinstance(v, (int, np.integer)) for v in array["band"].values.tolist()
    )
    if isinstance(long_name, (list, tuple)) and len(long_name) == count and numbered:
        return tuple(str(v) for v in long_name)
    if "band" in array.coords:
        return tuple(str(v) if not isinstance(v, (int, np.integer)) else "" for v in array["band"].values.tolist())
    return ("",) * count


def _token(array: Any) -> str:
    """What identifies the array's pixels: dask's token of its data (a dask array's graph name; a numpy array's
    bytes)."""
    from dask.base import tokenize  # lazy: the optional xarray extra (dask)

    return str(tokenize(array.data))


def describe_array(array: Any, name: str) -> SceneInfo:
    """Validate a DataArray (dims ``band, y, x``) and describe it as a scene named ``name``, without computing
    any pixel.

    Raises:
        InputError: wrong dims, an unsupported dtype, an irregular grid, a CRS that cannot be read.
    """
    if tuple(array.dims) != DIMS:
        raise InputError(
            f"the array has dims {tuple(array.dims)}; segpipe reads ('band', 'y', 'x') (one time step at a time): "
            "use .transpose('band', 'y', 'x'), or expand_dims('band') for one band"
        )
    dtype = np.dtype(array.dtype).name
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"the array has dtype {dtype}; supported: {', '.join(SUPPORTED_DTYPES)} (use .astype)")
    if 0 in array.shape:
        raise InputError(f"the array is empty (shape {tuple(array.shape)})")
    transform, georeferenced = _transform(array)
    crs_wkt = _crs_wkt(array)
    nodata = _nodata(array)
    header = {"shape": list(array.shape), "dtype": dtype, "crs": crs_wkt, "transform": transform, "nodata": nodata}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    digest.update(_token(array).encode())
    chunks = getattr(array.data, "chunks", None)
    block = (int(chunks[1][0]), int(chunks[2][0])) if chunks is not None else (1, 1)
    return SceneInfo(
        path=name,
        width=int(array.sizes["x"]),
        height=int(array.sizes["y"]),
        count=int(array.sizes["band"]),
        dtype=dtype,
        crs_wkt=crs_wkt,
        transform=transform,
        nodata=nodata,
        band_descriptions=_band_names(array),
        georeferenced=georeferenced or crs_wkt is not None,
        fingerprint=digest.hexdigest(),
        source=ArraySource.name,
        colour_interpretations=("",) * int(array.sizes["band"]),
        scales=(1.0,) * int(array.sizes["band"]),
        offsets=(0.0,) * int(array.sizes["band"]),
        layout=Layout(driver="array", block=block, all_valid=False),
    )


def stage_array(array: Any, folder: Path, stem: str = "array") -> str:
    """Stage a DataArray as a scene in ``folder``: ``<stem>-<12 hex of its fingerprint>.segpipe-array``; returns
    that path (the scene's input). Staging the same array again reuses the folder."""
    info = describe_array(array, "")
    path = folder / f"{stem}-{info.fingerprint[:12]}{SUFFIX}"
    info_attrs = {**info.to_attrs(), "path": str(path), "block": list(info.layout.block) if info.layout else None}
    if (path / SCENE_FILE).exists():
        return str(path)
    partial = folder / f".{path.name}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    if getattr(array.data, "chunks", None) is not None:
        (partial / GRAPH_FILE).write_bytes(cloudpickle.dumps(array.data))
    else:
        np.save(partial / PIXELS_FILE, np.ascontiguousarray(array.values))
    (partial / SCENE_FILE).write_text(json.dumps(info_attrs))
    partial.rename(path)
    return str(path)


class ArraySource:
    """A staged array (see the module docstring), read window by window.

    Args:
        path: A ``.segpipe-array`` folder written by :func:`stage_array`.
        selection: The bands read (in this order) and the nodata value that replaces the array's.
    """

    name = "array"

    @classmethod
    def probe(cls, path: str) -> bool:
        return path.endswith(SUFFIX) and (Path(path) / SCENE_FILE).is_file()

    def __init__(self, path: str, selection: Selection | None = None) -> None:
        folder = Path(path)
        if not (folder / SCENE_FILE).is_file():
            raise InputError(f"input {path!r} is not a staged array (no {SCENE_FILE}); stage it with segpipe.segment")
        attrs = json.loads((folder / SCENE_FILE).read_text())
        self.selection = selection or Selection()
        block = attrs.pop("block", None)
        info = SceneInfo.from_attrs(attrs)
        layout = Layout("array", (int(block[0]), int(block[1])) if block else (1, 1), all_valid=False)
        self._info = replace(info, layout=layout).select(self.selection)
        if (folder / PIXELS_FILE).is_file():
            self._data: Any = np.load(folder / PIXELS_FILE, mmap_mode="r")
        else:
            self._data = cloudpickle.loads((folder / GRAPH_FILE).read_bytes())
        self._bands = [b - 1 for b in self.selection.bands] if self.selection.bands else None
        self._nodata = self._info.nodata

    @property
    def info(self) -> SceneInfo:
        return self._info

    def read(self, window: Window, *, out_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (bands, h, w) and validity (h, w) uint8 of ``window``, at full resolution or averaged down to
        ``out_shape`` (whole blocks of pixels; for previews).

        Raises:
            InputError: computing the array's chunks failed (the array's own error, e.g. a missing asset).
        """
        part = self._data[:, window.row_slice, window.col_slice]
        if self._bands is not None:
            part = part[self._bands]
        try:
            data = np.asarray(part.compute(scheduler="synchronous")) if hasattr(part, "compute") else np.array(part)
        except Exception as exc:
            raise InputError(
                f"the array could not be computed at pixels x {window.col_off}-{window.col_off + window.width}, "
                f"y {window.row_off}-{window.row_off + window.height} ({type(exc).__name__}: {exc})"
            ) from None
        valid = np.ones(data.shape[1:], dtype=bool)
        if self._nodata is not None:
            valid &= ~Selection(nodata=self._nodata).invalid(data)
        if np.issubdtype(data.dtype, np.floating):
            valid &= np.isfinite(data).all(axis=0)
        if out_shape is not None:
            data, valid = _average(data, valid, out_shape)
        return data, valid.astype(np.uint8)

    def close(self) -> None:
        self._data = None

    def __enter__(self) -> ArraySource:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _average(data: np.ndarray, valid: np.ndarray, out_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Average ``data`` (bands, h, w) down to ``out_shape`` over blocks of whole pixels (valid where any pixel of
    the block is)."""
    h, w = out_shape
    fy, fx = math.ceil(data.shape[1] / h), math.ceil(data.shape[2] / w)
    rows, cols = np.minimum(np.arange(h) * fy, data.shape[1] - 1), np.minimum(np.arange(w) * fx, data.shape[2] - 1)
    out = np.add.reduceat(np.add.reduceat(data.astype(np.float64), rows, axis=1), cols, axis=2)
    counts = np.add.reduceat(np.add.reduceat(np.ones(data.shape[1:]), rows, axis=0), cols, axis=1)
    mean = (out / counts).astype(data.dtype) if data.dtype.kind == "f" else np.rint(out / counts).astype(data.dtype)
    any_valid = np.add.reduceat(np.add.reduceat(valid.astype(np.int64), rows, axis=0), cols, axis=1) > 0
    return mean, any_valid
