"""The Python API: :func:`segment` one scene or array, :class:`Session` for many scenes on warm segmenters,
:func:`open_mask` for a mask as lazy, georeferenced xarray, and :func:`segment_dataset` for a data set.

Options are the CLI's, by field name (``tile_size=1024``, ``blend="cosine"``; see
:class:`~segpipe.pipeline.settings.RunOptions`), validated the same way and raising the same errors
(:class:`~segpipe.core.errors.SegpipeError` and its kinds). Runs are plain function calls (no Prefect server); a
user's own Prefect flow may call them inside its tasks.

An input is a path or URL (as ``segpipe run`` takes) or an ``xarray.DataArray`` with dims ``band, y, x`` and
optionally ``time`` (numpy- or dask-backed: stackstac, odc-stac, rioxarray), staged for the segmenters by
:func:`segpipe.pipeline.sources.array.stage_array` (a dask array is never computed whole on this process). With
``output=None`` the masks go to a results folder (``work_dir``, else ``$SEGPIPE_HOME``, else
``~/.cache/segpipe``), named by the input's fingerprint and the options, and the call returns them opened lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from segpipe.core.errors import ConfigError, InputError
from segpipe.core.location import Location
from segpipe.core.options import names_of
from segpipe.pipeline.masks import open_mask
from segpipe.pipeline.plan import make_plan
from segpipe.pipeline.read import describe_scene
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.session import Session as _Session
from segpipe.pipeline.settings import DatasetOptions, RunOptions, RunSettings
from segpipe.pipeline.sources.array import stage_array

if TYPE_CHECKING:
    import xarray

#: A run summary, as ``segpipe run --json`` prints it and ``<mask>.summary.json`` holds it.
Summary = dict[str, Any]


def results_folder(work_dir: str | None) -> Path:
    """Where masks asked for with ``output=None`` (and staged arrays) go: ``work_dir`` when it is local, else
    ``$SEGPIPE_HOME``, else ``~/.cache/segpipe``; created if missing."""
    if work_dir and Location(work_dir).is_local:
        folder = Path(work_dir)
    else:
        folder = Path(os.environ.get("SEGPIPE_HOME") or Path.home() / ".cache" / "segpipe")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_options(options: dict[str, Any]) -> RunOptions:
    """:class:`RunOptions` from keyword arguments, refusing a name that is not an option (with the names there
    are)."""
    known = {f.name for f in dataclasses.fields(RunOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; the run options are: {', '.join(sorted(known))}")
    return RunOptions(**options)


def _is_array(value: Any) -> bool:
    return type(value).__name__ == "DataArray" and hasattr(value, "dims")


def dataset_bands(dataset: xarray.Dataset) -> xarray.DataArray:
    """An ``xarray.Dataset`` whose data variables are bands (as ``odc.stac.load`` returns) as one DataArray with a
    ``band`` dim (the variables' names, in order); nodata from the variables' ``nodata``/``_FillValue`` when they
    agree."""
    names = list(dataset.data_vars)
    fills = {
        next((v.attrs[k] for k in ("nodata", "_FillValue") if v.attrs.get(k) is not None), None)
        for v in dataset.data_vars.values()
    }
    array = dataset.to_array("band").assign_coords(band=names)
    order = ["time", "band", "y", "x"] if "time" in array.dims else ["band", "y", "x"]
    array = array.transpose(*order)
    if len(fills) == 1 and None not in fills:
        array.attrs["nodata"] = fills.pop()
    return array


def _time_steps(array: xarray.DataArray) -> list[tuple[str, xarray.DataArray]]:
    """One ``(label, band/y/x array)`` per time step (one unlabelled step without a ``time`` dim)."""
    if "time" not in array.dims:
        return [("", array)]
    if len(array.dims) != 4:
        raise InputError(f"the array has dims {tuple(array.dims)}; give ('time', 'band', 'y', 'x')")
    steps = []
    for k in range(array.sizes["time"]):
        step = array.isel(time=k)
        value = step["time"].values if "time" in step.coords else k
        label = str(value)[:19].replace(":", "").replace("-", "") if "time" in step.coords else str(k)
        steps.append((label, step.drop_vars("time", errors="ignore")))
    return steps


def _default_output(folder: Path, fingerprint: str, options: RunOptions, label: str) -> str:
    key = hashlib.sha256(f"{fingerprint}|{options!r}".encode()).hexdigest()[:16]
    return str(folder / f"mask-{label + '-' if label else ''}{key}.tif")


class Session:
    """Warm segmenters for many calls: the model loads once and Ray (when used) starts once.

    Args:
        ray_address: An existing Ray cluster (as ``--ray-address``); None: a local instance when Ray is used.
        executor: ``auto`` (Ray when ``ray_address`` is given, else this process), ``ray`` (a local Ray instance
            unless ``ray_address``) or ``local``.
        connect_timeout: Seconds to wait for the cluster at ``ray_address``.

    Use as a context manager; :meth:`segment` takes what :func:`segment` takes.
    """

    def __init__(self, *, ray_address: str | None = None, executor: str = "auto", connect_timeout: float = 30.0):
        if executor not in ("auto", "ray", "local"):
            raise ConfigError(f"executor must be auto, ray or local, got {executor!r}")
        uses_ray = executor == "ray" or (executor == "auto" and bool(ray_address))
        self._pool = _Session(address=ray_address, ray=uses_ray, connect_timeout=connect_timeout)

    def segment(
        self,
        input: str | os.PathLike[str] | xarray.DataArray,
        output: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> Any:
        """:func:`segment` on this session's segmenters."""
        return _segment(input, output, options, self._pool)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def segment(
    input: str | os.PathLike[str] | xarray.DataArray,
    output: str | os.PathLike[str] | None = None,
    *,
    probabilities: bool | str | None = None,
    vector: str | None = None,
    **options: Any,
) -> Any:
    """Segment one scene, or each time step of an array.

    Args:
        input: A scene path or URL, or an ``xarray.DataArray`` (dims ``band, y, x``, optionally ``time`` first).
        output: The mask COG to write (an array with ``time``: a folder for one mask per step); None: masks in the
            results folder (:func:`results_folder`), returned opened.
        probabilities: Also write per-class probabilities: a path, or True for ``<mask>.probabilities.tif``.
        vector: Also write the mask's polygons there (``.gpkg``, ``.geojson``, ``.parquet``).
        **options: Run options by field name (``tile_size``, ``halo``, ``blend``, ``bands``, ``model`` ...).

    Returns:
        With ``output``: the run :data:`Summary` (a list of them for an array with ``time``). Without: an
        ``xarray.Dataset`` (:func:`open_mask`; concatenated along ``time`` for a time series).

    Raises:
        SegpipeError: bad input or options, as the CLI's one line says them.
    """
    return _segment(input, output, {**options, "probabilities": probabilities, "vector": vector}, None)


def _segment(input: Any, output: Any, options: dict[str, Any], pool: Any) -> Any:
    probabilities = options.pop("probabilities", None)
    vector = options.pop("vector", None)
    chosen = run_options(options)
    if type(input).__name__ == "Dataset" and hasattr(input, "data_vars"):
        input = dataset_bands(input)
    if not _is_array(input):
        return _segment_path(str(input), None if output is None else str(output), chosen, probabilities, vector, pool)
    steps = _time_steps(input)
    if output is not None and "time" in input.dims:
        Path(output).mkdir(parents=True, exist_ok=True)
    results = []
    for label, step in steps:
        scene = stage_array(step, results_folder(chosen.work_dir) / "arrays", stem=str(step.name or "array")[:32])
        target = output
        if output is not None and "time" in input.dims:
            target = str(Path(output) / f"mask-{label}.tif")
        try:
            target = None if target is None else str(target)
            results.append(_segment_path(scene, target, chosen, probabilities, vector, pool, label))
        finally:  # staged again, at the same path, by a re-run (which then resumes from its --work-dir)
            shutil.rmtree(scene, ignore_errors=True)
    if "time" not in input.dims:
        return results[0]
    if output is not None:
        return results
    import xarray as xr  # lazy: the optional xarray extra

    return xr.concat(results, dim=xr.DataArray(input["time"].values, dims="time", name="time"))


def _segment_path(
    input: str,
    given: str | None,
    options: RunOptions,
    probabilities: Any,
    vector: str | None,
    pool: Any,
    label: str = "",
) -> Any:
    opened = given is None
    output = given
    if output is None:
        fingerprint = describe_scene(input).fingerprint
        output = _default_output(results_folder(options.work_dir), fingerprint, options, label)
        options = dataclasses.replace(options, overwrite=True)
    if probabilities is True:
        probabilities = str(Path(output).with_suffix("")) + ".probabilities.tif"
    settings = RunSettings.for_scene(
        options, input=input, output=output, probabilities=probabilities or None, vector=vector
    )
    started, t = time.time(), time.perf_counter()
    plan = make_plan(settings)
    summary = run_scene(settings, plan=plan, session=pool, plan_seconds=time.perf_counter() - t, started=started)
    if not opened:
        return summary
    return open_mask(output, probabilities=probabilities or None)


def segment_dataset(
    source: str,
    output_dir: str,
    *,
    recursive: bool = False,
    **options: Any,
) -> Summary:
    """Segment the new and changed scenes of a data set (a folder, a STAC catalog or API, a bucket prefix), as
    ``segpipe dataset`` does; data-set options (``asset``, ``retries``, ``vector_format`` ...) and run options by
    field name. Runs the Prefect flow (on a temporary Prefect server unless ``PREFECT_API_URL`` is set).

    Returns:
        The night's report (``done``, ``skipped``, ``failed``, one row per scene).
    """
    from segpipe.flows.dataset import segment_dataset as flow  # lazy: Prefect takes 1.2 s; segment() needs none

    names = names_of(DatasetOptions)  # field names, and flag spellings: probabilities=True is write_probabilities
    dataset = DatasetOptions(recursive=recursive, **{names[k]: v for k, v in options.items() if k in names})
    run = run_options({k: v for k, v in options.items() if k not in names})
    report: Summary = flow(source, output_dir, run, dataset)
    return report
