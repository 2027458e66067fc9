"""The ``segpipe`` command: a thin layer that parses options, validates, and calls the flows and stages.

Exit codes: 0 success; 2 bad input or usage (one line ``error: ...`` on stderr, no traceback); 1 internal
failure (one line, the traceback only with ``--verbose``); 130 interrupted.

Each subcommand lives in a module of this package and registers itself in :data:`COMMANDS`. Run options are not
declared here: their flags are built from the option fields of
:class:`~segpipe.pipeline.settings.RunOptions` and :class:`~segpipe.models.training.config.TrainConfig`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

from segpipe.core.errors import SegpipeError
from segpipe.core.secrets import redact

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

#: When the command started (``time.time()``), for the summary's wall time.
STARTED = time.time()


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM: one line and exit 143 at once. Raising into the run instead would surface inside Ray's or Prefect's
    C extensions as a confusing internal error. What the run started is ended by the reaper; its locks die with
    the process; a half-written output exists only under its hidden temporary name and its temporary folder is
    removed by the next run, exactly as after SIGKILL."""
    sys.stderr.write("error: terminated; re-run with the same --work-dir to resume\n")
    sys.stderr.flush()
    os._exit(EXIT_TERMINATED)


class Parser(argparse.ArgumentParser):
    """argparse with segpipe's one-line usage errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def _quiet_environment(verbose: bool) -> None:
    """Keep third-party chatter off the terminal; must run before prefect or ray are imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Prefect's ephemeral API server gets 20 s to start by default, which a busy machine misses; a user's value wins
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
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
    from segpipe.cli import model, review, run, train

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
    import threading

    return threading.current_thread() is threading.main_thread()


def _version() -> str:
    """The installed distribution's version (what ``pip show segpipe`` says), else the package's."""
    from importlib.metadata import PackageNotFoundError, version

    import segpipe

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
        from segpipe.cli.reaper import start_reaper

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
    import atexit

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
