"""``segpipe`` that SIGKILLs itself at one named point, for the crash matrix: ``python _crash_at.py ARGS...``.

``$SEGPIPE_TEST_CRASH_AT`` names the point, ``STAGE:WHEN`` (see :data:`POINTS`): ``before`` kills the process at
the entry of the stage's function, ``inside`` part-way through it (after its first region, batch, block or write),
``between`` (export only) once the first output is in place and the second is complete under its hidden name. The
harness replaces the named function of the package (nothing in the package knows of it), then runs
:func:`segpipe.cli.main` with ``ARGS``. Just before the kill it writes the point and what it saw to the file
``$SEGPIPE_TEST_CRASH_MARK`` (outside the output folder), so a test can tell a kill at the point from any other end.

The patches are installed before the CLI imports its flows: a module that imports a patched name later
(``flows.dataset`` binds ``make_plan`` when ``segpipe dataset`` imports it) gets the patched one; every other
target is looked up at call time.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn


def die(detail: str) -> NoReturn:
    """Record the point, then SIGKILL this process (every thread, at once: nothing is cleaned up)."""
    with open(os.environ["SEGPIPE_TEST_CRASH_MARK"], "w") as handle:
        handle.write(f"{os.environ['SEGPIPE_TEST_CRASH_AT']} {detail}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # the signal is delivered before this returns
    raise AssertionError("not killed")


Check = Callable[[tuple[Any, ...], Any], str | None]


def patch(owner: Any, name: str, *, at_entry: bool, check: Check | None = None, nth: int = 1) -> None:
    """Replace ``owner.name`` (a module's function or a class's method) by a wrapper that kills the process at its
    ``nth`` call for which ``check(args, result)`` gives a detail (None: not this call): at the entry
    (``at_entry``, ``result`` None) or after the original returned."""
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if at_entry:
            detail = check(args, None) if check else f"{name}()"
            if detail is not None:
                calls += 1
                if calls == nth:
                    die(detail)
            return original(*args, **kwargs)
        result = original(*args, **kwargs)
        detail = check(args, result) if check else f"{name}() returned"
        if detail is not None:
            calls += 1
            if calls == nth:
                die(detail)
        return result

    setattr(owner, name, wrapper)


def _named(suffix: str) -> Check:
    """Calls whose first argument is a path whose name ends in ``suffix``."""

    def check(args: tuple[Any, ...], result: Any) -> str | None:
        name = Path(str(args[0])).name
        return name if name.endswith(suffix) else None

    return check


def installers() -> dict[str, Callable[[], None]]:
    """Point name -> the function that installs its kill."""
    # imported here, before segpipe.cli.main: none of these imports Prefect or Ray
    from segpipe.core import files
    from segpipe.pipeline import ingest, merge, plan, ray_start, run, session, stac, stitch
    from segpipe.pipeline.sinks import cog, vector

    partial = files.PARTIAL_SUFFIX
    return {
        "validate:before": lambda: patch(plan, "make_plan", at_entry=True),
        "validate:inside": lambda: patch(plan, "describe_scene", at_entry=False),  # outputs checked, scene read
        "session:before": lambda: patch(session.Session, "__init__", at_entry=True),
        "session:inside": lambda: patch(ray_start, "_start", at_entry=False),  # Ray's processes are up
        "ingest:before": lambda: patch(run, "ingest_stage", at_entry=True),
        "ingest:inside": lambda: patch(ingest, "copy_region", at_entry=False),  # the first region is in the store
        "infer:before": lambda: patch(run, "infer_stage", at_entry=True),
        "infer:inside": lambda: patch(merge.BlendMerger, "aggregate", at_entry=False),  # the first batch is written
        "stitch:before": lambda: patch(run, "stitch_stage", at_entry=True),
        "stitch:inside": lambda: patch(stitch, "stitch_block", at_entry=False),  # the first block is blended
        "export:before": lambda: patch(run, "export_stage", at_entry=True),
        # the mask COG complete and valid under its hidden name, not yet renamed
        "export:inside": lambda: patch(cog, "_check_cog", at_entry=False, check=_named(partial)),
        # the mask in place, the probabilities COG complete under its hidden name
        "export:between": lambda: patch(cog, "_check_cog", at_entry=False, check=_named(partial), nth=2),
        "polygons:before": lambda: patch(vector, "write_vector", at_entry=True),
        "polygons:inside": _after_first_ogr_write,
        "summary:before": lambda: patch(run, "write_summary", at_entry=True),
        "summary:inside": lambda: patch(files, "_fsync", at_entry=False, check=_named(f".summary.json{partial}")),
        "item:before": lambda: patch(stac, "write_item", at_entry=True),
        "item:inside": lambda: patch(files, "_fsync", at_entry=False, check=_named(f".item.json{partial}")),
        "collection:before": lambda: patch(stac, "write_collection", at_entry=True),
        "collection:inside": lambda: patch(files, "_fsync", at_entry=False, check=_named(f"collection.json{partial}")),
    }


def _after_first_ogr_write() -> None:
    """The polygons' first batch written to the GeoPackage under its hidden name (``write_gpkg`` imports pyogrio's
    writer at call time)."""
    import pyogrio.raw

    patch(pyogrio.raw, "write", at_entry=False, check=lambda args, result: f"first batch into {Path(args[0]).name}")


if __name__ == "__main__":
    point, known = os.environ["SEGPIPE_TEST_CRASH_AT"], installers()
    if point not in known:
        raise SystemExit(f"_crash_at.py: unknown point {point!r}; one of {', '.join(known)}")
    known[point]()
    from segpipe.cli import main

    sys.exit(main(sys.argv[1:]))
