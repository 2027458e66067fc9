"""The ``segment_scene`` Prefect flow: one task per stage of :func:`segpipe.pipeline.run.run_scene`.

With no configuration Prefect runs in ephemeral mode (a temporary local API on loopback, no server to run);
with ``PREFECT_API_URL`` set, runs are recorded on that server. Scheduled runs of whole folders are
:mod:`segpipe.flows.dataset` and :mod:`segpipe.flows.deploy`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from segpipe.pipeline.plan import RunPlan
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.session import Session
from segpipe.pipeline.settings import RunSettings


def as_task(stage: Callable[..., Any]) -> Callable[..., Any]:
    """A stage as a Prefect task named after it (``ingest``, ``infer``, ...), never cached: the work store is
    the cache, and it knows what is complete."""
    return task(name=stage.__name__.removesuffix("_stage"), cache_policy=NONE)(stage)


@flow(name="segment_scene", persist_result=False, validate_parameters=False)
def segment_scene(
    settings: RunSettings,
    plan: RunPlan | None = None,
    session: Session | None = None,
    started: float | None = None,
    on_sigterm: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Segment one scene (see :func:`segpipe.pipeline.run.run_scene`); returns the run summary.

    Args:
        settings: The scene and the run's options.
        plan: The validated plan, when the caller has made it already (the model is then loaded once).
        session: A warm session kept across scenes (a data set's); None: one for this scene.
        started: When the caller started (``time.time()``), for the summary's wall time.
        on_sigterm: A SIGTERM handler to use while the stages run, instead of Prefect's (which raises into
            whatever runs, Ray's extension code included); the ``segpipe`` command's exits at once.
    """
    with _sigterm_handler(on_sigterm):
        return run_scene(settings, plan=plan, wrap=as_task, session=session, started=started)


@contextlib.contextmanager
def _sigterm_handler(handler: Callable[..., Any] | None) -> Iterator[None]:
    if handler is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
