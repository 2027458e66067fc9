"""The ``segpipe`` process as every command sees it: when it started, its exit codes, and what SIGTERM does.

Exit codes: 0 success; 2 bad input or usage (one line ``error: ...`` on stderr, no traceback); 1 internal
failure (one line, the traceback only with ``--verbose``); 130 interrupted; 143 terminated.
"""

from __future__ import annotations

import os
import sys
import time
from types import FrameType

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


#: The environment variable that gives Prefect's API server its time to start, in seconds, and the value the command
#: sets unless the user set one: Prefect's own default, 20 s, is missed on a busy machine.
PREFECT_STARTUP_VARIABLE = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
PREFECT_STARTUP_S = 120


def prefect_startup_timeout() -> float:
    """Seconds Prefect's API server gets to start: the environment's value, else :data:`PREFECT_STARTUP_S`."""
    return float(os.environ.get(PREFECT_STARTUP_VARIABLE, PREFECT_STARTUP_S))
