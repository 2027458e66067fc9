"""``segpipe run`` (one scene), ``segpipe dataset`` (every scene of a folder, now) and ``segpipe serve`` (the same
on a cron schedule). Their run options come from :class:`~segpipe.pipeline.settings.RunOptions` (and
:class:`~segpipe.pipeline.settings.DatasetOptions`, :class:`~segpipe.pipeline.settings.ScheduleOptions`), ``--config``
from :class:`ConfigFile`, and ``run``'s own flags from :class:`RunCommandOptions` and
:class:`~segpipe.cli.options.Printing`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from segpipe.cli.options import Printing, parsed
from segpipe.cli.prefect_server import temporary_server
from segpipe.cli.process import EXIT_OK, STARTED, on_sigterm, prefect_startup_timeout
from segpipe.core.options import add_arguments, given, option, read_options_file, split_options
from segpipe.pipeline.settings import DatasetOptions, RunOptions, RunSettings, ScheduleOptions


@dataclass(frozen=True, kw_only=True)
class RunCommandOptions:
    """``segpipe run``'s options besides the run options: the outputs beside the mask (those of
    :class:`~segpipe.pipeline.settings.RunSettings`) and whether the stages run in Prefect's flow."""

    probabilities: str | None = option(None, help="also write per-class probabilities as a COG", metavar="PATH")
    vector: str | None = option(
        None,
        help="also write the mask's polygons: .gpkg, .parquet (in the scene's CRS) or .geojson (WGS 84; QuPath's, "
        "in pixels, for a mask without CRS)",
        metavar="PATH",
    )
    no_prefect: bool = option(False, help="run the stages directly, without the Prefect flow")


@dataclass(frozen=True, kw_only=True)
class ConfigFile:
    """The options file of ``segpipe run``, ``dataset`` and ``serve`` (:func:`_with_config`)."""

    config: str | None = option(
        None,
        help="options from a TOML, YAML or JSON file: keys are the option names (tile_size or tile-size; tables "
        "run, dataset and schedule allowed); a flag given here overrides the file",
        metavar="FILE",
    )


def add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="segment a scene: raster in, COG mask out", description="Segment one scene.")
    p.add_argument("input", help="the scene: a GeoTIFF/COG path, or any GDAL path or URL (/vsicurl/, s3://)")
    p.add_argument("output", help="the mask to write, a .tif (Cloud Optimized GeoTIFF)")
    fields = add_arguments(p, RunOptions)
    add_arguments(p, RunCommandOptions, exclude=("no_prefect",))
    add_arguments(p, ConfigFile)
    add_arguments(p, RunCommandOptions, only=("no_prefect",))
    add_arguments(p, Printing)
    p.set_defaults(handler=_cmd_run, option_fields=fields, starts_services=True)


def _with_config(args: argparse.Namespace, classes: tuple[type, ...], fields: list[list[Any]]) -> list[dict[str, Any]]:
    """Per class, the options of ``--config`` (if any) with the flags given on the command line over them."""
    found: list[dict[str, Any]] = [{} for _ in classes]
    config = parsed(args, ConfigFile).config
    if config:
        found = split_options(read_options_file(config), classes, where=f"--config {config}")
    return [{**from_file, **given(args, flags)} for from_file, flags in zip(found, fields, strict=True)]


@contextlib.contextmanager
def _stdout_for_json(enabled: bool) -> Iterator[TextIO]:
    """Yield the real stdout; while the block runs (and ``enabled``), what libraries print goes to stderr, so
    that stdout carries the JSON document alone. (Ray's drivers print the cluster's error messages, such as a lost
    node's "Raylet is terminated" with its log lines, to stdout from a thread of their own.)"""
    real = sys.stdout
    if enabled:
        sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stdout = real


def _cmd_run(args: argparse.Namespace) -> int:
    (options,) = _with_config(args, (RunOptions,), [args.option_fields])
    command = parsed(args, RunCommandOptions)
    settings = RunSettings(
        input=args.input,
        output=args.output,
        probabilities=command.probabilities,
        vector=command.vector,
        **options,
    )
    printing = parsed(args, Printing)
    with _stdout_for_json(printing.json) as stdout:
        summary = _run_directly(settings) if command.no_prefect else _run_flow(settings)
    from segpipe.pipeline.summary import format_summary  # lazy: torch, 1.7 s, loaded by the run by now; not for --help

    print(json.dumps(summary, indent=2) if printing.json else format_summary(summary), file=stdout)
    return EXIT_OK


def _run_directly(settings: RunSettings) -> dict[str, Any]:
    """Validate (the model is loaded once, here), then run the stages without Prefect; the run's summary."""
    from segpipe.pipeline.plan import make_plan  # lazy: the stages and torch, 1.7 s; not for --help
    from segpipe.pipeline.run import run_scene  # lazy: the stages and torch, 1.7 s; not for --help

    t = time.perf_counter()
    plan = make_plan(settings)  # fail fast, before Ray starts; the model is loaded once, here
    return run_scene(settings, plan=plan, started=STARTED, plan_seconds=time.perf_counter() - t)


def _run_flow(settings: RunSettings) -> dict[str, Any]:
    """Validate, then run Prefect's flow; Prefect's temporary server comes up meanwhile. The run's summary."""
    with temporary_server() as server:  # comes up while the run imports its stages, validates, loads its model
        from segpipe.pipeline.plan import make_plan  # lazy: the stages and torch, 1.7 s, while Prefect's server starts

        plan = make_plan(settings)
        from segpipe.flows.segment import segment_scene  # lazy: prefect, 1.2 s, imported while its server starts

        if server is not None:
            server.wait(prefect_startup_timeout())
        return segment_scene(settings, plan=plan, started=STARTED, on_sigterm=on_sigterm)


def add_dataset(sub: Any) -> None:
    for name, doc in (
        ("dataset", "segment the new and changed scenes of a data set now"),
        ("serve", "register the data set's nightly deployment on a Prefect server and serve it (blocks)"),
    ):
        p = sub.add_parser(name, help=doc, description=doc)
        p.add_argument(
            "source",
            help="a folder, a glob, a list file, an object-storage prefix (s3://bucket/scenes/), a STAC catalog or "
            "item collection (.json), or a STAC API (stac-api+https://...)",
        )
        p.add_argument(
            "output_dir",
            help="folder or prefix for <scene>.mask.tif (<scene>.mask.ome.tif for a slide), its summary and STAC Item",
        )
        fields = add_arguments(p, RunOptions)
        dataset_fields = add_arguments(p, DatasetOptions)
        schedule_fields = add_arguments(p, ScheduleOptions) if name == "serve" else []
        add_arguments(p, ConfigFile)
        p.set_defaults(
            handler=_cmd_dataset,
            serve=name == "serve",
            option_fields=fields,
            dataset_fields=dataset_fields,
            schedule_fields=schedule_fields,
            starts_services=True,
        )


def _cmd_dataset(args: argparse.Namespace) -> int:
    classes = (RunOptions, DatasetOptions, ScheduleOptions) if args.serve else (RunOptions, DatasetOptions)
    fields = [args.option_fields, args.dataset_fields, args.schedule_fields][: len(classes)]
    values = _with_config(args, classes, fields)
    options, dataset = RunOptions(**values[0]), DatasetOptions(**values[1])
    dataset.check_with(options)  # before a deployment is registered or a server started
    if args.serve:
        from segpipe.flows.deploy import serve_nightly  # lazy: prefect, 1.3 s; not for --help

        schedule = ScheduleOptions(**values[2])
        with temporary_server():
            serve_nightly(args.source, args.output_dir, options=options, dataset=dataset, schedule=schedule)
        return EXIT_OK
    with _stdout_for_json(True) as stdout, temporary_server() as server:
        from segpipe.flows.dataset import segment_dataset  # lazy: prefect, 1.9 s, imported while its server starts

        if server is not None:
            server.wait(prefect_startup_timeout())
        report = segment_dataset(args.source, args.output_dir, options=options, dataset=dataset)
    print(json.dumps(report, indent=2), file=stdout)
    return EXIT_OK
