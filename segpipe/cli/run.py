"""``segpipe run`` (one scene), ``segpipe dataset`` (every scene of a folder, now) and ``segpipe serve`` (the same
on a cron schedule). Their run options come from :class:`~segpipe.pipeline.settings.RunOptions`."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from segpipe.cli import EXIT_OK, STARTED, on_sigterm
from segpipe.cli.prefect_server import temporary_server
from segpipe.core.options import add_arguments, given
from segpipe.pipeline.settings import RunOptions, RunSettings


def add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="segment a scene: raster in, COG mask out", description="Segment one scene.")
    p.add_argument("input", help="the scene: a GeoTIFF/COG path, or any GDAL path or URL (/vsicurl/, s3://)")
    p.add_argument("output", help="the mask to write, a .tif (Cloud Optimized GeoTIFF)")
    fields = add_arguments(p, RunOptions)
    p.add_argument("--probabilities", metavar="PATH", help="also write per-class probabilities as a COG")
    p.add_argument("--no-prefect", action="store_true", help="run the stages directly, without the Prefect flow")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(handler=_cmd_run, option_fields=fields, starts_services=True)


def _cmd_run(args: argparse.Namespace) -> int:
    from segpipe.pipeline.plan import make_plan
    from segpipe.pipeline.summary import format_summary

    settings = RunSettings(
        input=args.input, output=args.output, probabilities=args.probabilities, **given(args, args.option_fields)
    )
    if args.no_prefect:
        from segpipe.pipeline.run import run_scene

        plan = make_plan(settings)  # fail fast, before Ray starts; the model is loaded once, here
        summary = run_scene(settings, plan=plan, started=STARTED)
    else:
        with temporary_server() as server:  # comes up while the run validates and loads its model
            plan = make_plan(settings)
            from segpipe.flows.segment import segment_scene

            if server is not None:
                server.wait(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
            summary = segment_scene(settings, plan=plan, started=STARTED, on_sigterm=on_sigterm)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return EXIT_OK


def add_dataset(sub: Any) -> None:
    for name, doc in (
        ("dataset", "segment every raster of a folder now (skips scenes already done)"),
        ("serve", "serve the dataset flow on a cron schedule (Prefect deployment; blocks)"),
    ):
        p = sub.add_parser(name, help=doc, description=doc)
        p.add_argument("input_dir", help="folder of scenes (*.tif, *.tiff, *.jp2, *.vrt)")
        p.add_argument("output_dir", help="folder for <scene>.mask.tif and <scene>.mask.summary.json")
        fields = add_arguments(p, RunOptions)
        p.add_argument(
            "--probabilities", action="store_true", help="also write <scene>.probabilities.tif for every scene"
        )
        if name == "serve":
            p.add_argument("--cron", default="0 2 * * *", help="schedule (default: 02:00 every night)")
            p.add_argument("--name", default="nightly", help="deployment name")
        p.set_defaults(handler=_cmd_dataset, serve=name == "serve", option_fields=fields, starts_services=True)


def _cmd_dataset(args: argparse.Namespace) -> int:
    from segpipe.flows.dataset import scenes_in, segment_dataset

    options = RunOptions(**given(args, args.option_fields))
    scenes_in(args.input_dir)  # fail fast on a missing folder
    if args.serve:
        from segpipe.flows.deploy import serve_nightly

        serve_nightly(
            args.input_dir,
            args.output_dir,
            options=options,
            probabilities=args.probabilities,
            cron=args.cron,
            name=args.name,
        )
        return EXIT_OK
    with temporary_server() as server:
        if server is not None:
            server.wait(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
        result = segment_dataset(args.input_dir, args.output_dir, options=options, probabilities=args.probabilities)
    print(json.dumps(result, indent=2))
    return EXIT_OK
