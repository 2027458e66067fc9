"""``segpipe run`` (one scene), ``segpipe dataset`` (every scene of a folder, now) and ``segpipe serve`` (the same
on a cron schedule). Their run options come from :class:`~segpipe.pipeline.settings.RunOptions`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from segpipe.cli import EXIT_OK, STARTED, on_sigterm
from segpipe.cli.prefect_server import temporary_server
from segpipe.core.options import add_arguments, given, read_options_file, split_options
from segpipe.pipeline.settings import DatasetOptions, RunOptions, RunSettings, ScheduleOptions


def add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="segment a scene: raster in, COG mask out", description="Segment one scene.")
    p.add_argument("input", help="the scene: a GeoTIFF/COG path, or any GDAL path or URL (/vsicurl/, s3://)")
    p.add_argument("output", help="the mask to write, a .tif (Cloud Optimized GeoTIFF)")
    fields = add_arguments(p, RunOptions)
    p.add_argument("--probabilities", metavar="PATH", help="also write per-class probabilities as a COG")
    p.add_argument(
        "--vector",
        metavar="PATH",
        help="also write the mask's polygons: .gpkg, .parquet (in the scene's CRS) or .geojson (WGS 84; QuPath's, "
        "in pixels, for a mask without CRS)",
    )
    _add_config(p)
    p.add_argument("--no-prefect", action="store_true", help="run the stages directly, without the Prefect flow")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(handler=_cmd_run, option_fields=fields, starts_services=True)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="options from a TOML, YAML or JSON file: keys are the option names (tile_size or tile-size; tables "
        "run, dataset and schedule allowed); a flag given here overrides the file",
    )


def _with_config(args: argparse.Namespace, classes: tuple[type, ...], fields: list[list[Any]]) -> list[dict[str, Any]]:
    """Per class, the options of ``--config`` (if any) with the flags given on the command line over them."""
    found: list[dict[str, Any]] = [{} for _ in classes]
    if args.config:
        found = split_options(read_options_file(args.config), classes, where=f"--config {args.config}")
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
    from segpipe.pipeline.plan import make_plan
    from segpipe.pipeline.summary import format_summary

    (options,) = _with_config(args, (RunOptions,), [args.option_fields])
    settings = RunSettings(
        input=args.input,
        output=args.output,
        probabilities=args.probabilities,
        vector=args.vector,
        **options,
    )
    with _stdout_for_json(args.json) as stdout:
        if args.no_prefect:
            from segpipe.pipeline.run import run_scene

            t = time.perf_counter()
            plan = make_plan(settings)  # fail fast, before Ray starts; the model is loaded once, here
            summary = run_scene(settings, plan=plan, started=STARTED, plan_seconds=time.perf_counter() - t)
        else:
            with temporary_server() as server:  # comes up while the run validates and loads its model
                plan = make_plan(settings)
                from segpipe.flows.segment import segment_scene

                if server is not None:
                    server.wait(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
                summary = segment_scene(settings, plan=plan, started=STARTED, on_sigterm=on_sigterm)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary), file=stdout)
    return EXIT_OK


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
        _add_config(p)
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
        from segpipe.flows.deploy import serve_nightly

        schedule = ScheduleOptions(**values[2])
        with temporary_server():
            serve_nightly(args.source, args.output_dir, options=options, dataset=dataset, schedule=schedule)
        return EXIT_OK
    with _stdout_for_json(True) as stdout, temporary_server() as server:
        from segpipe.flows.dataset import segment_dataset

        if server is not None:
            server.wait(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
        report = segment_dataset(args.source, args.output_dir, options=options, dataset=dataset)
    print(json.dumps(report, indent=2), file=stdout)
    return EXIT_OK
