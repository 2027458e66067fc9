"""``segpipe`` with the export stage held open, for the fault tests: ``python _held_export.py run IN OUT ...``.

Once the COG is complete under its hidden temporary name (``.OUT.segpipe-partial``, validated, not yet renamed) the
run writes the path to the file ``$SEGPIPE_TEST_READY`` and waits until the file ``$SEGPIPE_TEST_RELEASE`` exists
(at most 120 s), then finishes normally. Meanwhile the run holds its locks, so a test can kill it there or start a
competing run. The wait is this harness's own; tests synchronise on the ready file, not on time.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import segpipe.pipeline.sinks.cog as export
from segpipe.cli import main

READY = Path(os.environ["SEGPIPE_TEST_READY"])
RELEASE = Path(os.environ.get("SEGPIPE_TEST_RELEASE", "/nonexistent/segpipe-test-release"))
check_cog = export._check_cog


def held_check_cog(path: Path) -> None:
    check_cog(path)
    READY.write_text(str(path))
    deadline = time.monotonic() + 120
    while not RELEASE.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


export._check_cog = held_check_cog  # export_cog looks the name up at call time
sys.exit(main(sys.argv[1:]))
