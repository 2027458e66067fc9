"""The ``segpipe`` command: a thin layer that parses options, validates, and calls the flows and stages.

Exit codes: 0 success; 2 bad input or usage (one line ``error: ...`` on stderr, no traceback); 1 internal
failure (one line, the traceback only with ``--verbose``); 130 interrupted.

Each subcommand lives in a module of this package (``run``, ``train``, ``review``, ``model``) with an ``add_*``
function that adds its parser. No option is declared here: every command's flags are built from the option fields
of a configuration class (:func:`segpipe.core.options.add_arguments`), such as
:class:`~segpipe.pipeline.settings.RunOptions` and :class:`~segpipe.models.training.config.TrainConfig`.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

import segpipe
from segpipe.cli.process import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PREFECT_STARTUP_S,
    PREFECT_STARTUP_VARIABLE,
    on_sigterm,
)
from segpipe.cli.reaper import start_reaper
from segpipe.core.errors import SegpipeError
from segpipe.core.secrets import redact


class Parser(argparse.ArgumentParser):
    """argparse with segpipe's one-line usage errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def _quiet_environment(verbose: bool) -> None:
    """Keep third-party chatter off the terminal; must run before prefect or ray are imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Prefect's ephemeral API server gets 20 s to start by default, which a busy machine misses; a user's value wins
    os.environ.setdefault(PREFECT_STARTUP_VARIABLE, str(PREFECT_STARTUP_S))
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "warning: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redacted)
        if not verbose:  # Prefect logs a failed task with its traceback; the CLI's own line says what failed
            handler.addFilter(lambda record: not record.name.startswith("prefect"))


def _redacted(record: logging.LogRecord) -> bool:
    """A logging filter that keeps secrets out of the record's message (:func:`segpipe.core.secrets.redact`)."""
    record.msg, record.args = redact(record.getMessage()), None
    return True


def _commands() -> list[Callable[[Any], None]]:
    # The reaper runs as `python -m segpipe.cli.reaper`, which imports this package: it must load only the
    # standard library, not the option classes of the commands.
    from segpipe.cli import model, review, run, train  # lazy: 0.4 s (rasterio, zarr); the reaper imports this package

    return [
        run.add_run,
        train.add_train,
        review.add_evaluate,
        run.add_dataset,
        review.add_explain,
        review.add_quicklook,
        model.add_model,
    ]


def threading_main() -> bool:
    """Whether this is the main thread (signal handlers can only be set there)."""
    return threading.current_thread() is threading.main_thread()


def _version() -> str:
    """The installed distribution's version (what ``pip show segpipe`` says), else the package's."""
    try:
        return version("segpipe")
    except PackageNotFoundError:
        return segpipe.__version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="segpipe", description="Segment huge images with attention models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks")
    parser.add_argument("--version", action="version", version=f"segpipe {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in _commands():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_environment(args.verbose)
    if getattr(args, "starts_services", False):
        args.reaper = start_reaper()  # kept open until this process ends, however it ends
        if threading_main():
            signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return int(args.handler(args))
    except SegpipeError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; re-run with the same --work-dir to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.verbose:
            raise
        first = redact(str(exc).splitlines()[0]) if str(exc) else ""
        print(
            f"internal error: {type(exc).__name__}: {first} (re-run with --verbose for details)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def command() -> None:
    """The ``segpipe`` executable: :func:`main`, then an immediate exit once the exit handlers have run (Prefect's
    last events, the temporary server's stop, logging), skipping the interpreter's slow teardown of torch, Ray and
    Prefect modules (about 0.6 s)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
